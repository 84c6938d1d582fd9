"""The grouped-matmul kernels (esjax.kernels.gmm: Mosaic GPU, Triton, and megablox for TPUs),
run in Pallas' interpreters on the CPU, against float64 numpy loops over the groups' rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esjax.kernels.gmm import interpret as gmm_interpret, kernel, ops

TILES = kernel.Tiles(m=64, k=64, n=64, stages=2)
TRITON_TILES = kernel.Tiles(m=32, k=32, n=32, stages=2)


def _bf16(rng, *shape):
  """Normal values, rounded to bfloat16 (so float64 products of them are exact references)."""
  return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)


def _bounds(sizes):
  ends = np.cumsum(sizes)
  return ends - np.asarray(sizes), ends


@pytest.mark.parametrize("sizes,m", [([70, 0, 50], 192), ([64, 64], 128), ([0, 0, 0], 64),
                                     ([1, 127, 3, 0, 60], 256)])
def test_schedule_lists_each_group_block_pair_once(sizes, m):
  """Item by item, the (group, row block, row range) pairs a loop over groups and blocks
  gives; the count is theirs and no row past the groups is in an item."""
  want = []
  for g, (lo, hi) in enumerate(zip(*_bounds(sizes))):
    for block in range(m // TILES.m):
      start, end = max(lo, block * TILES.m), min(hi, (block + 1) * TILES.m)
      if start < end:
        want.append((g, block, start, end))
  got = jax.tree.map(np.asarray, kernel.schedule(jnp.asarray(sizes), m, TILES.m))
  assert got.count[0] == len(want) <= kernel.max_items(m, len(sizes), TILES.m)
  assert list(zip(got.group, got.block, got.start, got.end))[:len(want)] == want


def _reference(rows, sizes, wg, wu, wd, dy):
  """Output and gradients of the grouped SwiGLU in float64, one group's rows at a time."""
  x, wg, wu, wd, dy = (np.asarray(a, np.float64) for a in (rows, wg, wu, wd, dy))
  out, dx = np.zeros_like(x), np.zeros_like(x)
  dwg, dwu, dwd = np.zeros_like(wg), np.zeros_like(wu), np.zeros_like(wd)
  for g, (lo, hi) in enumerate(zip(*_bounds(sizes))):
    xg, dyg = x[lo:hi], dy[lo:hi]
    gate, up = xg @ wg[g], xg @ wu[g]
    sig = 1 / (1 + np.exp(-gate))
    h = gate * sig * up
    out[lo:hi] = h @ wd[g]
    dh = dyg @ wd[g].T
    d_gate = dh * up * sig * (1 + gate * (1 - sig))
    d_up = dh * gate * sig
    dx[lo:hi] = d_gate @ wg[g].T + d_up @ wu[g].T
    dwg[g], dwu[g], dwd[g] = xg.T @ d_gate, xg.T @ d_up, h.T @ dyg
  return out, (dx, dwg, dwu, dwd)


