"""Fused Pallas top-k router: scores, top-k selection, weights and per-expert counts.

One grid step routes a block of `block_tokens` rows of logits [T, E] held whole in
registers (GPU) or VMEM (TPU):

  probs   softmax / sigmoid over the experts (softmax_topk only)
  top-k   k rounds of max-and-mask: take the row maximum, the lowest untaken index holding
          it wins (ties to the lowest index, as `lax.top_k`); NaN ranks above +inf
  weights softmax over the k chosen logits (topk_softmax), or the k chosen probs,
          optionally renormalised (softmax_topk); times `scaling`
  counts  how many (token, slot) assignments each expert got in the block

Zeros compare equal under `==`, so -0.0 and +0.0 tie as in `router.canonical_keys`.
Padded experts are marked taken before the first round, so they are never chosen and a
masked (-inf) expert is never chosen twice. Outputs are built with `where` on a slot
iota (Triton has no general concatenate).

Backends (`backend`): "triton" (GPU; every block dimension a power of two, so tokens,
experts and k are padded) and "mosaic" (TPU; block rows a multiple of 8, the expert and k
dimensions whole). `interpret=True` runs either layout with the Pallas interpreter (CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BACKENDS = ("triton", "mosaic")
# Elements of one logits block: enough rows per program to amortise the k reductions while
# the block stays in registers (Triton, 4 warps) or well inside VMEM (TPU). Untuned on
# hardware. The interpreter runs the grid as a loop: few large blocks are ~9x faster there.
_BLOCK_ELEMS = {"triton": 4096, "mosaic": 32768, "interpret": 1 << 18}


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Padded kernel shapes for `n_tokens` x `n_experts` logits and `top_k`."""
  block_tokens: int
  tokens: int  # padded to a multiple of block_tokens
  experts: int
  top_k: int

  @property
  def n_blocks(self) -> int:
    return self.tokens // self.block_tokens


