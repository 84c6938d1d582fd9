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

from esjax.sharding import collectives as col


def allgather_attend(attend_fn, q, k, v, q_pos, k_pos, axes: tuple[str, ...]):
  """`attend_fn` of local queries against the K/V of every cp rank (all-gathered)."""
  k, v = col.all_gather(k, axes, 1), col.all_gather(v, axes, 1)
  return attend_fn(q, k, v, q_pos, col.all_gather(k_pos, axes, 1))


def ring_attend(q, k, v, q_pos, k_pos, axes: tuple[str, ...], n: int) -> jax.Array:
  """Causal GQA attention (same contract as `attention.attend`) with K/V blocks passed around
  the ring of the `n` cp ranks (`axes`) by ppermute and merged with an online softmax: after
  n steps every query has seen every key. q [B, Sq, H, hd]; k, v [B, Sk, KV, hd] local."""
  b, sq, h, hd = q.shape
  g = k.shape[2]
  qg = q.reshape(b, sq, g, h // g, hd) * jnp.asarray(hd ** -0.5, q.dtype)
  perm = [(i, (i + 1) % n) for i in range(n)]

  def add_block(m, l, acc, k, v, k_pos):
    logits = jnp.einsum("bqgrk,bsgk->bgrqs", qg, k, preferred_element_type=jnp.float32)
    mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None, None]  # [B, 1, 1, Sq, Sk]
    logits = jnp.where(mask, logits, -jnp.inf)
    m_new = lax.stop_gradient(jnp.maximum(m, logits.max(-1)))  # any shift gives the same o
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # 0 for rows that saw no key yet
    p = jnp.exp(logits - shift[..., None])
    scale = jnp.exp(m - shift)
    l = l * scale + p.sum(-1)
    acc = acc * scale[..., None] + jnp.einsum("bgrqs,bsgk->bgrqk", p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
    return m_new, l, acc

  def step(carry, _):
    m, l, acc, k, v, k_pos = carry
    m, l, acc = add_block(m, l, acc, k, v, k_pos)
    k, v, k_pos = (lax.ppermute(x, axes, perm) for x in (k, v, k_pos))
    return (m, l, acc, k, v, k_pos), None

  stats = (b, g, h // g, sq)
  init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
          jnp.zeros((*stats, hd), jnp.float32))
  init = col.vary(init, tuple(jax.typeof(q).manual_axis_type.varying))  # carried like q
  (m, l, acc, k, v, k_pos), _ = lax.scan(step, (*init, k, v, k_pos), None, length=n - 1)
  _, l, acc = add_block(m, l, acc, k, v, k_pos)  # the last block: no send after it
  o = acc / l[..., None]  # every query sees itself, so l > 0
  return o.transpose(0, 3, 1, 2, 4).reshape(b, sq, h, hd).astype(q.dtype)
