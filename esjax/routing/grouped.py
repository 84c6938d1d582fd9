"""Grouped expert compute over rows sorted by group: `lax.ragged_dot`, or blocked for the CPU.

`rows [N, D]` are sorted by group (expert) with `group_sizes [G]`; rows past
`sum(group_sizes)` belong to no group and come back as zeros. Rows of group `g` go through
group `g`'s weights.

`swiglu_ragged` uses `lax.ragged_dot`: native on GPU/TPU, but XLA:CPU runs it ~10x slower
than a dense matmul of the same FLOPs. `swiglu_blocked` is the CPU path, the megablox
layout: each group is padded to a multiple of `block` rows in a buffer of static size
`max_tiles(N, G, block) * block`, so no row is ever dropped. Each group's padded rows are cut
into as many chunks of the largest size as fit and the rest in one chunk (large experts:
sizes `block`, `2 * block`, ..., `8 * block`) or in its binary digits (small experts: sizes
`block * 2^j`), so the matmuls are as large as the group allows while the padding stays
below `block` rows per group; a loop per chunk size runs each chunk through its group's
whole SwiGLU as 2-D matmuls, which XLA:CPU runs at dense-matmul speed. Trip counts are
dynamic (only chunks that hold rows run) and the VJP is written by hand: the backward loops
recompute nothing, accumulate the weight gradients in place, and the row permutations are
gathers both ways.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from esjax.sharding import collectives as col


# Row permutations with a gather in both directions (autodiff would scatter-add backward).


@jax.custom_vjp
def take_rows(x: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
  """out[r] = x[idx[r]], or zeros where idx[r] is out of range.

  `idx` must be one-to-one on its in-range entries and `inv` its inverse: inv[idx[r]] = r,
  and out of range for rows of x that no output row takes. The backward pass is then the
  gather `take_rows(g, inv, idx)` instead of a scatter-add.
  """
  return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x, idx, inv):
  return take_rows(x, idx, inv), (idx, inv, x[:0])  # x[:0]: x's type for the cotangent


def _take_rows_bwd(res, g):
  idx, inv, x = res
  return col.like_primal(jnp.take(g, inv, axis=0, mode="fill", fill_value=0), x), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _ragged(rows: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  return jax.lax.ragged_dot(rows, w.astype(rows.dtype), group_sizes)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * up


@jax.custom_vjp
def swiglu_ragged(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
                  w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Grouped SwiGLU with lax.ragged_dot; w_gate, w_up [G, D, F], w_down [G, F, D].

  Its backward keeps the rows and the gate and up products ([N, F] each) and recomputes the
  activation (elementwise): autodiff alone keeps six [N, F] arrays (sigmoid, silu, their
  product, ...), which in a pipeline stash or under remat=none is most of a MoE layer's
  memory."""
  return _ragged(_swiglu(_ragged(rows, w_gate, group_sizes),
                         _ragged(rows, w_up, group_sizes)), w_down, group_sizes)


def _swiglu_ragged_fwd(rows, group_sizes, w_gate, w_up, w_down):
  gate, up = _ragged(rows, w_gate, group_sizes), _ragged(rows, w_up, group_sizes)
  out = _ragged(_swiglu(gate, up), w_down, group_sizes)
  return out, (rows, group_sizes, w_gate, w_up, w_down, gate, up)


def _swiglu_ragged_bwd(res, dy):
  rows, group_sizes, w_gate, w_up, w_down, gate, up = res
  product = functools.partial(_ragged, group_sizes=group_sizes)
  h, act_pull = jax.vjp(_swiglu, gate, up)
  dh, d_down = jax.vjp(product, h, w_down)[1](dy)
  d_gate, d_up = act_pull(dh)
  dx_g, dw_gate = jax.vjp(product, rows, w_gate)[1](d_gate)
  dx_u, dw_up = jax.vjp(product, rows, w_up)[1](d_up)
  grads = (dx_g + dx_u, dw_gate, dw_up, d_down)
  rows_g, wg, wu, wd = (col.like_primal(g, p) for g, p in
                        zip(grads, (rows, w_gate, w_up, w_down)))
  return rows_g, None, wg, wu, wd


swiglu_ragged.defvjp(_swiglu_ragged_fwd, _swiglu_ragged_bwd)


# Weights per expert matrix from which `swiglu_blocked` runs one chunk per expert (up to 8
# blocks) instead of binary chunks: the vs_maxtext MoE (256 x 512) and larger.
LARGE_EXPERT = 1 << 16


