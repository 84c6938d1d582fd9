"""Pallas routing kernel vs the jnp reference (`router.route`), in interpret mode on CPU.

Plus: a float64 numpy routing loop that pins the reference's tie/-0.0/NaN semantics, the
custom_vjp gradient, Triton (cuda) and Mosaic (tpu) lowering via jax.export, and a tiny MoE
train step with router_impl="pallas" against "xla".
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import export

from esjax.kernels.routing import kernel, ops, reference
from esjax.models import presets
from esjax.models.transformer import Transformer
from esjax.routing import router
from esjax.models.loss import lm_loss

# (order, score_fn, renormalize, scaling): every order and score function.
MODES = [
    ("topk_softmax", "softmax", False, 1.0),
    ("softmax_topk", "softmax", False, 1.0),
    ("softmax_topk", "softmax", True, 1.0),
    ("softmax_topk", "sigmoid", True, 2.5),
    ("softmax_topk", "sigmoid", False, 1.0),
]
# (tokens, experts, k): powers of two and not, k == E, one token, several kernel blocks.
SHAPES = [(1, 4, 1), (7, 3, 3), (16, 8, 2), (33, 12, 5), (64, 60, 4), (130, 64, 8),
          (40, 160, 6), (24, 256, 8)]


def _rng(*case):
  return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _logits(rng, t, e):
  """Random logits with exact ties, -0.0 next to +0.0, masked (-inf) experts and -inf rows."""
  x = np.round(rng.normal(size=(t, e)) * 2) / 2  # many exact ties, many zeros
  x = np.where((x == 0) & (rng.random((t, e)) < 0.5), -0.0, x)
  n_masked = rng.integers(0, e + 1, size=t)  # some rows keep fewer than k finite experts
  for row, n in enumerate(n_masked):
    x[row, rng.choice(e, size=n, replace=False)] = -np.inf
  return jnp.asarray(x, jnp.float32)


def _numpy_route(x, k, order, score_fn, renormalize, scaling):
  """Independent float64 routing: stable sort by (NaN first, -value, index)."""
  x = np.asarray(x, np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    if score_fn == "softmax":
      e = np.exp(x - x.max(-1, keepdims=True))
      probs = e / e.sum(-1, keepdims=True)
    else:
      probs = 1 / (1 + np.exp(-x))
    keys = x if order == "topk_softmax" else probs
    idx = np.stack([sorted(range(x.shape[1]), key=lambda j: (not np.isnan(r[j]),
                                                             -np.nan_to_num(r[j]), j))[:k]
                    for r in keys])
    picked = np.take_along_axis(keys, idx, -1)
    if order == "topk_softmax":
      w = np.exp(picked - picked[:, :1])
      w = w / w.sum(-1, keepdims=True)
    else:
      w = picked / (picked.sum(-1, keepdims=True) + 1e-20) if renormalize else picked
  return w * scaling, idx


def _check_same(got, want, counts, n_experts):
  np.testing.assert_array_equal(got.indices, want.indices)
  np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got.probs, want.probs, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(counts, router.expert_counts(want.indices, n_experts))
  idx = np.asarray(got.indices)
  assert all(len(set(r)) == len(r) for r in idx), "an expert chosen twice"


def _all_modes(route_fn, xs, k):
  """route_fn on xs[i] in MODES[i], under one jit (one compile per shape keeps tests fast)."""
  @jax.jit
  def run(xs):
    return [route_fn(x, k, score_fn=f, order=o, renormalize=r, scaling=s)
            for x, (o, f, r, s) in zip(xs, MODES)]
  return run(xs)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape):
  t, e, k = shape
  xs = [_logits(_rng(shape, case), t, e) for case in range(len(MODES))]
  got = _all_modes(ops.route_with_counts, xs, k)
  want = _all_modes(reference.route, xs, k)
  for (g, counts), w in zip(got, want):
    _check_same(g, w, counts, e)


@pytest.mark.parametrize("backend", kernel.BACKENDS)
def test_both_layouts_and_small_blocks(backend):
  """Mosaic layout (no expert/k padding) and many blocks with a ragged last one."""
  shapes = [(45, 20, 3), (29, 7, 7), (17, 130, 2), (8, 9, 1), (70, 16, 4)]
  xs = [_logits(_rng(backend, case), t, e) for case, (t, e, _) in enumerate(shapes)]

  @jax.jit
  def run(xs):
    return [kernel.route_topk(x, k, score_fn=f, order=o, renormalize=r, scaling=s,
                              backend=backend, interpret=True, block_tokens=8)
            for x, (_, _, k), (o, f, r, s) in zip(xs, shapes, MODES)]

  for (w, i, c), x, (_, e, k), (o, f, r, s) in zip(run(xs), xs, shapes, MODES):
    want = reference.route(x, k, score_fn=f, order=o, renormalize=r, scaling=s)
    np.testing.assert_array_equal(i, want.indices)
    np.testing.assert_allclose(w, want.weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(c, router.expert_counts(want.indices, e))


def test_reference_semantics_match_float64_loop():
  """Ties to the lowest index, -0.0 == +0.0, NaN above +inf: the reference and the kernel."""
  rows = [[1, 3, 3, 0, 3, 2, 2, 2], [0, -0.0, 0, -0.0, -1, -1, -1, -1],
          [1, np.nan, 2, np.nan, -np.inf, 0, 0, 0], [-np.inf] * 6 + [0, -0.0],
          [np.inf, 1, 1, 1, 1, 1, 1, 1], [-np.inf] * 8]
  xs = [jnp.asarray(rows, jnp.float32)] * len(MODES)
  got = _all_modes(ops.route, xs, 4)
  want = _all_modes(reference.route, xs, 4)
  for g, w, (o, f, r, s) in zip(got, want, MODES):
    want_w, want_i = _numpy_route(xs[0], 4, o, f, r, s)
    for routing in (g, w):
      np.testing.assert_array_equal(routing.indices, want_i)
      np.testing.assert_allclose(routing.weights, want_w, rtol=1e-6, atol=1e-7,
                                 equal_nan=True)
  np.testing.assert_array_equal(want[0].indices[0], [1, 2, 4, 5])


def test_nan_logits_route_deterministically_or_raise():
  x = np.array(jax.random.normal(jax.random.key(1), (12, 16)))
  x[3, [5, 9]] = np.nan
  x[7, :] = np.nan
  x = jnp.asarray(x)
  got = _all_modes(ops.route, [x] * len(MODES), 3)
  want = _all_modes(reference.route, [x] * len(MODES), 3)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g.indices, w.indices)
    np.testing.assert_allclose(g.weights, w.weights, rtol=1e-6, equal_nan=True)
  np.testing.assert_array_equal(got[0].indices[3], [5, 9, 0])
  np.testing.assert_array_equal(got[0].indices[7], [0, 1, 2])
  with pytest.raises(FloatingPointError, match="NaN router logits in 2 token rows"):
    ops.route(x, 3, checked=True)
  checked = jax.jit(lambda y: ops.route(y, 3, checked=True).indices)
  with pytest.raises(Exception, match="NaN router logits"):
    jax.block_until_ready(checked(x))
  clean = jnp.nan_to_num(x)
  np.testing.assert_array_equal(checked(clean), reference.route(clean, 3).indices)


def test_gradients_match_reference():
  t, e, k = 20, 12, 3
  rng = _rng("grad")
  x = jnp.asarray(rng.normal(size=(t, e)), jnp.float32)
  x = x.at[0].set(0.0).at[1, :4].set(-jnp.inf)  # zero logits still get a gradient
  cw = jnp.asarray(rng.normal(size=(t, k)), jnp.float32)
  cp = jnp.asarray(rng.normal(size=(t, e)), jnp.float32)

  def loss(route_fn, opts, y):
    r = route_fn(y, k, **opts)
    return jnp.sum(r.weights * cw) + jnp.sum(r.probs * cp)

  def grads(route_fn):
    return jax.jit(lambda y: [
        jax.grad(functools.partial(loss, route_fn, dict(
            order=o, score_fn=f, renormalize=r, scaling=s)))(y) for o, f, r, s in MODES])(x)

  for got, want, (o, f, r, s) in zip(grads(ops.route), grads(reference.route), MODES):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(got)) and np.abs(got[0]).sum() > 0
    # The reference itself against float64 central differences (rows without ties).
    opts = dict(order=o, score_fn=f, renormalize=r, scaling=s)
    x64 = np.asarray(x[2:4], np.float64)
    eps, i, j = 1e-4, 1, 7
    bump = np.zeros_like(x64)
    bump[i, j] = eps
    fd = (loss_np(x64 + bump, cw[2:4], cp[2:4], k, opts)
          - loss_np(x64 - bump, cw[2:4], cp[2:4], k, opts)) / (2 * eps)
    np.testing.assert_allclose(want[2 + i, j], fd, rtol=1e-3, atol=1e-5)


def loss_np(x, cw, cp, k, opts):
  """float64 value of the gradient test's loss for logits x (selection fixed by x)."""
  w, _ = _numpy_route(x, k, opts["order"], opts["score_fn"], opts["renormalize"],
                      opts["scaling"])
  x = np.asarray(x, np.float64)
  if opts["score_fn"] == "softmax":
    p = np.exp(x - x.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
  else:
    p = 1 / (1 + np.exp(-x))
    p = p / (p.sum(-1, keepdims=True) + 1e-20)
  return np.sum(w * np.asarray(cw)) + np.sum(p * np.asarray(cp))


@pytest.mark.parametrize("platform,marker", [("cuda", "__gpu$xla.gpu.triton"),
                                             ("tpu", "tpu_custom_call")])
def test_lowers_for_gpu_triton_and_tpu_mosaic(platform, marker):
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for (t, e, k), (order, score_fn, renorm, scale) in zip(
      [(4096, 256, 8), (100, 160, 6), (64, 8, 2), (24, 60, 4)], MODES):
    opts = dict(score_fn=score_fn, order=order, renormalize=renorm, scaling=scale)

    def step(x):
      r = ops.route(x, k, **opts)
      return r, jax.grad(lambda y: jnp.sum(ops.route(y, k, **opts).weights ** 2))(x)

    spec = jax.ShapeDtypeStruct((t, e), jnp.bfloat16 if e == 256 else jnp.float32)
    module = export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)(spec)
    text = module.mlir_module()
    assert marker in text, (platform, t, e, k)
    assert ("tpu_custom_call" in text) == (platform == "tpu")


