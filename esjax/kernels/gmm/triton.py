"""The grouped matmuls of `esjax.kernels.gmm.kernel` as Pallas Triton kernels: any NVIDIA GPU
Triton compiles for (Ampere and later), the same contract, schedule and work.

- `gmm`: a program per (work item, n tile) of the same `kernel.schedule`; items past the
  count exit at once, and the store is masked to the item's rows.
- `tgmm`: a program per (group, k tile, n tile) looping over its group's row blocks only,
  with loads masked to the group's rows (zeros elsewhere, so nothing past the groups is read
  into the product).

Tile sizes are powers of two (Triton's); K and N must be multiples of theirs, M of the row
tile. `interpret=True` runs them in the Pallas interpreter (the CPU tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from esjax.kernels.gmm.kernel import Schedule, Tiles, gmm_shapes, group_blocks, tgmm_shapes

TRITON_TILES = Tiles(m=64, k=32, n=64, stages=3)


def _params(tiles: Tiles):
  return pltriton.CompilerParams(num_warps=4, num_stages=tiles.stages)


def gmm(lhs: jax.Array, rhs: jax.Array, sched: Schedule, *, tiles: Tiles = TRITON_TILES,
        transpose_rhs: bool = False, interpret: bool = False) -> jax.Array:
  """out [M, N] = rows of each scheduled item times its group's rhs (see kernel.gmm)."""
  m, k, n = gmm_shapes(lhs, rhs, tiles, transpose_rhs, 1, whole_row_blocks=True)
  bm, bk, bn = tiles.m, tiles.k, tiles.n

  def body(group_ref, block_ref, start_ref, end_ref, count_ref, lhs_ref, rhs_ref, o_ref):
    item, ni = pl.program_id(0), pl.program_id(1)

    @pl.when(item < count_ref[0])
    def _():
      g, row0 = group_ref[item], block_ref[item] * bm

      def step(ki, acc):
        a = lhs_ref[pl.ds(row0, bm), pl.ds(ki * bk, bk)]
        if transpose_rhs:
          b = rhs_ref[g, pl.ds(ni * bn, bn), pl.ds(ki * bk, bk)].T
        else:
          b = rhs_ref[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)]
        return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

      acc = lax.fori_loop(0, k // bk, step, jnp.zeros((bm, bn), jnp.float32))
      rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
      mine = (rows >= start_ref[item]) & (rows < end_ref[item])
      pltriton.store(o_ref.at[pl.ds(row0, bm), pl.ds(ni * bn, bn)], acc.astype(o_ref.dtype),
                     mask=mine)

  return pl.pallas_call(
      body, out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
      grid=(sched.group.shape[0], n // bn), interpret=interpret,
      compiler_params=_params(tiles))(*sched, lhs, rhs)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
         tiles: Tiles = TRITON_TILES, interpret: bool = False) -> jax.Array:
  """out [G, K, N]: out[g] = lhs[rows of g]^T @ rhs[rows of g] (see kernel.tgmm)."""
  _, k, n = tgmm_shapes(lhs, rhs, tiles, 1)
  g = group_sizes.shape[0]
  bm, bk, bn = tiles.m, tiles.k, tiles.n

  def body(starts_ref, ends_ref, first_ref, n_blocks_ref, lhs_ref, rhs_ref, o_ref):
    gi, ki, ni = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi, first_block = starts_ref[gi], ends_ref[gi], first_ref[gi]

    def step(r, acc):
      row0 = (first_block + r) * bm
      rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
      mine = (rows >= lo) & (rows < hi)
      a = pltriton.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(ki * bk, bk)],
                        mask=jnp.broadcast_to(mine, (bm, bk)), other=0)
      b = pltriton.load(rhs_ref.at[pl.ds(row0, bm), pl.ds(ni * bn, bn)],
                        mask=jnp.broadcast_to(mine, (bm, bn)), other=0)
      return acc + jnp.dot(a.T, b, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, n_blocks_ref[gi], step, jnp.zeros((bk, bn), jnp.float32))
    o_ref[gi, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)] = acc.astype(o_ref.dtype)

  return pl.pallas_call(
      body, out_shape=jax.ShapeDtypeStruct((g, k, n), lhs.dtype),
      grid=(g, k // bk, n // bn), interpret=interpret,
      compiler_params=_params(tiles))(*group_blocks(group_sizes, bm), lhs, rhs)
