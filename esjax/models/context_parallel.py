"""Attention over a sequence sharded over cp (context parallelism), inside the step's
shard_map: queries stay on their cp rank; keys and values are all-gathered over cp
(`allgather`) or passed around the cp ring (`ring`, no device holds the whole K/V).

Masking follows the positions carried with the keys, so any sequence order works: the train
step puts the sequence in causal load-balanced order (cp rank i holds chunks i and 2cp-1-i of
2*cp), see `esjax.routing.expert_parallel.sequence_order`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from esjax.kernels.attention import chunked
from esjax.sharding import collectives as col


def allgather_attend(attend_fn, q, k, v, q_pos, k_pos, axes: tuple[str, ...]):
  """`attend_fn` of local queries against the K/V of every cp rank (all-gathered)."""
  k, v = col.all_gather(k, axes, 1), col.all_gather(v, axes, 1)
  return attend_fn(q, k, v, q_pos, col.all_gather(k_pos, axes, 1))


def ring_attend(q, k, v, q_pos, k_pos, axes: tuple[str, ...], n: int, *,
                sliding_window: int = 0, platform: str | None = None) -> jax.Array:
  """Causal GQA attention (the contract of `esjax.kernels.attention.reference.xla_attention`)
  with K/V blocks passed around the ring of the `n` cp ranks (`axes`) by ppermute. Each step
  runs the chunked block kernel (memory linear in the block, a recomputing custom VJP) on the
  block at hand and merges its (out, lse) into the running one; after n steps every query
  has seen every key. q [B, Sq, H, hd]; k, v [B, Sk, KV, hd] local."""
  perm = [(i, (i + 1) % n) for i in range(n)]

  def add_block(acc, k, v, k_pos):
    part = chunked.attention_block(q, k, v, q_pos, k_pos, sliding_window=sliding_window,
                                   platform=platform)
    return chunked.merge(acc, part)

  def step(carry, _):
    acc, k, v, k_pos = carry
    acc = add_block(acc, k, v, k_pos)
    k, v, k_pos = (lax.ppermute(x, axes, perm) for x in (k, v, k_pos))
    return (acc, k, v, k_pos), None

  acc = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32))
  acc = col.match_vma(acc, q, k, v)  # carried like the blocks
  (acc, k, v, k_pos), _ = lax.scan(step, (acc, k, v, k_pos), None, length=n - 1)
  out, _ = add_block(acc, k, v, k_pos)  # the last block: no send after it
  return out.astype(q.dtype)