def test_triton_layout_is_powers_of_two():
  for t, e, k in SHAPES + [(65536, 256, 8), (4096, 8, 2)]:
    lay = kernel.layout_for("triton", t, e, k)
    for n in (lay.block_tokens, lay.experts, lay.top_k):
      assert n & (n - 1) == 0, (t, e, k, lay)
    assert lay.tokens >= t and lay.experts >= e and lay.top_k >= k
    mos = kernel.layout_for("mosaic", t, e, k)
    assert mos.block_tokens % 8 == 0 and (mos.experts, mos.top_k) == (e, k)


def test_bad_input_names_the_value():
  x = jnp.zeros((4, 8))
  with pytest.raises(ValueError, match="top_k=9"):
    ops.route(x, 9)
  with pytest.raises(ValueError, match="order='top'"):
    ops.route(x, 2, order="top")
  with pytest.raises(ValueError, match="got 'sigmoid'"):
    ops.route(x, 2, score_fn="sigmoid", order="topk_softmax")
  with pytest.raises(ValueError, match="block_tokens=12"):
    kernel.route_topk(x, 2, block_tokens=12, interpret=True)


@pytest.mark.parametrize("name,overrides", [
    ("tiny-mixtral", dict(n_layers=1)),
    pytest.param("tiny-qwen2-moe", dict(score_fn="sigmoid", renormalize=True,
                                        routed_scaling=2.5, z_loss_coef=1e-3),
                 marks=pytest.mark.slow),
])
def test_moe_train_step_pallas_equals_xla(name, overrides):
  cfg = presets.get_preset(name, **{"n_layers": 2, **overrides})
  tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, cfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  tx = optax.sgd(0.1)  # adam's g/sqrt(v) would amplify float noise in ~0 grads

  def train_step(impl):
    model = Transformer(cfg.replace(router_impl=impl), nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params):
      def loss_fn(p):
        return lm_loss(nnx.merge(graphdef, p, rest), batch)
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, _ = tx.update(grads, tx.init(params), params)
      return loss, metrics, grads, optax.apply_updates(params, updates)

    return step(params)

  got, want = train_step("pallas"), train_step("xla")
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1]["expert_load"], want[1]["expert_load"])
  for tree_got, tree_want in zip(got[2:], want[2:]):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 tree_got, tree_want)
  router_grad = want[2]["layers"][cfg.moe_layers[0]]["mlp"]["router"]
  assert np.abs(np.asarray(router_grad[...])).sum() > 0


