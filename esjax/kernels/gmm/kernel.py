"""Grouped matmuls on Hopper (Pallas on Mosaic GPU) whose work is the routed rows.

Rows `[M, ...]` are sorted by group with `group_sizes [G]`; rows past `sum(group_sizes)`
belong to no group (an EP receive buffer's unused tail). Two kernels:

- `gmm(lhs [M, K], rhs [G, K, N]) -> [M, N]`: out[r] = lhs[r] @ rhs[group(r)] (the forward
  products, and the input gradient with `transpose_rhs`: rhs [G, N, K]). The row tiles are
  scheduled outside the kernel (`schedule`): one work item per (group, row block) that holds
  rows of that group, so a block that straddles a boundary runs once per group and rows past
  the last group run nothing. Each item stores only its group's rows of the tile; rows of the
  output in no group are left unwritten (the caller masks them).
- `tgmm(lhs [M, K], rhs [M, N]) -> [G, K, N]`: out[g] = lhs[rows of g]^T @ rhs[rows of g]
  (the weight gradient). Each (group, output tile) runs over its group's row blocks only, with
  the rows of the neighbouring groups masked to zero in the first and last block.

Both are persistent kernels (one program per SM looping over the work). Tile sizes are
static: K, N multiples of the k and n blocks. `interpret` runs them on the CPU in Pallas' GPU
interpreter (the tests); `num_sms` is the target's (132: H100 SXM), given explicitly so a
deviceless compile on a host without a GPU traces the same kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Static tile sizes: rows per block (`m`, also the reduction block of `tgmm`), `k`, `n`,
  pipelined k steps in flight (`stages`) and output tiles per n-band of the snake order."""
  m: int = 128
  k: int = 64
  n: int = 128
  stages: int = 4
  band_n: int = 1


class Schedule(NamedTuple):
  """`gmm`'s work items, the first `count` of `group.shape[0]` used: item i multiplies rows
  [start[i], end[i]) of row block `block[i]` by group `group[i]`'s weights."""
  group: jax.Array  # [W] int32
  block: jax.Array  # [W] int32
  start: jax.Array  # [W] int32, absolute row
  end: jax.Array  # [W] int32
  count: jax.Array  # [1] int32


def max_items(m: int, n_groups: int, block_m: int) -> int:
  """Static bound on the work items: every block once, plus one per group boundary."""
  return pl.cdiv(m, block_m) + n_groups - 1


