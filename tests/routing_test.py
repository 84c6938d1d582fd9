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


# --- References transcribed from Megatron-LM (megatron/core/transformer/moe/moe_utils.py and
# router.py at d98e8a6) and transformers 5.23 (models/deepseek_v3/modeling_deepseek_v3.py),
# in float64 numpy, one token at a time where the original is batched.


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def megatron_topk_routing(logits, topk, use_pre_softmax=False, num_groups=None,
                          group_topk=None, scaling_factor=None, score_function="softmax",
                          expert_bias=None):
  """moe_utils.topk_routing_with_score_function (with group_limited_topk), dense output:
  (probs [T, k], top_indices [T, k]) sorted by the selection key, best first."""
  logits = np.asarray(logits, np.float64)

  def compute_topk(scores, k):
    if group_topk:  # group_limited_topk: groups by the sum of their top (k // group_topk)
      t, e = scores.shape
      grouped = scores.reshape(t, num_groups, e // num_groups)
      group_scores = -np.sort(-grouped, axis=-1)[..., :k // group_topk].sum(-1)
      group_idx = np.argsort(-group_scores, axis=-1, kind="stable")[:, :group_topk]
      group_mask = np.zeros_like(group_scores)
      np.put_along_axis(group_mask, group_idx, 1, axis=1)
      score_mask = np.repeat(group_mask, e // num_groups, axis=1).astype(bool)
      scores = np.where(score_mask, scores, -np.inf)
    idx = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, -1), idx

  if score_function == "softmax":
    if use_pre_softmax:
      probs, top_indices = compute_topk(_softmax(logits), topk)
    else:
      scores, top_indices = compute_topk(logits, topk)
      probs = _softmax(scores)
  else:
    scores = _np_sigmoid(logits)
    if expert_bias is not None:
      _, top_indices = compute_topk(scores + np.asarray(expert_bias, np.float64), topk)
      scores = np.take_along_axis(scores, top_indices, -1)
    else:
      scores, top_indices = compute_topk(scores, topk)
    probs = scores / (scores.sum(-1, keepdims=True) + 1e-20) if topk > 1 else scores
  if scaling_factor:
    probs = probs * scaling_factor
  return probs, top_indices


MEGATRON_CASES = [  # (esjax route kwargs, Megatron kwargs, k)
    (dict(), dict(), 2),
    (dict(order="softmax_topk"), dict(use_pre_softmax=True), 3),
    (dict(score_fn="sigmoid", order="softmax_topk"), dict(score_function="sigmoid"), 3),
    (dict(score_fn="sigmoid", order="softmax_topk"), dict(score_function="sigmoid"), 1),
    (dict(score_fn="sigmoid", order="softmax_topk", scaling=2.5),
     dict(score_function="sigmoid", scaling_factor=2.5), 4),
    (dict(score_fn="sigmoid", order="softmax_topk", n_groups=4, top_k_groups=2, bias=True),
     dict(score_function="sigmoid", num_groups=4, group_topk=2, expert_bias=True), 4),
    (dict(score_fn="sigmoid", order="softmax_topk", bias=True, scaling=2.5),
     dict(score_function="sigmoid", expert_bias=True, scaling_factor=2.5), 6),
    (dict(order="softmax_topk", n_groups=2, top_k_groups=1),
     dict(use_pre_softmax=True, num_groups=2, group_topk=1), 2),
    (dict(n_groups=8, top_k_groups=3), dict(num_groups=8, group_topk=3), 3),
]


@pytest.mark.parametrize("case", range(len(MEGATRON_CASES)))
def test_route_default_matches_megatron(case):
  """Default renormalisation (sigmoid k > 1 only), expert bias, groups, scaling."""
  ours, theirs, k = MEGATRON_CASES[case]
  rng = np.random.default_rng(case)
  logits = rng.normal(size=(40, 16)) * 2
  bias = rng.normal(size=16) * 0.3
  if ours.pop("bias", False):
    ours["bias"] = jnp.asarray(bias, jnp.float32)
    theirs["expert_bias"] = bias
  r = router.route(jnp.asarray(logits, jnp.float32), k, **ours)
  w, idx = megatron_topk_routing(logits, k, **theirs)
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5, atol=1e-7)


def test_renormalize_can_be_turned_off_and_resolves_by_score_fn():
  logits = jax.random.normal(jax.random.key(1), (8, 6))
  raw = router.route(logits, 3, score_fn="sigmoid", order="softmax_topk", renormalize=False)
  np.testing.assert_allclose(np.asarray(raw.weights),
                             np.take_along_axis(np.asarray(jax.nn.sigmoid(logits)),
                                                np.asarray(raw.indices), -1), rtol=1e-6)
  assert router.resolve_renormalize(None, "sigmoid", 2)
  assert not router.resolve_renormalize(None, "sigmoid", 1)
  assert not router.resolve_renormalize(None, "softmax", 4)
  assert router.resolve_renormalize(True, "softmax", 4)


def hf_deepseek_v3_router(logits, bias, n_group, topk_group, top_k, norm_topk_prob,
                          routed_scaling_factor):
  """transformers 5.23 DeepseekV3TopkRouter.forward after the linear (float64 numpy):
  (topk_weights [T, k], topk_indices [T, k]); torch.topk(sorted=False) order unspecified."""
  n_tokens, n_experts = logits.shape
  scores = _np_sigmoid(np.asarray(logits, np.float64))
  scores_for_choice = scores + bias
  group_scores = -np.sort(-scores_for_choice.reshape(n_tokens, n_group, -1), -1)[..., :2]
  group_scores = group_scores.sum(-1)
  group_idx = np.argsort(-group_scores, -1)[:, :topk_group]
  group_mask = np.zeros_like(group_scores)
  np.put_along_axis(group_mask, group_idx, 1, axis=1)
  score_mask = np.repeat(group_mask, n_experts // n_group, axis=1).astype(bool)
  scores_for_choice = np.where(score_mask, scores_for_choice, -np.inf)
  topk_indices = np.argsort(-scores_for_choice, -1)[:, :top_k]
  topk_weights = np.take_along_axis(scores, topk_indices, 1)
  if norm_topk_prob:
    topk_weights = topk_weights / (topk_weights.sum(-1, keepdims=True) + 1e-20)
  return topk_weights * routed_scaling_factor, topk_indices


def _by_expert(weights, indices, n_experts):
  """[T, E] dense weights: compares routings whose slot order differs."""
  out = np.zeros((indices.shape[0], n_experts))
  np.put_along_axis(out, np.asarray(indices), np.asarray(weights, np.float64), axis=1)
  return out


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_v3_gate_matches_transformers_transcription(norm):
  """DeepSeek-V3's shape: 8 of 32 experts in 8 groups, 4 groups per token, scaling 2.5."""
  rng = np.random.default_rng(7)
  e, k = 32, 8
  logits = rng.normal(size=(50, e)) * 2
  bias = rng.normal(size=e) * 0.2  # large enough to change selections
  w, idx = hf_deepseek_v3_router(logits, bias, 8, 4, k, norm, 2.5)
  r = router.route(jnp.asarray(logits, jnp.float32), k, score_fn="sigmoid",
                   order="softmax_topk", renormalize=norm, scaling=2.5,
                   bias=jnp.asarray(bias, jnp.float32), n_groups=8, top_k_groups=4)
  np.testing.assert_allclose(_by_expert(r.weights, r.indices, e), _by_expert(w, idx, e),
                             rtol=1e-5, atol=1e-7)
  unbiased = router.route(jnp.asarray(logits, jnp.float32), k, score_fn="sigmoid",
                          order="softmax_topk", n_groups=8, top_k_groups=4)
  assert (np.sort(np.asarray(unbiased.indices)) != np.sort(idx)).any()  # the bias selects


@pytest.mark.slow  # importing torch and transformers: ~20 s
def test_deepseek_v3_gate_matches_transformers_module():
  """The same against transformers' own DeepseekV3TopkRouter on CPU (no network)."""
  torch = pytest.importorskip("torch")
  ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
  from transformers import DeepseekV3Config  # pylint: disable=g-import-not-at-top
  e, d, k = 16, 12, 4
  hf_cfg = DeepseekV3Config(hidden_size=d, n_routed_experts=e, num_experts_per_tok=k,
                            n_group=4, topk_group=2, norm_topk_prob=True,
                            routed_scaling_factor=1.5)
  gate = ds.DeepseekV3TopkRouter(hf_cfg)
  rng = np.random.default_rng(8)
  w, x, bias = rng.normal(size=(e, d)), rng.normal(size=(30, d)), rng.normal(size=e) * 0.2
  with torch.no_grad():
    gate.weight.copy_(torch.tensor(w))
    gate.e_score_correction_bias.copy_(torch.tensor(bias))
    _, hf_w, hf_idx = gate(torch.tensor(x, dtype=torch.float32))
  logits = jnp.asarray(x, jnp.float32) @ jnp.asarray(w.T, jnp.float32)
  r = router.route(logits, k, score_fn="sigmoid", order="softmax_topk", scaling=1.5,
                   bias=jnp.asarray(bias, jnp.float32), n_groups=4, top_k_groups=2)
  np.testing.assert_allclose(_by_expert(r.weights, r.indices, e),
                             _by_expert(hf_w.numpy(), hf_idx.numpy(), e), rtol=1e-5,
                             atol=1e-6)


def test_expert_bias_gets_no_gradient_and_group_errors_name_values():
  logits = jax.random.normal(jax.random.key(2), (6, 8))
  g = jax.grad(lambda b: jnp.sum(router.route(logits, 2, score_fn="sigmoid",
                                              order="softmax_topk", bias=b).weights))(
      jnp.zeros(8))
  np.testing.assert_array_equal(np.asarray(g), 0.0)
  with pytest.raises(ValueError, match="n_groups=3"):
    router.route(logits, 2, order="softmax_topk", n_groups=3, top_k_groups=1)
  with pytest.raises(ValueError, match="top_k_groups=4"):
    router.route(logits, 2, order="softmax_topk", n_groups=2, top_k_groups=4)
  with pytest.raises(ValueError, match="needs score_fn='sigmoid'"):
    router.route(logits, 2, order="softmax_topk", bias=jnp.zeros(8))


def megatron_masked_losses(scores, routing_map_k, padding, seq_length, bsz, topk, n_experts,
                           logits):
  """router.py `_apply_aux_loss` / `_apply_seq_aux_loss` and `z_loss_func`, coefficient 1,
  on Megatron's [S, B] token order (token s * B + b); `padding` True = excluded.

  scores [T, E] (compute_routing_scores_for_aux_loss), routing_map_k [T, k] indices.
  """
  routing_map = np.zeros((len(scores), n_experts), bool)
  np.put_along_axis(routing_map, routing_map_k, True, axis=1)
  valid = ~padding[:, None]
  routing_map, scores = routing_map & valid, scores * valid  # compute_routing_scores_for_aux_loss

  def switch(probs, tokens_per_expert, total_num_tokens):
    return np.sum(probs.sum(0) * tokens_per_expert) * (
        n_experts / (topk * total_num_tokens * total_num_tokens))

  tpe = routing_map.sum(0)
  aux = switch(scores, tpe, tpe.sum() / topk)  # with_padding_mask: T = counts / topk
  seq_scores = scores.reshape(seq_length, -1)
  seq_map = routing_map.reshape(seq_length, -1)
  seq_tpe = seq_map.sum(0)
  seq_aux = switch(seq_scores, seq_tpe, seq_tpe.sum() / (topk * bsz)) / bsz
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  z = np.sum(lse ** 2 * ~padding) / max(np.sum(~padding), 1.0)
  return aux, seq_aux, z


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_masked_router_losses_match_megatron(score_fn):
  b, s, e, k = 3, 10, 6, 2
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(b * s, e)) * 2  # esjax order: token b * S + s
  mask = np.ones((b, s))
  mask[0, 7:], mask[1, 3:], mask[2, :2] = 0, 0, 0  # unequal padding per sequence
  r = router.route(jnp.asarray(logits, jnp.float32), k, score_fn=score_fn,
                   order="softmax_topk")
  m = jnp.asarray(mask.reshape(-1))
  got = (router.load_balancing_loss(r.probs, r.indices, m),
         router.seq_load_balancing_loss(r.probs, r.indices, b, m),
         router.z_loss(jnp.asarray(logits, jnp.float32), m))
  probs = _softmax(logits) if score_fn == "softmax" else _np_sigmoid(logits)
  probs = probs / probs.sum(-1, keepdims=True)
  idx = np.argsort(-probs, -1, kind="stable")[:, :k]
  to_sb = lambda x: x.reshape(b, s, *x.shape[1:]).swapaxes(0, 1).reshape(b * s, *x.shape[1:])
  want = megatron_masked_losses(to_sb(probs), to_sb(idx), to_sb(mask.reshape(-1) == 0), s, b,
                                k, e, to_sb(logits))
  np.testing.assert_allclose([float(v) for v in got], want, rtol=1e-5)
  # Without a mask, and with an all-ones mask: the unmasked losses.
  ones = jnp.ones(b * s)
  for fn, args in ((router.load_balancing_loss, (r.probs, r.indices)),
                   (router.z_loss, (jnp.asarray(logits, jnp.float32),))):
    np.testing.assert_allclose(float(fn(*args, ones)), float(fn(*args)), rtol=1e-6)
  np.testing.assert_allclose(float(router.seq_load_balancing_loss(r.probs, r.indices, b, ones)),
                             float(router.seq_load_balancing_loss(r.probs, r.indices, b)),
                             rtol=1e-6)


def test_switch_loss_from_rank_sums_adds_up_to_the_batch_loss():
  """Megatron's per-rank form: each rank's probs sum with the counts reduced over ranks."""
  rng = np.random.default_rng(10)
  t, e, k = 24, 5, 2
  probs = jnp.asarray(_softmax(rng.normal(size=(t, e))), jnp.float32)
  idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
  mask = jnp.asarray(rng.random(t) < 0.7, jnp.float32)
  counts = router.expert_counts(idx, e, mask)
  n = jnp.sum(mask)
  ranks = [slice(0, 10), slice(10, 24)]
  per_rank = [router.switch_loss(jnp.sum(probs[sl] * mask[sl, None], 0), counts, n, k)
              for sl in ranks]
  np.testing.assert_allclose(float(sum(per_rank)),
                             float(router.load_balancing_loss(probs, idx, mask)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(counts),
                                np.bincount(np.asarray(idx)[np.asarray(mask) > 0].reshape(-1),
                                            minlength=e))


def test_update_expert_bias_matches_megatron():
  """moe_utils.get_updated_expert_bias: bias + rate * sign(mean(count) - count)."""
  rng = np.random.default_rng(11)
  counts = rng.integers(0, 50, size=(3, 8)).astype(np.float64)
  counts[0] = [10, 10, 10, 10, 20, 0, 10, 10]  # experts exactly at the mean keep their bias
  bias = rng.normal(size=(3, 8))
  want = bias + np.sign(counts.sum(-1, keepdims=True) / counts.shape[-1] - counts) * 1e-3
  got = router.update_expert_bias(jnp.asarray(bias, jnp.float32), jnp.asarray(counts), 1e-3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  got_frac = router.update_expert_bias(jnp.asarray(bias, jnp.float32),
                                       jnp.asarray(counts / counts.sum(-1, keepdims=True)),
                                       1e-3)  # fractions of the same counts: the same update
  np.testing.assert_allclose(np.asarray(got_frac), want, rtol=1e-6)