class Chunks(NamedTuple):
  """Chunks of one size: the first `count` entries are used."""
  start: jax.Array  # [bound] int32 first padded row
  group: jax.Array  # [bound] int32
  count: jax.Array  # int32 scalar


class TileLayout(NamedTuple):
  """Rows sorted by group <-> the padded buffer, and the chunks that cover the groups."""
  src: jax.Array  # [n_pad] int32: row feeding each padded row (N: padding)
  dest: jax.Array  # [N] int32: padded row of each row (n_pad: in no group)
  chunks: tuple[Chunks, ...]  # one per size in `sizes`
  sizes: tuple[int, ...]  # static chunk sizes, ascending


def max_tiles(n_rows: int, n_groups: int, block: int) -> int:
  """Static bound on sum_g ceil(size_g / block) over all group sizes summing to <= n_rows."""
  return max(1, (n_rows + n_groups * (block - 1)) // block)


def chunk_sizes(n_pad: int, block: int, max_chunk: int, every_multiple: bool
                ) -> tuple[int, ...]:
  """block, 2 * block, 3 * block, ... (every_multiple) or block, 2 * block, 4 * block, ...,
  up to max(block, max_chunk) and at most the buffer size."""
  top = max(block, min(max_chunk, n_pad))
  if every_multiple:
    return tuple(block * j for j in range(1, top // block + 1))
  sizes = [block]
  while sizes[-1] * 2 <= top:
    sizes.append(sizes[-1] * 2)
  return tuple(sizes)


def tile_layout(group_sizes: jax.Array, n_rows: int, block: int, max_chunk: int,
                every_multiple: bool) -> TileLayout:
  """The padded, chunked layout of `n_rows` rows sorted into groups of `group_sizes` [G]:
  each group's padded rows in as many chunks of the largest size as fit, then the rest in
  the fewest smaller chunks (one with `every_multiple`, else its binary digits)."""
  if block < 1:
    raise ValueError(f"block={block} must be >= 1")
  n_groups = group_sizes.shape[0]
  n_pad = max_tiles(n_rows, n_groups, block) * block
  sizes = group_sizes.astype(jnp.int32)
  padded = (sizes + block - 1) // block * block
  end, pend = jnp.cumsum(sizes), jnp.cumsum(padded)
  start, pstart = end - sizes, pend - padded
  # Group of each row / padded row: the number of group ends at or before it.
  row = jnp.arange(n_rows, dtype=jnp.int32)
  g_row = jnp.minimum(jnp.searchsorted(end, row, side="right"), n_groups - 1)
  dest = jnp.where(row < end[-1], pstart[g_row] + row - start[g_row], n_pad)
  prow = jnp.arange(n_pad, dtype=jnp.int32)
  g_prow = jnp.minimum(jnp.searchsorted(pend, prow, side="right"), n_groups - 1)
  offset = prow - pstart[g_prow]
  src = jnp.where((prow < pend[-1]) & (offset < sizes[g_prow]), start[g_prow] + offset, n_rows)

  csizes = chunk_sizes(n_pad, block, max_chunk, every_multiple)
  top = csizes[-1]
  counts, left = {top: padded // top}, padded % top
  for s in reversed(csizes[:-1]):  # greedy: the binary digits, or the one size that fits
    counts[s] = (left >= s).astype(jnp.int32)
    left = left - counts[s] * s
  chunks, offset = [], jnp.zeros_like(padded)  # rows of the group before the chunks
  for s in reversed(csizes):
    count = counts[s]
    bound = n_pad // s if s == top else min(n_groups, n_pad // s)
    cend = jnp.cumsum(count)
    k = jnp.arange(bound, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cend, k, side="right"), n_groups - 1)
    first = pstart[g] + offset[g] + (k - (cend - count)[g]) * s
    chunks.append(Chunks(first.astype(jnp.int32), g.astype(jnp.int32),
                         cend[-1].astype(jnp.int32)))
    offset = offset + count * s
  return TileLayout(src.astype(jnp.int32), dest.astype(jnp.int32), tuple(chunks[::-1]),
                    csizes)


def _index(w: jax.Array, e: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)


def _for_chunks(sizes, chunks, body, carry):
  """carry = body(size, first_row, group, carry) for every used chunk of every size."""
  for s, c in zip(sizes, chunks):
    def step(i, carry, s=s, c=c):
      return body(s, c.start[i], c.group[i], carry)
    carry = jax.lax.fori_loop(0, c.count, step, carry)
  return carry


def _rows(x, r0, s):
  return jax.lax.dynamic_slice_in_dim(x, r0, s, 0)


def _put(buf, v, r0):
  return jax.lax.dynamic_update_slice_in_dim(buf, v, r0, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_swiglu(sizes: tuple[int, ...], x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, chunks: tuple[Chunks, ...]) -> jax.Array:
  """(silu(x_c @ wg[g]) * (x_c @ wu[g])) @ wd[g] for every chunk c of group g; zeros elsewhere.

  x: the padded buffer [n_pad, D].
  """
  return _chunked_swiglu_fwd(sizes, x, w_gate, w_up, w_down, chunks)[0]


def _chunked_swiglu_fwd(sizes, x, w_gate, w_up, w_down, chunks):
  dt = x.dtype
  f = w_gate.shape[-1]

  def body(s, r0, e, carry):
    out, gate, up = carry
    xs = _rows(x, r0, s)
    g = xs @ _index(w_gate, e).astype(dt)
    u = xs @ _index(w_up, e).astype(dt)
    y = (jax.nn.silu(g) * u) @ _index(w_down, e).astype(dt)
    return _put(out, y, r0), _put(gate, g, r0), _put(up, u, r0)

  hidden = jnp.zeros((x.shape[0], f), dt)
  init = col.match_vma((jnp.zeros_like(x), hidden, hidden), x, w_gate, w_up, w_down, chunks)
  out, gate, up = _for_chunks(sizes, chunks, body, init)
  return out, (x, w_gate, w_up, w_down, chunks, gate, up)


def _chunked_swiglu_bwd(sizes, res, dy):
  x, w_gate, w_up, w_down, chunks, gate, up = res
  dt = x.dtype

  def acc(dw, e, a, b):  # dw[e] += a^T b, in float32
    upd = jnp.einsum("ri,rj->ij", a, b, preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(dw, _index(dw, e) + upd, e, 0)

  def body(s, r0, e, carry):
    dx, dwg, dwu, dwd = carry
    xs, g, u, dys = _rows(x, r0, s), _rows(gate, r0, s), _rows(up, r0, s), _rows(dy, r0, s)
    sg = jax.nn.sigmoid(g)
    silu = g * sg
    dh = dys @ _index(w_down, e).astype(dt).T
    dg = dh * u * (sg * (1 + g * (1 - sg)))
    du = dh * silu
    dxs = dg @ _index(w_gate, e).astype(dt).T + du @ _index(w_up, e).astype(dt).T
    return (_put(dx, dxs, r0), acc(dwg, e, xs, dg), acc(dwu, e, xs, du),
            acc(dwd, e, silu * u, dys))

  zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
  init = col.match_vma((jnp.zeros_like(x), zeros(w_gate), zeros(w_up), zeros(w_down)),
                       x, w_gate, w_up, w_down, chunks, gate, up, dy)
  dx, dwg, dwu, dwd = _for_chunks(sizes, chunks, body, init)
  grads = (dx, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype))
  return (*(col.like_primal(g, p) for g, p in zip(grads, (x, w_gate, w_up, w_down))), None)


chunked_swiglu.defvjp(_chunked_swiglu_fwd, _chunked_swiglu_bwd)


def swiglu_blocked(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, block: int,
                   every_multiple: bool | None = None, max_chunk: int | None = None
                   ) -> jax.Array:
  """`swiglu_ragged` through the padded, chunked layout: same numbers, fast on XLA:CPU.

  Experts of at least `LARGE_EXPERT` weights per matrix run one chunk each up to 8 blocks:
  XLA:CPU copies a group's sliced weights for every chunk, and small chunks run slower
  matmuls, so the ~100M MoE of `benchmarks.mfu` (512 x 2048, block 64) ran 5% faster than
  with binary chunks (interleaved). Every chunk size is a loop to compile, and for small
  experts the copies cost little: they keep the binary chunks (block, 2 block, 4 block,
  ... up to 1024 rows), and the test suite, all small experts, compiles as fast as before.
  `every_multiple` and `max_chunk` override that choice."""
  if every_multiple is None:
    every_multiple = w_gate.shape[-2] * w_gate.shape[-1] >= LARGE_EXPERT
  if max_chunk is None:
    max_chunk = 8 * block if every_multiple else 1024
  layout = tile_layout(group_sizes, rows.shape[0], block, max_chunk, every_multiple)
  padded = take_rows(rows, layout.src, layout.dest)
  out = chunked_swiglu(layout.sizes, padded, w_gate, w_up, w_down, layout.chunks)
  return take_rows(out, layout.dest, layout.src)
