"""Backward units from stored residuals (esjax.parallel.residuals) against `jax.vjp` run in
one piece, and what the stash holds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from esjax.configs import common, tiny
from esjax.parallel import residuals
from esjax.parallel.schedule import make_schedule
from esjax.plan import dryrun, hlo, targets

D, L, B = 8, 3, 4


def _layers(params, x, mask):
  """A scan of tanh layers (weights as the scan's xs) and a masked objective."""
  def body(h, w):
    return jnp.tanh(h @ w["w"] + w["b"]), None
  h, _ = lax.scan(body, x, params)
  return (h, jnp.sum(h * mask)), jnp.mean(h)


def _params(key):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (L, D, D)) / np.sqrt(D),
          "b": jax.random.normal(k2, (L, D))}


@pytest.mark.parametrize("remat", [False, True])
def test_stored_pullback_equals_vjp(remat):
  """Forward with residuals into slot 1 of a 3-slot stash, the other slots holding another
  unit's residuals; the backward from the stash gives jax.vjp's gradients and aux."""
  fn = jax.checkpoint(_layers) if remat else _layers
  params = _params(jax.random.key(0))
  x, x_other = jax.random.normal(jax.random.key(1), (2, B, D))
  mask = (jnp.arange(B * D).reshape(B, D) % 3 > 0).astype(jnp.float32)
  dy = jax.random.normal(jax.random.key(2), (B, D))

  @jax.jit
  def stored(params, x, x_other, dy):
    f = lambda p, x: fn(p, x, mask)  # noqa: E731  (mask: a closed-over constant)
    layout = residuals.Residuals.of(f, params, x)
    stash = layout.empty(3)
    for slot, xs in ((0, x_other), (1, x), (2, x_other)):
      out, aux, found = residuals.vjp(f, params, xs)
      stash = layout.put(stash, jnp.int32(slot), layout.leaves(found))
      if slot == 1:
        kept = (out, aux)
    pull = layout.pullback(stash, jnp.int32(1), params)
    return kept, pull(layout.cotangent((dy, 2.0)))

  (out, aux), (dp, dx) = stored(params, x, x_other, dy)
  ref_out, ref_pull, ref_aux = jax.vjp(lambda p, x: _layers(p, x, mask), params, x,
                                       has_aux=True)
  ref_dp, ref_dx = ref_pull((dy, jnp.float32(2.0)))
  np.testing.assert_allclose(out[1], ref_out[1], rtol=1e-6)
  np.testing.assert_allclose(aux, ref_aux, rtol=1e-6)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-6)
  for k in ("w", "b"):
    np.testing.assert_allclose(dp[k], ref_dp[k], rtol=1e-5, atol=1e-6)


def test_the_stash_holds_activations_not_weights():
  """The weights the pullback reads are the unit's own parameters: passed again by the
  backward unit, not stored per slot. Without remat the scan keeps per-layer activations
  ([L, B, D]); under remat only the input."""
  params = _params(jax.random.key(0))
  x = jnp.ones((B, D))
  mask = jnp.ones((B, D))
  f = lambda p, x: _layers(p, x, mask)  # noqa: E731
  layout = residuals.Residuals.of(f, params, x)
  assert any(s is not None for s in layout.sources)  # the weights, by reference
  assert all(a.shape[-2:] != (D, D) for a in layout.stored)
  assert any(a.shape == (L, B, D) for a in layout.stored)
  remat = residuals.Residuals.of(jax.checkpoint(f), params, x)
  stored_bytes = sum(a.size * a.dtype.itemsize for a in remat.stored)
  assert stored_bytes <= x.size * 4 + mask.size * 4


def test_a_trace_with_other_residuals_is_refused():
  """A unit whose residuals do not match the reference trace fails at trace time."""
  params = _params(jax.random.key(0))
  x = jnp.ones((B, D))
  layout = residuals.Residuals.of(lambda p, x: _layers(p, x, jnp.ones((B, D))), params, x)
  found = residuals.vjp(lambda p, x: _layers(p, x[:2], jnp.ones((2, D))), params, x)[2]
  with pytest.raises(AssertionError, match="residuals differ from the reference trace"):
    layout.leaves(found)


def bf16_moe_pipeline(remat: str):
  """The tiny MoE in bf16 at pp2 x ep2 (4 devices, 4 microbatches), chunked attention."""
  c = tiny.get_config("moe")
  c.model.dtype, c.model.remat, c.model.attention_impl = "bfloat16", remat, "chunked"
  c.train.batch_size, c.train.seq_len = 8, 32
  c.parallel.update(pp=2, ep=2, microbatches=4)
  return c


def compiled_stash(hlo_text: str, slots: int) -> list[tuple[str, tuple[int, ...], int]]:
  """(dtype, dims, bytes) of the tick loop's arrays with one row per stash slot: those of the
  while loop that carries the most such bytes."""
  loops = [m.group(2) for m in map(hlo.INSTR.match, hlo_text.splitlines())
           if m and m.group(3) == "while"]
  per_loop = [[(dt, d, b) for (dt, d), b in zip(hlo.dims(shape), hlo.shape_bytes(shape))
               if d[:1] == (slots,)] for shape in loops]
  return max(per_loop, key=lambda arrays: sum(b for *_, b in arrays))


def test_the_pipeline_stash_of_a_bf16_moe_holds_no_float32_or_mask_copy_of_the_tokens():
  """The compiled step of a bf16 MoE at pp2 x ep2 (remat none): no leaf of the stash (the
  tick loop's arrays with one row per slot) is float32 or boolean with as many elements per
  layer as the chunk's tokens x d_model. RMSNorm keeps x and 1/rms, the router and the
  combine keep bf16 operands (their float32 einsums recast them), and the EP scatter has
  unique indices (repeated ones made autodiff keep an [assignments, D] mask)."""
  c = bf16_moe_pipeline("none")
  r = dryrun.plan(c, targets.get("cpu"), 4)
  slots = make_schedule("1f1b", 2, 4).slots
  cfg = common.model_config(c)
  tokens = c.train.batch_size // 2 // 4 * c.train.seq_len  # one microbatch of a dp rank
  layers = cfg.n_layers // 2
  stash = [(dt, d) for dt, d, _ in compiled_stash(r.hlo, slots)]
  assert any(dt == "bf16" for dt, _ in stash)  # the residuals are there
  wide = [(dt, d) for dt, d in stash
          if dt in ("f32", "pred") and math.prod(d) >= slots * layers * tokens * cfg.d_model]
  assert not wide, wide
