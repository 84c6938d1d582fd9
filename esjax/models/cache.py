"""Key/value cache for incremental decoding: one fixed-size buffer per attention layer.

The cache has a static length (so a jit-compiled decode step compiles once) and one write
index shared by the batch: a call with `S` new tokens writes slots `index .. index+S-1`. Each
slot remembers the absolute position of its token; attention lets a query see a slot when the
slot's position is >= 0 and <= the query's position. A token given a negative position is
padding: it is written (so every row advances in lock step) but never attended to. This is how
prompts of different lengths share one batch: left-pad them with position -1.

Writing past the end is not checked under jit (`dynamic_update_slice` would clamp the index);
callers size the cache for prompt + new tokens (`esjax.eval.generation` does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from esjax.models.config import ModelConfig


@struct.dataclass
class KVCache:
  """k, v [B, L, KV, hd]; pos [B, L] int32 (-1: empty or padding); index [] int32."""

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, batch: int, length: int, n_kv_heads: int, head_dim: int,
            dtype: jnp.dtype | str = jnp.float32) -> "KVCache":
    kv = jnp.zeros((batch, length, n_kv_heads, head_dim), dtype)
    return cls(k=kv, v=kv, pos=jnp.full((batch, length), -1, jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def length(self) -> int:
    return self.k.shape[1]

  @property
  def valid(self) -> jax.Array:
    """[B, L] bool: slots holding a real (non-padding) token."""
    return self.pos >= 0

  def update(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "KVCache":
    """Writes k, v [B, S, KV, hd] with `positions` [B, S] at slots index .. index+S-1."""
    at = (0, self.index, 0, 0)
    new_k = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at)
    new_v = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at)
    pos = jnp.where(positions >= 0, positions, -1).astype(jnp.int32)
    new_pos = jax.lax.dynamic_update_slice(self.pos, pos, (0, self.index))
    return KVCache(k=new_k, v=new_v, pos=new_pos, index=self.index + k.shape[1])


def init_cache(cfg: ModelConfig, batch: int, length: int) -> list[KVCache]:
  """An empty cache for every layer of a `Transformer(cfg)`, in the compute dtype."""
  if batch <= 0 or length <= 0:
    raise ValueError(f"init_cache: batch={batch} and length={length} must be > 0")
  return [KVCache.zeros(batch, length, cfg.n_kv_heads, cfg.effective_head_dim, cfg.dtype)
          for _ in range(cfg.n_layers)]