@pytest.mark.parametrize("backend", ["mosaic", "triton", "megablox"])
@pytest.mark.parametrize("sizes,n_rows", [([70, 0, 50], 150), ([0, 64, 64], 128)])
def test_swiglu_gmm_matches_a_loop_over_groups(sizes, n_rows, backend):
  """Forward and VJP at bfloat16 (float32 accumulation): rows past the groups (150 - 120
  here, NaN-free but nonzero) come back as zeros with zero gradients, an expert without rows
  gets zero weight gradients, and a row count that is not a multiple of the tile is padded."""
  rng = np.random.default_rng(0)
  d, f, g = (128, 256, len(sizes)) if backend == "megablox" else (64, 128, len(sizes))
  rows = _bf16(rng, n_rows, d)
  wg, wu, wd = _bf16(rng, g, d, f) * 0.2, _bf16(rng, g, d, f) * 0.2, _bf16(rng, g, f, d) * 0.2
  dy = _bf16(rng, n_rows, d)
  gs = jnp.asarray(sizes, jnp.int32)
  with gmm_interpret.transposes_supported() as interpret:
    opts = ops.Options(backend, tiles=TILES if backend == "mosaic" else TRITON_TILES,
                       interpret=interpret if backend == "mosaic" else True)
    out, pull = jax.vjp(lambda x, a, b, c: ops.swiglu_gmm(x, gs, a, b, c, opts),
                        rows, wg, wu, wd)
    grads = pull(dy)
  want_out, want_grads = _reference(rows, sizes, wg, wu, wd, dy)
  total = sum(sizes)
  np.testing.assert_array_equal(np.asarray(out[total:], np.float32), 0)
  np.testing.assert_array_equal(np.asarray(grads[0][total:], np.float32), 0)
  for got, want in zip((out, *grads), (want_out, *want_grads)):
    got = np.asarray(got, np.float64)
    scale = np.abs(want).max() + 1e-9
    assert np.abs(got - want).max() <= 2e-2 * scale, (np.abs(got - want).max(), scale)
  for i, size in enumerate(sizes):
    if size == 0:
      for dw in grads[1:]:
        np.testing.assert_array_equal(np.asarray(dw[i], np.float32), 0)


def test_declared_cost_counts_the_routed_row_blocks():
  """2 x tile rows x K x N per row block: the routed rows' blocks plus one per group, at most
  every block plus one per group boundary."""
  opts = ops.Options(tiles=TILES, expected_rows=300)
  assert ops._declared(opts, 1024, 4, 64, 128) == 2 * 64 * 64 * 128 * (5 + 4)
  assert ops._declared(ops.Options(tiles=TILES), 128, 4, 64, 128) == 2 * 64 * 64 * 128 * (2 + 3)


@pytest.mark.gpu_only
@pytest.mark.parametrize("shape", ["mixtral-8x7b", "qwen2-57b-a14b"])
def test_the_kernels_on_a_gpu_match_ragged_dot(shape):
  """On a GPU (JAX_PLATFORMS=cuda pytest -m gpu_only; Mosaic on Hopper, else Triton): the
  compiled kernels at the default tiles and the real expert shapes, forward and backward,
  within bfloat16 rounding of lax.ragged_dot (float32 accumulation both), with a quarter of
  the buffer past the groups."""
  from benchmarks import gmm as bench  # pylint: disable=g-import-not-at-top
  rows = bench.run(shape, buffer=1.25, rounds=1, opts=ops.Options(
      "mosaic" if jax.devices()[0].compute_capability == "9.0" else "triton"))
  assert rows[0]["impl"] == "gmm" and rows[0]["max_rel_diff_vs_ragged"] < 2e-2, rows[0]


@pytest.mark.parametrize("backend", ["mosaic", "triton"])
def test_the_kernels_lower_for_cuda_forward_and_backward(backend):
  """jax.export for CUDA on this CPU host runs each backend's own lowering (Mosaic GPU's
  layout inference and its wgmma/TMA ops; Triton's TTIR) at the default tiles: 3 kernels
  forward, 6 backward, and no other matmul."""
  opts = ops.Options(backend)
  s = jax.ShapeDtypeStruct

  def loss(x, wg, wu, wd, gs):
    return jnp.sum(ops.swiglu_gmm(x, gs, wg, wu, wd, opts).astype(jnp.float32))

  target = {"mosaic": "mosaic_gpu_v2", "triton": "__gpu$xla.gpu.triton"}[backend]
  exported = jax.export.export(
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(
          s((512, 256), jnp.bfloat16), s((4, 256, 512), jnp.bfloat16),
          s((4, 256, 512), jnp.bfloat16), s((4, 512, 256), jnp.bfloat16),
          s((4,), jnp.int32))
  text = exported.mlir_module()
  assert text.count(f"custom_call @{target}(") == 9
  assert "stablehlo.dot_general" not in text
