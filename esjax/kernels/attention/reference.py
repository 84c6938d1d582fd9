"""Plain attention (`impl="xla"`): the whole [Sq, Sk] float32 logits at once; the reference.

Every kernel in this package has its contract: q [B, Sq, H, hd]; k, v [B, Sk, KV, hd]
(grouped-query: H a multiple of KV); q_pos [B, Sq], k_pos [B, Sk] absolute positions in any
order; k_valid [B, Sk] (optional) masks unused key slots. Key j is visible to query i iff
k_valid[j], k_pos[j] <= q_pos[i] and, with sliding_window > 0, q_pos[i] - k_pos[j] <
sliding_window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array | None,
            sliding_window: int) -> jax.Array:
  """[B, Sq, Sk] bool: which keys each query sees (the mask every kernel applies)."""
  dist = q_pos[:, :, None] - k_pos[:, None, :]
  mask = dist >= 0
  if sliding_window:
    mask &= dist < sliding_window
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                  k_pos: jax.Array, k_valid: jax.Array | None = None, *,
                  sliding_window: int = 0) -> jax.Array:
  """Softmax attention with float32 logits [B, KV, H/KV, Sq, Sk]. A query that sees no key
  gets the mean of all values (every logit is the same large negative number)."""
  return masked_attention(q, k, v, visible(q_pos, k_pos, k_valid, sliding_window))


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`xla_attention` with its mask given: [B or 1, Sq, Sk] bool."""
  b, sq, h, hd = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, sq, kv, h // kv, hd)
  logits = jnp.einsum("bqgrk,bsgk->bgrqs", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (hd ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  o = jnp.einsum("bgrqs,bsgk->bqgrk", probs, v)
  return o.reshape(b, sq, h, hd)
