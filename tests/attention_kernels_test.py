"""Attention kernels (esjax/kernels/attention) against the plain reference and float64 numpy:
values and dq/dk/dv for GQA, padding, permuted positions, sliding windows, KV-cache shapes;
the (out, lse) block kernel and its merge (ring CP); cuDNN lowered for CUDA with jax.export;
a tiny model with each implementation."""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from esjax.kernels.attention import causal_blocks, chunked, cudnn, ops, reference
from esjax.models import Transformer
from esjax.models.cache import init_cache
from esjax.models.config import ModelConfig
from esjax.models.presets import get_preset

# name -> (B, Sq, Sk, H, KV, hd, positions, padding, sliding_window)
CASES = {
    "gqa-plain-window": (1, 64, 64, 4, 2, 16, "plain", False, 9),
    "mqa-permuted": (2, 37, 37, 4, 1, 8, "permuted", False, 0),
    "padding-permuted-window": (2, 40, 40, 4, 2, 8, "permuted", True, 5),
    "cache-prefill": (2, 5, 24, 4, 2, 8, "cache", True, 0),
    "cache-decode-window": (3, 1, 19, 4, 2, 8, "cache", True, 4),
}
BLOCKS = dict(block_q=16, block_k=8)  # several blocks, uneven last blocks


def _rng(*case):
  return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _case(name):
  """q, k, v, q_pos, k_pos, k_valid (or None), window and a weight w for the loss sum(o*w),
  zero on queries that see no key (their output differs by design: see chunked.py)."""
  b, sq, sk, h, g, hd, order, padding, window = CASES[name]
  rng = _rng(name)
  q = rng.normal(size=(b, sq, h, hd))
  k, v = (rng.normal(size=(b, sk, g, hd)) for _ in range(2))
  if order == "plain":
    k_pos = q_pos = np.broadcast_to(np.arange(sq), (b, sq))
  elif order == "permuted":
    k_pos = q_pos = np.stack([rng.permutation(sq) for _ in range(b)])
  else:  # cache: slots hold positions 0.. (some rows left-padded with -1), queries the last
    k_pos = np.stack([np.arange(sk) - rng.integers(0, sk // 2) for _ in range(b)])
    k_pos = np.where(k_pos >= 0, k_pos, -1)
    q_pos = k_pos[:, sk - sq:]
  k_valid = (rng.random((b, sk)) < 0.7) & (k_pos >= 0) if padding else None
  mask = _numpy_mask(q_pos, k_pos, k_valid, window)
  w = rng.normal(size=(b, sq, h, hd)) * mask.any(-1)[:, :, None, None]
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  valid = None if k_valid is None else jnp.asarray(k_valid)
  return f32(q), f32(k), f32(v), i32(q_pos), i32(k_pos), valid, window, f32(w), mask


def _numpy_mask(q_pos, k_pos, k_valid, window):
  d = np.asarray(q_pos)[:, :, None] - np.asarray(k_pos)[:, None, :]
  mask = (d >= 0) & ((d < window) if window else True)
  return mask & (True if k_valid is None else np.asarray(k_valid)[:, None, :])


def _numpy_attention(q, k, v, mask):
  """float64 softmax attention, GQA by repeating the KV heads; rows that see no key: 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask[:, None], s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _out_and_grads(fn, q, k, v, q_pos, k_pos, k_valid, window, w):
  """fn's output and the gradient of sum(out * w) in q, k, v (jitted)."""
  def run(q, k, v, q_pos, k_pos, k_valid, w):
    out = lambda q, k, v: fn(q, k, v, q_pos, k_pos, k_valid, sliding_window=window)
    return out(q, k, v), jax.grad(lambda *a: jnp.sum(out(*a) * w), (0, 1, 2))(q, k, v)
  return jax.jit(run)(q, k, v, q_pos, k_pos, k_valid, w)


def _assert_close(got, want, names=("o", "dq", "dk", "dv")):
  for name, a, e in zip(names, got, want):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(e))),
                               err_msg=name)