def schedule(group_sizes: jax.Array, m: int, block_m: int) -> Schedule:
  """The (group, row block) items of rows sorted into `group_sizes` [G] (sum <= m)."""
  n_groups = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // block_m
  n_blocks = jnp.where(sizes > 0, (ends - 1) // block_m - first + 1, 0)
  item_ends = jnp.cumsum(n_blocks)
  w = max_items(m, n_groups, block_m)
  item = jnp.arange(w, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(item_ends, item, side="right"), n_groups - 1)
  block = first[group] + item - (item_ends[group] - n_blocks[group])
  start = jnp.maximum(starts[group], block * block_m)
  end = jnp.minimum(ends[group], (block + 1) * block_m)
  return Schedule(group.astype(jnp.int32), block.astype(jnp.int32), start.astype(jnp.int32),
                  end.astype(jnp.int32), item_ends[-1:].astype(jnp.int32))


def group_blocks(group_sizes: jax.Array, block_m: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`tgmm`'s metadata per group [G] (int32): first row, end row, first row block and the
  number of row blocks that hold its rows (0 for an empty group)."""
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // block_m
  return starts, ends, first, jnp.where(sizes > 0, (ends + block_m - 1) // block_m - first, 0)


def gmm_shapes(lhs: jax.Array, rhs: jax.Array, tiles: Tiles, transpose_rhs: bool,
               band_n: int, whole_row_blocks: bool) -> tuple[int, int, int]:
  """(M, K, N) of a `gmm`, or a one-line error: lhs [M, K] times rhs [G, K, N] ([G, N, K]
  with `transpose_rhs`) in one dtype, K and N in whole tiles (N in bands of `band_n` tiles),
  and M in whole row blocks where the kernel reads rows without masks."""
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if rhs.shape[2 if transpose_rhs else 1] != k or lhs.dtype != rhs.dtype:
    raise ValueError(f"gmm: lhs {lhs.shape} {lhs.dtype} and rhs {rhs.shape} {rhs.dtype} "
                     f"(transpose_rhs={transpose_rhs}) do not multiply")
  if (whole_row_blocks and m % tiles.m) or k % tiles.k or n % (tiles.n * band_n):
    raise ValueError(f"gmm: M={m}, K={k} and N={n} must be multiples of the tiles {tiles}")
  return m, k, n


def tgmm_shapes(lhs: jax.Array, rhs: jax.Array, tiles: Tiles, band_n: int
                ) -> tuple[int, int, int]:
  """(M, K, N) of a `tgmm`, or a one-line error: lhs [M, K] and rhs [M, N] with the same
  rows and dtype, M, K and N in whole tiles (N in bands of `band_n` tiles)."""
  m, k = lhs.shape
  n = rhs.shape[1]
  if rhs.shape[0] != m or lhs.dtype != rhs.dtype:
    raise ValueError(f"tgmm: lhs {lhs.shape} {lhs.dtype} and rhs {rhs.shape} {rhs.dtype} "
                     "do not have the same rows")
  if m % tiles.m or k % tiles.k or n % (tiles.n * band_n):
    raise ValueError(f"tgmm: M={m}, K={k} and N={n} must be multiples of the tiles {tiles}")
  return m, k, n


def _store_rows(acc, o_gmem, row0: jax.Array, first: jax.Array, n_rows: jax.Array,
                col: jax.Array, block_m: int, block_n: int) -> None:
  """Writes rows [first, first + n_rows) of the [block_m, block_n] tile `acc` to
  o_gmem[row0 + first + i, col * block_n:]: TMA stores take static row counts, so the count
  is written in binary, one store per set bit, largest first."""

  @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), o_gmem.dtype))
  def _(o_smem):
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    offset = first
    bit = block_m
    while bit >= 1:
      @pl.when(n_rows & bit != 0)
      def _(offset=offset, bit=bit):
        plgpu.copy_smem_to_gmem(
            o_smem.at[pl.ds(offset, bit)],
            o_gmem.at[pl.ds(row0 + offset, bit), pl.ds(col * block_n, block_n)])
      offset = offset + (n_rows & bit)
      bit //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gmm(lhs: jax.Array, rhs: jax.Array, sched: Schedule, *, tiles: Tiles = Tiles(),
        transpose_rhs: bool = False, num_sms: int = H100_SMS, interpret: Any = None
        ) -> jax.Array:
  """out [M, N]: rows of each scheduled item times its group's rhs [K, N] (rhs [G, K, N], or
  [G, N, K] with `transpose_rhs`). Rows in no item are not written."""
  m, k, n = gmm_shapes(lhs, rhs, tiles, transpose_rhs, tiles.band_n, whole_row_blocks=False)
  w = sched.group.shape[0]
  grid_n = n // tiles.n
  bm, bk, bn = tiles.m, tiles.k, tiles.n

  def body(group_ref, block_ref, start_ref, end_ref, count_ref, lhs_gmem, rhs_gmem, o_gmem):
    @plgpu.nd_loop((w * grid_n,), collective_axes="sm")
    def _(info: plgpu.NDLoopInfo):
      item, ni = plgpu.planar_snake(info.index[0], (w, grid_n), 1, tiles.band_n)

      @pl.when(item < count_ref[0])
      def _():
        group, block = group_ref[item], block_ref[item]

        def product(acc_ref):
          plgpu.emit_pipeline(
              lambda _, a, b: plgpu.wgmma(
                  acc_ref, a, plgpu.transpose_ref(b, (1, 0)) if transpose_rhs else b),
              grid=(k // bk,),
              in_specs=[
                  plgpu.BlockSpec((bm, bk), lambda ki: (block, ki), delay_release=1),
                  plgpu.BlockSpec((bn, bk) if transpose_rhs else (bk, bn),
                                  (lambda ki: (ni, ki)) if transpose_rhs
                                  else (lambda ki: (ki, ni)), delay_release=1),
              ],
              max_concurrent_steps=tiles.stages,
          )(lhs_gmem, rhs_gmem.at[group])
          return acc_ref[...]

        acc = pl.run_scoped(product, plgpu.ACC((bm, bn)))
        row0 = block * bm
        _store_rows(acc, o_gmem, row0, start_ref[item] - row0,
                    end_ref[item] - start_ref[item], ni, bm, bn)

  run = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n), lhs.dtype), grid=(num_sms,),
      grid_names=("sm",), interpret=interpret,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return run(*sched, lhs, rhs)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiles: Tiles = Tiles(),
         num_sms: int = H100_SMS, interpret: Any = None) -> jax.Array:
  """out [G, K, N]: out[g] = lhs[rows of g]^T @ rhs[rows of g] (lhs [M, K], rhs [M, N]); a
  group without rows gets zeros. The rows are reduced in blocks of `tiles.m`."""
  _, k, n = tgmm_shapes(lhs, rhs, tiles, tiles.band_n)
  g = group_sizes.shape[0]
  bm, bk, bn = tiles.m, tiles.k, tiles.n
  grid_k, grid_n = k // bk, n // bn
  swizzle = plgpu.find_swizzle(min(bk, bn) * jnp.dtype(lhs.dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(lhs.dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))

  def body(starts_ref, ends_ref, first_ref, n_blocks_ref, lhs_gmem, rhs_gmem, o_gmem):
    @plgpu.nd_loop((g, grid_k * grid_n), collective_axes="sm")
    def _(info: plgpu.NDLoopInfo):
      gi = info.index[0]
      ki, ni = plgpu.planar_snake(info.index[1], (grid_k, grid_n), 1, tiles.band_n)
      first, count = first_ref[gi], n_blocks_ref[gi]
      lo, hi = starts_ref[gi], ends_ref[gi]

      def reduce(acc_ref):
        def step(index, a, b):
          # Rows of the first and last block that are not group gi's become zeros in `a`
          # (rows past the last group must be finite: zero times NaN is NaN).
          iota = lax.broadcasted_iota(jnp.int32, (bm, bk), 0)
          if interpret is None:  # the register layout of `a` (the interpreter has none)
            iota = plgpu.layout_cast(iota, plgpu.Layout.WGMMA)
          row = (first + index[0]) * bm + iota

          @pl.when((index[0] == 0) | (index[0] == count - 1))
          def _():
            a[...] = a[...] * ((row >= lo) & (row < hi)).astype(a.dtype)
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, plgpu.transpose_ref(a, (1, 0)), b)
          if tiles.stages == 1:
            plgpu.wgmma_wait(0)

        @pl.when(count > 0)
        def _():
          plgpu.emit_pipeline(
              step,
              grid=(count,),
              in_specs=[
                  plgpu.BlockSpec((bm, bk), lambda r: (first + r, ki),
                                  delay_release=1 if tiles.stages > 1 else 0,
                                  transforms=transforms),
                  plgpu.BlockSpec((bm, bn), lambda r: (first + r, ni),
                                  delay_release=1 if tiles.stages > 1 else 0,
                                  transforms=transforms),
              ],
              max_concurrent_steps=tiles.stages,
          )(lhs_gmem, rhs_gmem)
        return acc_ref[...]

      acc = pl.run_scoped(reduce, plgpu.ACC((bk, bn)))

      @functools.partial(pl.run_scoped,
                         o_smem=plgpu.SMEM((bk, bn), o_gmem.dtype, transforms=transforms))
      def _(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[gi, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  run = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((g, k, n), lhs.dtype), grid=(num_sms,),
      grid_names=("sm",), interpret=interpret,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return run(*group_blocks(group_sizes, bm), lhs, rhs)
