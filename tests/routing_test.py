"""Router math (esjax.routing.router) against float64 numpy references and hand-built routing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esjax.routing import router

MODES = [  # (score_fn, order, renormalize, scaling)
    ("softmax", "topk_softmax", False, 1.0),
    ("softmax", "softmax_topk", False, 1.0),
    ("softmax", "softmax_topk", True, 1.0),
    ("sigmoid", "softmax_topk", False, 1.0),
    ("sigmoid", "softmax_topk", True, 2.5),
    ("softmax", "topk_softmax", False, 0.5),
]


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_route(logits, k, score_fn, order, renormalize, scaling):
  """Per-token float64 reference: (weights [T, k], indices [T, k], probs [T, E])."""
  logits = np.asarray(logits, np.float64)
  weights, indices, probs = [], [], []
  for l in logits:
    s = _softmax(l) if score_fn == "softmax" else 1 / (1 + np.exp(-l))
    key = l if order == "topk_softmax" else s
    idx = np.argsort(-key, kind="stable")[:k]  # ties: lowest index first
    if order == "topk_softmax":
      w = _softmax(l[idx])
    else:
      w = s[idx]
      if renormalize:
        w = w / w.sum()
    weights.append(w * scaling)
    indices.append(idx)
    probs.append(s / s.sum())
  return np.array(weights), np.array(indices), np.array(probs)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m)))
def test_route_matches_reference(mode):
  logits = jax.random.normal(jax.random.key(0), (32, 8)) * 2
  r = router.route(logits, 3, score_fn=mode[0], order=mode[1], renormalize=mode[2],
                   scaling=mode[3])
  w, idx, p = np_route(logits, 3, *mode)
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(r.probs), p, rtol=1e-5, atol=1e-7)
  assert r.weights.dtype == jnp.float32 and r.indices.dtype == jnp.int32


def test_ties_go_to_lowest_index_and_signed_zeros_tie():
  logits = jnp.array([[1.0, 3.0, 3.0, 0.0],  # tie between 1 and 2
                      [0.0, -0.0, 0.0, -1.0],  # -0.0 ranks equal to +0.0
                      [-0.0, 0.0, -2.0, -1.0],
                      [2.0, 2.0, 2.0, 2.0]])
  for order in ("topk_softmax", "softmax_topk"):
    r = router.route(logits, 2, order=order)
    np.testing.assert_array_equal(np.asarray(r.indices), [[1, 2], [0, 1], [0, 1], [0, 1]])


def test_route_gradient_at_zero_logits():
  """Exactly-zero logits (a zero-initialised router) still pass gradient to the router."""
  c = jnp.arange(1.0, 3.0)

  for order in ("topk_softmax", "softmax_topk"):
    g = jax.grad(lambda l: jnp.sum(router.route(l, 2, order=order).weights * c))(
        jnp.zeros((1, 4)))
    w_idx = np.asarray(router.route(jnp.zeros((1, 4)), 2, order=order).indices)[0]
    # d/dl of sum_j c_j softmax(...)_j at uniform scores is nonzero for the chosen experts.
    assert np.all(np.abs(np.asarray(g)[0, w_idx]) > 1e-3), (order, g)


def test_bad_order_names_value():
  with pytest.raises(ValueError, match="order='nope'"):
    router.route(jnp.zeros((2, 4)), 1, order="nope")
  with pytest.raises(ValueError, match="needs score_fn='softmax'"):
    router.route(jnp.zeros((2, 4)), 1, score_fn="sigmoid", order="topk_softmax")


def _np_balance(probs, indices, n_experts):
  t, k = indices.shape
  f = np.bincount(indices.reshape(-1), minlength=n_experts) / (t * k)
  return n_experts * np.sum(f * probs.mean(0))


def test_balance_loss_balanced_is_one_and_collapsed_is_e():
  rng = np.random.default_rng(0)
  e, t, k = 4, 8, 2
  # Balanced counts (each expert gets T*k/E assignments); probs anything that sums to 1.
  indices = np.array([[i % e, (i + 1) % e] for i in range(t)])
  probs = _softmax(rng.normal(size=(t, e)))
  assert np.bincount(indices.reshape(-1)).tolist() == [4, 4, 4, 4]
  loss = router.load_balancing_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(indices))
  np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)
  # Uniform probs and balanced counts: exactly 1.0.
  uniform = jnp.full((t, e), 1.0 / e)
  assert float(router.load_balancing_loss(uniform, jnp.asarray(indices))) == 1.0
  # Collapse: every token to expert 0 with probability 1 gives E.
  one_hot = jnp.zeros((t, e)).at[:, 0].set(1.0)
  assert float(router.load_balancing_loss(one_hot, jnp.zeros((t, 1), jnp.int32))) == e


def test_balance_loss_random_and_gradient_through_probs_only():
  rng = np.random.default_rng(1)
  e, t, k = 6, 20, 2
  probs = _softmax(rng.normal(size=(t, e)))
  indices = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
  p32, i32 = jnp.asarray(probs, jnp.float32), jnp.asarray(indices, jnp.int32)
  np.testing.assert_allclose(float(router.load_balancing_loss(p32, i32)),
                             _np_balance(probs, indices, e), rtol=1e-6)
  g = jax.grad(router.load_balancing_loss)(p32, i32)
  f = np.bincount(indices.reshape(-1), minlength=e) / (t * k)
  np.testing.assert_allclose(np.asarray(g), np.broadcast_to(e * f / t, (t, e)), rtol=1e-6)


def test_seq_balance_loss():
  """Batch-balanced but each sequence collapsed: batch loss 1.0, sequence loss E."""
  e, b, s = 2, 2, 4
  indices = jnp.array([0] * s + [1] * s, jnp.int32)[:, None]
  probs = jax.nn.one_hot(indices[:, 0], e)
  assert float(router.load_balancing_loss(probs, indices)) == 1.0
  assert float(router.seq_load_balancing_loss(probs, indices, b)) == e
  # Random: the mean over sequences of the per-sequence numpy loss.
  rng = np.random.default_rng(2)
  e, b, s, k = 5, 3, 7, 2
  probs = _softmax(rng.normal(size=(b * s, e)))
  indices = np.stack([rng.choice(e, k, replace=False) for _ in range(b * s)])
  want = np.mean([_np_balance(probs[i * s:(i + 1) * s], indices[i * s:(i + 1) * s], e)
                  for i in range(b)])
  got = router.seq_load_balancing_loss(jnp.asarray(probs, jnp.float32),
                                       jnp.asarray(indices, jnp.int32), b)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_z_loss():
  for e in (2, 8, 60):
    np.testing.assert_allclose(float(router.z_loss(jnp.zeros((5, e)))), math.log(e) ** 2,
                               rtol=1e-6)
  logits = np.random.default_rng(3).normal(size=(9, 7)) * 30  # large: needs a stable lse
  lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  np.testing.assert_allclose(float(router.z_loss(jnp.asarray(logits, jnp.float32))),
                             np.mean(lse ** 2), rtol=1e-5)


def test_max_z_loss():
  z = jnp.array([[[1.0, -3.0, 2.0], [-5.0, -4.0, -6.0]]])  # [B=1, S=2, V=3]: maxes 2, -4
  assert float(router.max_z_loss(z)) == (4.0 + 16.0) / 2
  assert float(router.max_z_loss(z, jnp.array([[1, 0]]))) == 4.0
  g = jax.grad(router.max_z_loss)(z)  # sparse: 2 * z_max / n (n=2) at the argmax only
  np.testing.assert_allclose(np.asarray(g), [[[0, 0, 2.0], [0, -4.0, 0]]])


def test_expert_counts():
  idx = jnp.array([[0, 3], [3, 1], [0, 1]])
  np.testing.assert_array_equal(np.asarray(router.expert_counts(idx, 5)), [2, 2, 0, 2, 0])