@pytest.mark.parametrize("name", CASES)
def test_xla_reference_equals_float64_numpy(name):
  q, k, v, q_pos, k_pos, k_valid, window, _, mask = _case(name)
  got = jax.jit(reference.xla_attention, static_argnames="sliding_window")(
      q, k, v, q_pos, k_pos, k_valid, sliding_window=window)
  seen = mask.any(-1)  # the reference averages all values where a query sees nothing
  np.testing.assert_allclose(np.asarray(got)[seen], _numpy_attention(q, k, v, mask)[seen],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_chunked_equals_xla_values_and_grads(name):
  q, k, v, q_pos, k_pos, k_valid, window, w, mask = _case(name)
  args = (q, k, v, q_pos, k_pos, k_valid, window, w)
  want = _out_and_grads(reference.xla_attention, *args)
  fn = lambda *a, **kw: chunked.chunked_attention(*a, **kw, **BLOCKS)
  got = _out_and_grads(fn, *args)
  seen = mask.any(-1)[:, :, None, None]
  _assert_close([got[0] * seen, *got[1]], [want[0] * seen, *want[1]])
  np.testing.assert_array_equal(np.asarray(got[0])[~mask.any(-1)], 0.0)


def _block_reference(q, k, v, q_pos, k_pos, window):
  """(out, lse) from the whole masked logits (every query sees a key here)."""
  b, sq, h, hd = q.shape
  g = k.shape[2]
  qg = q.reshape(b, sq, g, h // g, hd)
  s = jnp.einsum("bqgrd,bkgd->bqgrk", qg, k) * hd ** -0.5
  mask = reference.visible(q_pos, k_pos, None, window)[:, :, None, None]
  s = jnp.where(mask, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, -1)
  out = jnp.einsum("bqgrk,bkgd->bqgrd", jnp.exp(s - lse[..., None]), v)
  return out.reshape(b, sq, h, hd), lse.reshape(b, sq, h)


@pytest.mark.parametrize("seq,window", [(1, 0), (15, 0), (37, 9), (64, 0), (130, 40)])
def test_causal_blocks_equal_float64_numpy_values_and_xla_grads(seq, window):
  """Plain positions, the upper triangle (and keys behind a window) skipped: the output
  against float64 numpy, the gradients against the plain path's whole masked logits."""
  rng = _rng("causal-blocks", seq, window)
  b, h, g, hd = 2, 4, 2, 8
  q, w = (jnp.asarray(rng.normal(size=(b, seq, h, hd)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, seq, g, hd)), jnp.float32) for _ in range(2))
  pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))
  blocks = lambda q, k, v, *_, sliding_window: causal_blocks.causal_blocks_attention(
      q, k, v, sliding_window=sliding_window)
  got = _out_and_grads(blocks, q, k, v, pos, pos, None, window, w)
  want = _out_and_grads(reference.xla_attention, q, k, v, pos, pos, None, window, w)
  np.testing.assert_allclose(got[0], _numpy_attention(q, k, v, _numpy_mask(pos, pos, None,
                                                                           window)),
                             rtol=1e-5, atol=1e-5)
  _assert_close([got[0], *got[1]], [want[0], *want[1]])


@pytest.mark.parametrize("seq", [1, 15, 16, 37, 128, 256, 1000])
def test_causal_block_edges(seq):
  edges = causal_blocks.block_edges(seq)
  sizes = np.diff(edges)
  assert edges[0] == 0 and edges[-1] == seq and np.all(sizes > 0)
  assert len(sizes) <= causal_blocks.MAX_BLOCKS
  assert len(sizes) == 1 or sizes.min() >= causal_blocks.MIN_ROWS
  assert sizes.max() - sizes.min() <= 1


def test_causal_blocks_compile_to_fewer_flops():
  """What the split is for, read from the compiled programs (forward + backward, seq 256):
  query block i multiplies its rows by keys 0 .. e_(i+1), not by all S."""
  b, s, h, hd = 2, 256, 4, 32
  x = jax.ShapeDtypeStruct((b, s, h, hd), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

  def flops(fn):
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2)))
    return step.lower(x, x, x).compile().cost_analysis()["flops"]

  whole = flops(lambda q, k, v: reference.xla_attention(q, k, v, pos, pos))
  blocks = flops(lambda q, k, v: causal_blocks.causal_blocks_attention(q, k, v))
  # The gradient alone: QK forward, and dP, dV, dQ, dK backward (the PV forward is dead).
  matmuls = 5 * 2 * b * h * s * s * hd
  edges = causal_blocks.block_edges(s)
  kept = sum((e1 - e0) * e1 for e0, e1 in zip(edges[:-1], edges[1:])) / s ** 2
  assert len(edges) > 2 and kept < 1
  assert whole >= matmuls
  assert blocks <= whole - (1 - kept) * matmuls * 0.95, (blocks, whole, kept)


