"""The grouped SwiGLU on the grouped-matmul kernels, with its VJP (`swiglu_gmm`).

Same contract as `esjax.routing.grouped.swiglu_ragged`: rows [N, D] sorted by group with
`group_sizes` [G], weights w_gate, w_up [G, D, F] and w_down [G, F, D]; rows past
`sum(group_sizes)` (finite, e.g. the zeros of an EP buffer's tail) come back as zeros. The
work is the routed rows: forward 3 `gmm`, backward 3 `gmm` (the input gradients through the
transposed weights) and 3 `tgmm` (the weight gradients). The residuals are those of
`swiglu_ragged` (rows, gate and up products; the activation is recomputed) and the forward's
work list.

Each kernel call runs in a named scope `declared_flops_<n>` that the planner reads (Mosaic
GPU drops a kernel's cost estimate in lowering): n is the kernel's work when the router
sends `expected_rows` of the N rows (default N), each group adding at most one part-filled
row block: 2 x tile rows x K x N per row block.

On TPUs (`backend="megablox"`) the three products are jax's megablox grouped matmuls with
their own VJPs (and their own declared costs), each masked to the routed rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from esjax.kernels.gmm import DECLARED_FLOPS, kernel, triton
from esjax.sharding import collectives as col

BACKENDS = ("mosaic", "triton", "megablox")
MEGABLOX_TILING = (128, 128, 128)  # rows, contraction, output columns (TPU: lanes of 128)


@dataclasses.dataclass(frozen=True)
class Options:
  """Static options: the kernels (`mosaic`: Hopper's wgmma, `esjax.kernels.gmm.kernel`;
  `triton`: any GPU Triton compiles for, `esjax.kernels.gmm.triton`; `megablox`: TPU, jax's
  megablox), their tiles (None: the backend's), the target's SM count (mosaic; None: an
  H100 SXM's), the interpreter (tests: mosaic's parameters, or True) and the rows a
  balanced router sends (the declared cost; None: all)."""
  backend: str = "mosaic"
  tiles: kernel.Tiles | None = None
  num_sms: int | None = kernel.H100_SMS
  interpret: Any = None
  expected_rows: int | None = None

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"backend={self.backend!r}, expected one of {BACKENDS}")
    if self.tiles is None:
      tiles = triton.TRITON_TILES if self.backend == "triton" else kernel.Tiles()
      object.__setattr__(self, "tiles", tiles)
    if self.num_sms is None:
      object.__setattr__(self, "num_sms", kernel.H100_SMS)


def fits(backend: str, dtype: Any, d_model: int, d_ff: int) -> bool:
  """Whether the SwiGLU's products run on `backend`'s default tiles: a bfloat16 or float16
  model whose expert widths (d_model, and d_ff on this device) are whole tiles, as the
  contractions and the outputs of all six products must be."""
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return False
  if backend == "megablox":
    unit = math.lcm(*MEGABLOX_TILING[1:])
  else:
    tiles = Options(backend).tiles
    unit = math.lcm(tiles.k, tiles.n * tiles.band_n)
  return d_model % unit == 0 and d_ff % unit == 0


def _declared(opts: Options, n_rows: int, n_groups: int, k: int, n: int) -> int:
  bm = opts.tiles.m
  rows = n_rows if opts.expected_rows is None else min(opts.expected_rows, n_rows)
  blocks = min(kernel.max_items(n_rows, n_groups, bm), math.ceil(rows / bm) + n_groups)
  return 2 * blocks * bm * k * n


def _declaring(opts: Options, x, gs, n: int):
  """The named scope declaring the cost of a kernel on rows `x` [N, K] with N-wide results."""
  flops = _declared(opts, x.shape[0], gs.shape[0], x.shape[1], n)
  return jax.named_scope(f"{DECLARED_FLOPS}{flops}")


def _gmm(x, w, sched, gs, opts: Options, transpose: bool = False):
  n = w.shape[1] if transpose else w.shape[2]
  with _declaring(opts, x, gs, n):
    if opts.backend == "triton":
      out = triton.gmm(x, w.astype(x.dtype), sched, tiles=opts.tiles, transpose_rhs=transpose,
                       interpret=bool(opts.interpret))
    else:
      out = kernel.gmm(x, w.astype(x.dtype), sched, tiles=opts.tiles, transpose_rhs=transpose,
                       num_sms=opts.num_sms, interpret=opts.interpret)
  return col.match_vma(out, x, w, gs)  # a kernel's result varies as its operands do


def _tgmm(x, y, gs, opts: Options):
  with _declaring(opts, x, gs, y.shape[1]):
    if opts.backend == "triton":
      out = triton.tgmm(x, y, gs, tiles=opts.tiles, interpret=bool(opts.interpret))
    else:
      out = kernel.tgmm(x, y, gs, tiles=opts.tiles, num_sms=opts.num_sms,
                        interpret=opts.interpret)
  return col.match_vma(out, x, y, gs)


def _swiglu(gate, up):
  return jax.nn.silu(gate) * up


def _routed(x, gs):
  """x with the rows past sum(gs) zeroed (the kernels leave them unwritten)."""
  return jnp.where((jnp.arange(x.shape[0]) < jnp.sum(gs))[:, None], x, jnp.zeros_like(x))


def _pad(rows, block: int):
  extra = -rows.shape[0] % block
  return rows if not extra else jnp.pad(rows, ((0, extra), (0, 0)))


def _forward(rows, gs, w_gate, w_up, w_down, opts: Options):
  sched = kernel.schedule(gs, rows.shape[0], opts.tiles.m)
  gate = _routed(_gmm(rows, w_gate, sched, gs, opts), gs)
  up = _routed(_gmm(rows, w_up, sched, gs, opts), gs)
  out = _routed(_gmm(_swiglu(gate, up), w_down, sched, gs, opts), gs)
  return out, (gate, up, sched)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu_gmm(rows, group_sizes, w_gate, w_up, w_down, opts):
  return _forward(rows, group_sizes, w_gate, w_up, w_down, opts)[0]


def _fwd(rows, group_sizes, w_gate, w_up, w_down, opts):
  out, (gate, up, sched) = _forward(rows, group_sizes, w_gate, w_up, w_down, opts)
  return out, (rows, group_sizes, w_gate, w_up, w_down, gate, up, sched)


def _bwd(opts, res, dy):
  rows, gs, w_gate, w_up, w_down, gate, up, sched = res
  dy = _routed(dy.astype(rows.dtype), gs)
  h, act_pull = jax.vjp(_swiglu, gate, up)
  dh = _routed(_gmm(dy, w_down, sched, gs, opts, transpose=True), gs)
  d_gate, d_up = act_pull(dh)
  dx = _routed(_gmm(d_gate, w_gate, sched, gs, opts, transpose=True)
               + _gmm(d_up, w_up, sched, gs, opts, transpose=True), gs)
  grads = (dx, _tgmm(rows, d_gate, gs, opts), _tgmm(rows, d_up, gs, opts),
           _tgmm(h, dy, gs, opts))
  dx, dwg, dwu, dwd = (col.like_primal(g.astype(p.dtype), p) for g, p in
                       zip(grads, (rows, w_gate, w_up, w_down)))
  return dx, None, dwg, dwu, dwd


_swiglu_gmm.defvjp(_fwd, _bwd)


def _swiglu_megablox(rows, gs, w_gate, w_up, w_down, interpret: bool):
  """TPU: three megablox grouped matmuls (each with megablox's VJP). Every product is masked
  to the routed rows, so the rows megablox leaves unwritten never reach a gradient."""
  def product(x, w):
    out = megablox.gmm(x, w.astype(x.dtype), gs, x.dtype, MEGABLOX_TILING, None, None, False,
                       interpret)
    return _routed(col.match_vma(out, x, w, gs), gs)

  x = _routed(rows, gs)
  return product(_swiglu(product(x, w_gate), product(x, w_up)), w_down)


def swiglu_gmm(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
               w_down: jax.Array, opts: Options = Options()) -> jax.Array:
  """Grouped SwiGLU of `rows` [N, D] on the kernels (see the module docstring). The rows are
  padded to a multiple of the tile rows for the weight-gradient kernel where needed."""
  n, gs = rows.shape[0], group_sizes.astype(jnp.int32)
  if opts.backend == "megablox":
    return _swiglu_megablox(_pad(rows, MEGABLOX_TILING[0]), gs, w_gate, w_up, w_down,
                            bool(opts.interpret))[:n]
  return _swiglu_gmm(_pad(rows, opts.tiles.m), gs, w_gate, w_up, w_down, opts)[:n]
