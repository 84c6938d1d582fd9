"""Causal grouped-query attention with RoPE (Llama / Mixtral / Qwen2 layout)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from esjax.kernels.attention import ops as attention_ops
from esjax.models import layers
from esjax.models.cache import KVCache
from esjax.models.config import ModelConfig
from esjax.parallel import hooks
from esjax.parallel.rules import constrain


class Attention(nnx.Module):
  """wq [D, H, hd], wk/wv [D, KV, hd], wo [H, hd, D]; optional q/k/v biases (Qwen2)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
    std, pd = cfg.init_std, cfg.param_dtype
    self.wq = layers.param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, pd)
    self.wk = layers.param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wv = layers.param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wo = layers.param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std, pd)
    if cfg.qkv_bias:
      self.bq = layers.const_param(jnp.zeros((h, hd), pd), ("heads", "head_dim"))
      self.bk = layers.const_param(jnp.zeros((kv, hd), pd), ("kv_heads", "head_dim"))
      self.bv = layers.const_param(jnp.zeros((kv, hd), pd), ("kv_heads", "head_dim"))

  def project_qkv(self, x: jax.Array, positions: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, S, H, hd], k/v [B, S, KV, hd], RoPE applied to q and k."""
    cfg, dt = self.cfg, x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    cos, sin = layers.rope_tables(positions, cfg.head_dim_, cfg.rope_theta)
    q = constrain(layers.apply_rope(q, cos, sin), ("act_batch", "act_len", "act_heads", None))
    k = constrain(layers.apply_rope(k, cos, sin), ("act_batch", "act_kv_len", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_kv_len", "act_kv_heads", None))
    return q, k, v

  def output(self, o: jax.Array) -> jax.Array:
    """o [B, S, H, hd] -> [B, S, D]."""
    return jnp.einsum("bshk,hkd->bsd", o, self.wo[...].astype(o.dtype))

  def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None
               ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Attention output [B, S, D]; with a `cache`, also the cache with these tokens added
    (queries then see the cached tokens too; negative positions mark padding)."""
    q, k, v = self.project_qkv(x, positions)
    window = self.cfg.sliding_window
    attend = functools.partial(attention_ops.attend, impl=self.cfg.attention_impl)
    if cache is None:
      attend_fn = hooks.attention_override() or attend  # e.g. ring attention under CP
      return self.output(attend_fn(q, k, v, positions, positions, sliding_window=window))
    cache = cache.update(k, v, positions)
    o = attend(q, cache.k, cache.v, positions, cache.pos, cache.valid, sliding_window=window)
    return self.output(o), cache