def test_plain_positions_route_to_causal_blocks_and_match_given_positions():
  """The model's attention with positions None (plain) equals it with the same positions
  given, for the plain kernel, the chunked kernel and a sliding window; ops.attend sends
  plain positions to the block split."""
  tokens = jnp.asarray(_rng("plain-tokens").integers(0, 256, (2, 40)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
  for impl, window in (("xla", 0), ("xla", 6), ("chunked", 6)):
    cfg = get_preset("tiny-llama", n_layers=1, attention_impl=impl, sliding_window=window)
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    run = lambda p, positions: nnx.merge(graphdef, p, rest)(tokens, positions)[0]  # noqa
    loss = lambda p, positions: jnp.mean(run(p, positions) ** 2)  # noqa: E731
    plain = jax.jit(lambda p: (run(p, None), jax.grad(loss)(p, None)))(params)
    given = jax.jit(lambda p: (run(p, pos), jax.grad(loss)(p, pos)))(params)
    _assert_close(jax.tree.leaves(plain), jax.tree.leaves(given),
                  [f"{impl}-{window}"] * len(jax.tree.leaves(plain)))
  with pytest.raises(ValueError, match="needs the tokens' positions"):
    model.layers[0].attn(jnp.zeros((2, 4, cfg.d_model)), None, init_cache(cfg, 2, 8)[0])
  q = jnp.zeros((1, 64, 2, 8))
  text = jax.jit(lambda q: ops.attend(q, q, q, pos[:1, :1], pos[:1, :1], impl="xla",
                                      plain_positions=True)).lower(q).as_text()
  assert text.count("dot_general") == 2 * len(np.diff(causal_blocks.block_edges(64)))


def test_attention_block_lse_and_its_gradient():
  """The ring differentiates through lse too: (out, lse) and the VJP of sum(out*w + lse*u)."""
  q, k, v, q_pos, k_pos, _, window, w, _ = _case("padding-permuted-window")
  u = jnp.asarray(_rng("u").normal(size=q.shape[:3]), jnp.float32)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(out * w) + jnp.sum(lse * u), (out, lse)

  ref = lambda q, k, v: _block_reference(q, k, v, q_pos, k_pos, window)
  blk = lambda q, k, v: chunked.attention_block(q, k, v, q_pos, k_pos, sliding_window=window,
                                                **BLOCKS)
  want_g, want = jax.grad(lambda *a: loss(ref, *a), (0, 1, 2), has_aux=True)(q, k, v)
  got_g, got = jax.jit(jax.grad(lambda *a: loss(blk, *a), (0, 1, 2), has_aux=True))(q, k, v)
  _assert_close([*got, *got_g], [*want, *want_g], ("o", "lse", "dq", "dk", "dv"))


def test_merge_of_two_key_sets_equals_attention_over_both():
  """Keys split in two (a query may see none of one part: lse = -inf there)."""
  q, k, v, q_pos, k_pos, _, _, w, _ = _case("mqa-permuted")
  part = jnp.asarray(_rng("part").random(k.shape[:2]) < 0.5)

  def both(q, k, v):
    blk = lambda valid: chunked.attention_block(q, k, v, q_pos, k_pos, valid, **BLOCKS)
    return chunked.merge(blk(part), blk(~part))[0]

  want = _out_and_grads(reference.xla_attention, q, k, v, q_pos, k_pos, None, 0, w)
  got = jax.jit(lambda *a: (both(*a), jax.grad(lambda *a: jnp.sum(both(*a) * w), (0, 1, 2))(
      *a)))(q, k, v)
  _assert_close([got[0], *got[1]], [want[0], *want[1]])


def test_query_that_sees_nothing_gets_zero_and_finite_grads():
  q, k, v, _, _, _, _, _, _ = _case("mqa-permuted")
  q_pos = jnp.full(q.shape[:2], -1, jnp.int32).at[:, 0].set(3)  # padding queries
  k_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
  fn = lambda q, k, v: chunked.chunked_attention(q, k, v, q_pos, k_pos, **BLOCKS)
  out, grads = jax.jit(lambda *a: (fn(*a), jax.grad(lambda *a: jnp.sum(fn(*a) ** 2),
                                                    (0, 1, 2))(*a)))(q, k, v)
  np.testing.assert_array_equal(out[:, 1:], 0.0)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_allclose(out[:, :1], reference.xla_attention(
      q[:, :1], k, v, q_pos[:, :1], k_pos), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order,window", [("plain", 0), ("plain", 20), ("permuted", 0),
                                          ("permuted", 7)])
def test_block_skipping_never_drops_a_visible_block(order, window):
  """`_live` is True wherever a block holds a visible (query, key) pair, and in plain causal
  order it is exactly that: the lower block triangle (and the band of a window)."""
  rng, s, bs = _rng(order, window), 64, 8
  pos = np.stack([np.arange(s) if order == "plain" else rng.permutation(s) for _ in range(2)])
  valid = rng.random((2, s)) < 0.9
  pos_, valid_ = jnp.asarray(pos, jnp.int32), jnp.asarray(valid)
  live = np.asarray(chunked._live(pos_, pos_, valid_, bs, bs, window))
  mask = _numpy_mask(pos, pos, valid, window).reshape(2, s // bs, bs, s // bs, bs)
  exact = mask.any((0, 2, 4))
  assert np.all(live >= exact)
  if order == "plain":
    np.testing.assert_array_equal(live, exact)
    assert live.sum() <= (s // bs) * (s // bs + 1) // 2  # at most the lower triangle


def _export_cuda(fn, *shapes):
  """fn lowered for CUDA; shapes: (shape, dtype) pairs or pytrees of ShapeDtypeStruct."""
  checks = [export.DisabledSafetyCheck.custom_call(c)
            for c in ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")]
  specs = [jax.ShapeDtypeStruct(*s) if isinstance(s, tuple) else s for s in shapes]
  return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*specs)


@pytest.mark.parametrize("plain,window", [(True, 0), (None, 64), (False, 0)])
def test_cudnn_lowers_for_cuda_forward_and_backward(monkeypatch, plain, window):
  """Lowered with jax.export for CUDA on this CPU machine (no cuDNN library here, so its
  version query is stubbed): the flash custom calls in both directions when the positions
  are plain; a runtime cond with the chunked kernel when unknown; chunked alone when not."""
  from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  b, s, h, g, hd = 2, 256, 8, 2, 64

  def step(q, k, v, pos):
    def fn(q, k, v):
      return cudnn.cudnn_attention(q, k, v, pos, pos, sliding_window=window,
                                   plain_positions=plain)
    return fn(q, k, v), jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), (0, 1, 2))(
        q, k, v)

  bf16 = jnp.bfloat16
  text = _export_cuda(step, ((b, s, h, hd), bf16), ((b, s, g, hd), bf16),
                      ((b, s, g, hd), bf16), ((b, s), jnp.int32)).mlir_module()
  calls = set(re.findall(r"custom_call @([^(]+)\(", text))
  flash = {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}
  assert (calls >= flash) == (plain is not False), calls
  assert ("stablehlo.while" in text) == (plain is not True)  # the chunked kernel's loops
  if window and plain is not False:
    assert f"sliding_window_length\\22: {window}" in text


@pytest.mark.parametrize("given", [False, True])
def test_model_without_positions_runs_cudnn_without_a_device_check(monkeypatch, given):
  """A model called without positions (the training loop's batches) tells cuDNN they are
  plain: the CUDA program has the flash calls and neither the order check's conditional nor
  the chunked fallback's loops; with positions given both stay."""
  from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  from esjax.sharding.plan import ParallelPlan  # pylint: disable=g-import-not-at-top
  cfg = get_preset("tiny-llama", n_layers=1, dtype="bfloat16", head_dim=64, max_seq_len=256)
  model = Transformer(cfg, nnx.Rngs(0), plan=ParallelPlan.single("gpu"))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(params, tokens, pos):
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens, pos if given else None)[
        0].astype(jnp.float32) ** 2)
    return jax.grad(loss)(params)

  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  text = _export_cuda(step, specs, ((2, 256), jnp.int32), ((2, 256), jnp.int32)).mlir_module()
  assert "__cudnn$fmhaSoftmaxBackward" in text
  assert ("stablehlo.case" in text) == given and ("stablehlo.while" in text) == given