def layout_for(backend: str, n_tokens: int, n_experts: int, top_k: int,
               block_tokens: int | None = None, interpret: bool = False) -> BlockLayout:
  """Block and padding sizes the backend needs."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}, expected one of {BACKENDS}")
  if not 1 <= top_k <= n_experts:
    raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
  pow2 = backend == "triton"
  experts = pl.next_power_of_2(n_experts) if pow2 else n_experts
  k = pl.next_power_of_2(top_k) if pow2 else top_k
  if block_tokens is None:
    elems = _BLOCK_ELEMS["interpret" if interpret else backend]
    block_tokens = max(8, pl.next_power_of_2(elems // experts + 1) // 2)
    block_tokens = min(block_tokens, max(8, pl.next_power_of_2(n_tokens)))
  if block_tokens % 8 or (pow2 and block_tokens & (block_tokens - 1)):
    raise ValueError(f"block_tokens={block_tokens} must be a multiple of 8"
                     + (" and a power of two for triton" if pow2 else ""))
  tokens = pl.cdiv(n_tokens, block_tokens) * block_tokens
  return BlockLayout(block_tokens, tokens, experts, k)


def _route_block(logits_ref, weights_ref, indices_ref, counts_ref, *, n_tokens, n_experts,
                 top_k, score_fn, order, renormalize, scaling):
  """Routes one [block_tokens, experts] block (shapes padded as `BlockLayout` says)."""
  bt, e_pad = logits_ref.shape
  k_pad = weights_ref.shape[1]
  x = logits_ref[...].astype(jnp.float32)
  col = jax.lax.broadcasted_iota(jnp.int32, (bt, e_pad), 1)
  real = col < n_experts
  row = pl.program_id(0) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
  neg_inf = jnp.float32(-jnp.inf)
  nan = jnp.float32(jnp.nan)
  is_nan = x != x
  row_nan = jnp.max(jnp.where(is_nan & real, 1, 0), axis=1, keepdims=True) > 0

  if order == "topk_softmax":
    keys = x
  elif score_fn == "softmax":  # as jax.nn.softmax: exp(x - max) / sum
    m = jnp.max(jnp.where(real & ~is_nan, x, neg_inf), axis=1, keepdims=True)
    e = jnp.where(real, jnp.exp(x - m), 0.0)
    keys = jnp.where(row_nan, nan, e / jnp.sum(e, axis=1, keepdims=True))
  else:
    keys = jax.nn.sigmoid(x)
  key_nan = keys != keys

  slot = jax.lax.broadcasted_iota(jnp.int32, (bt, k_pad), 1)
  vals = jnp.full((bt, k_pad), neg_inf)
  idx = jnp.zeros((bt, k_pad), jnp.int32)
  taken = ~real
  for j in range(top_k):  # static unroll; k is small
    free = ~taken
    any_nan = jnp.max(jnp.where(key_nan & free, 1, 0), axis=1, keepdims=True) > 0
    m = jnp.max(jnp.where(free & ~key_nan, keys, neg_inf), axis=1, keepdims=True)
    hit = jnp.where(any_nan, key_nan, keys == m) & free
    i = jnp.min(jnp.where(hit, col, e_pad), axis=1, keepdims=True)
    taken = taken | (col == i)
    vals = jnp.where(slot == j, jnp.where(any_nan, nan, m), vals)
    idx = jnp.where(slot == j, i, idx)
    if j == 0:
      top = m  # the row maximum unless the row has a NaN (then every weight is NaN)

  in_k = slot < top_k
  if order == "topk_softmax":  # as jax.nn.softmax over the k chosen logits
    e = jnp.where(in_k, jnp.exp(vals - top), 0.0)
    w = e / jnp.sum(e, axis=1, keepdims=True)
    w = jnp.where(row_nan, nan, w)
  else:
    w = jnp.where(in_k, vals, 0.0)
    if renormalize:
      w = w / (jnp.sum(w, axis=1, keepdims=True) + 1e-20)
  weights_ref[...] = jnp.where(in_k, w * scaling, 0.0)
  indices_ref[...] = idx
  chosen = taken & real & (row < n_tokens)
  counts_ref[...] = jnp.sum(jnp.where(chosen, 1, 0), axis=0, keepdims=True)


def route_topk(logits: jax.Array, top_k: int, *, score_fn: str = "softmax",
               order: str = "topk_softmax", renormalize: bool = False, scaling: float = 1.0,
               backend: str = "triton", interpret: bool = False,
               block_tokens: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The kernel on logits [T, E] -> (weights [T, k] f32, indices [T, k] i32, counts [E] i32).

  Arguments validated by the caller (`ops.route`); `block_tokens=None` picks a size.
  """
  n_tokens, n_experts = logits.shape
  lay = layout_for(backend, n_tokens, n_experts, top_k, block_tokens, interpret)
  pad = ((0, lay.tokens - n_tokens), (0, lay.experts - n_experts))
  if any(p for _, p in pad):  # only for odd shapes; the kernel masks what padding adds
    logits = jnp.pad(logits, pad)
  kernel = functools.partial(
      _route_block, n_tokens=n_tokens, n_experts=n_experts, top_k=top_k, score_fn=score_fn,
      order=order, renormalize=renormalize, scaling=float(scaling))
  if backend == "triton":
    params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  else:
    params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  bt, k = lay.block_tokens, lay.top_k
  weights, indices, counts = pl.pallas_call(
      kernel,
      grid=(lay.n_blocks,),
      in_specs=[pl.BlockSpec((bt, lay.experts), lambda i: (i, 0))],
      out_specs=[pl.BlockSpec((bt, k), lambda i: (i, 0)),
                 pl.BlockSpec((bt, k), lambda i: (i, 0)),
                 pl.BlockSpec((pl.squeezed, 1, lay.experts), lambda i: (i, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((lay.tokens, k), jnp.float32),
                 jax.ShapeDtypeStruct((lay.tokens, k), jnp.int32),
                 jax.ShapeDtypeStruct((lay.n_blocks, 1, lay.experts), jnp.int32)],
      compiler_params=params,
      interpret=interpret,
      name=f"route_{order}_{score_fn}",
  )(logits)
  counts = jnp.sum(counts[:, 0, :n_experts], axis=0)
  return weights[:n_tokens, :top_k], indices[:n_tokens, :top_k], counts