@pytest.mark.gpu_only
@pytest.mark.parametrize("experts,top_k,order", [(8, 2, "topk_softmax"), (64, 8, "softmax_topk"),
                                                 (256, 8, "softmax_topk")])
def test_triton_kernel_on_gpu_equals_reference(experts, top_k, order):
  """On a GPU (JAX_PLATFORMS=cuda pytest -m gpu_only): the kernel compiled by Triton (no
  interpreter) gives the reference's experts and weights, and its gradient."""
  logits = jax.random.normal(jax.random.key(experts), (4096, experts), jnp.float32)
  kwargs = dict(order=order, renormalize=order == "softmax_topk")
  got = jax.jit(lambda x: ops.route(x, top_k, interpret=False, **kwargs))(logits)
  want = jax.jit(lambda x: router.route(x, top_k, **kwargs))(logits)
  np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
  np.testing.assert_allclose(np.asarray(got.weights), np.asarray(want.weights), rtol=1e-6)
  grad = jax.grad(lambda x, f: jnp.sum(f(x).weights ** 2), argnums=0)
  g_got = jax.jit(lambda x: grad(x, lambda y: ops.route(y, top_k, interpret=False, **kwargs)))
  g_want = jax.jit(lambda x: grad(x, lambda y: router.route(y, top_k, **kwargs)))
  np.testing.assert_allclose(np.asarray(g_got(logits)), np.asarray(g_want(logits)),
                             rtol=1e-5, atol=1e-7)