@pytest.mark.gpu_only
@pytest.mark.parametrize("order,window", [("plain", 0), ("plain", 64), ("permuted", 0)])
def test_cudnn_on_gpu_equals_xla(order, window):
  """On a GPU (JAX_PLATFORMS=cuda pytest -m gpu_only): cuDNN (plain order) or its chunked
  fallback (permuted) against the plain path on the same bfloat16 operands."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  rng, (b, s, h, g, hd) = _rng(order, window), (2, 512, 8, 2, 64)
  bf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  q, k, v, w = bf(b, s, h, hd), bf(b, s, g, hd), bf(b, s, g, hd), bf(b, s, h, hd)
  pos = np.broadcast_to(np.arange(s), (b, s))
  pos = jnp.asarray(pos if order == "plain" else np.stack([rng.permutation(s)
                                                          for _ in range(b)]), jnp.int32)
  got = _out_and_grads(cudnn.cudnn_attention, q, k, v, pos, pos, None, window, w)
  want = _out_and_grads(reference.xla_attention, q, k, v, pos, pos, None, window, w)
  for name, a, e in zip(("o", "dq", "dk", "dv"), [got[0], *got[1]], [want[0], *want[1]]):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    np.testing.assert_allclose(a, e, atol=3e-2 * float(np.max(np.abs(e))), err_msg=name)


def test_cudnn_falls_back_to_chunked_where_it_does_not_apply():
  q, k, v, q_pos, k_pos, _, window, w, _ = _case("gqa-plain-window")
  assert "dtypes" in cudnn.unsupported(q, k, v, None)  # float32
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  assert cudnn.unsupported(*bf, None) is None
  assert "k_valid" in cudnn.unsupported(*bf, jnp.ones(k.shape[:2], bool))
  assert "Sq" in cudnn.unsupported(bf[0][:, :3], *bf[1:], None)
  want = _out_and_grads(reference.xla_attention, q, k, v, q_pos, k_pos, None, window, w)
  got = _out_and_grads(cudnn.cudnn_attention, q, k, v, q_pos, k_pos, None, window, w)
  _assert_close([got[0], *got[1]], [want[0], *want[1]])
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8)) + 5
  assert bool(cudnn.plain_order(pos, pos))
  assert not bool(cudnn.plain_order(pos, pos[:, ::-1]))
  assert not bool(cudnn.plain_order(pos[:, ::-1], pos[:, ::-1]))


def test_resolve_and_config_validation():
  x = lambda s: jnp.zeros((1, s, 2, 8))
  side = int(np.sqrt(ops.AUTO_CHUNKED_LOGITS["cpu"]))
  assert ops.resolve("auto", x(side), x(side), x(side)) == "chunked"
  assert ops.resolve("auto", x(side // 2), x(side // 2), x(side // 2)) == "xla"
  assert ops.resolve("auto", x(1), x(side), x(side)) == "xla"  # decoding one token
  assert ops.resolve("xla", x(side), x(side), x(side)) == "xla"
  with pytest.raises(ValueError, match="flash"):
    ops.resolve("flash", x(1), x(1), x(1))
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    ModelConfig(attention_impl="flash")
  with pytest.raises(ValueError, match="sliding_window=-1"):
    ModelConfig(sliding_window=-1)


def test_tiny_model_chunked_equals_xla():
  """One-layer tiny-llama with a sliding window: logits, parameter gradients and KV-cache
  decoding (prefill, then one token) with the chunked kernel equal the plain path."""
  tokens = jnp.asarray(_rng("tokens").integers(0, 256, (2, 20)), jnp.int32)
  results = {}
  for impl in ("xla", "chunked"):
    cfg = get_preset("tiny-llama", n_layers=1, attention_impl=impl, sliding_window=6)
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens)[0] ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    step = nnx.jit(lambda m, t, c: m(t, cache=c)[::2])
    prefill, cache = step(model, tokens[:, :16], init_cache(cfg, 2, 24))
    decoded, _ = step(model, tokens[:, 16:17], cache)
    logits = nnx.jit(lambda m, t: m(t)[0])(model, tokens)
    results[impl] = (logits, jnp.concatenate([prefill, decoded], 1), jax.tree.leaves(grads))
  (lx, dx, gx), (lc, dc, gc) = results["xla"], results["chunked"]
  _assert_close([lc, dc, *gc], [lx, dx, *gx], ["logits", "decoded"] + ["grad"] * len(gx))
  np.testing.assert_allclose(dx, lx[:, :17], rtol=1e-5, atol=2e-5)  # cache == full forward
