"""Causal grouped-query attention with RoPE (Llama / Mixtral / Qwen2 layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from esjax.models import layers
from esjax.models.cache import KVCache
from esjax.models.config import ModelConfig
from esjax.parallel import hooks
from esjax.parallel.rules import constrain


class Attention(nnx.Module):
  """wq [D, H, hd], wk/wv [D, KV, hd], wo [H, hd, D]; optional q/k/v biases (Qwen2), and
  optional RMSNorms of q and k before RoPE: over each head's hd (`qk_norm="head"`, Qwen3)
  or over the whole projection [H, hd] / [KV, hd] (`qk_norm="full"`, OLMoE)."""

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
    if cfg.qk_norm == "head":
      self.q_norm = layers.RMSNorm(hd, cfg.norm_eps, pd)
      self.k_norm = layers.RMSNorm(hd, cfg.norm_eps, pd)
    elif cfg.qk_norm == "full":
      self.q_norm = layers.RMSNorm((h, hd), cfg.norm_eps, pd, ("heads", "head_dim"))
      self.k_norm = layers.RMSNorm((kv, hd), cfg.norm_eps, pd, ("kv_heads", "head_dim"))

  def project_qkv(self, x: jax.Array, positions: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, S, H, hd], k/v [B, S, KV, hd], RoPE applied to q and k."""
    cfg, dt = self.cfg, x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.qk_norm != "none":
      q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = layers.rope_tables(positions, cfg)
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
    if cache is None:
      override = hooks.attention_override()  # e.g. ring attention under CP
      if override is None:
        return self.output(attend(q, k, v, positions, positions, sliding_window=window))
      if window:
        raise ValueError(f"sliding_window={window}: the context-parallel attention "
                         "(parallel.cp_impl='ring') has no sliding window; use 'allgather'")
      return self.output(override(q, k, v, positions, positions))
    cache = cache.update(k, v, positions)
    o = attend(q, cache.k, cache.v, positions, cache.pos, cache.valid, sliding_window=window)
    return self.output(o), cache


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
           k_valid: jax.Array | None = None, sliding_window: int = 0) -> jax.Array:
  """Causal GQA softmax attention in float32 logits.

  q [B, Sq, H, hd]; k, v [B, Sk, KV, hd]; q_pos [B, Sq], k_pos [B, Sk] absolute positions
  (key j is visible to query i when k_pos[j] <= q_pos[i], and with a `sliding_window` > 0
  also q_pos[i] - k_pos[j] < sliding_window); k_valid [B, Sk] masks unused slots.
  """
  b, sq, h, hd = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, sq, kv, h // kv, hd)
  logits = jnp.einsum("bqgrk,bsgk->bgrqs", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (hd ** -0.5)
  mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, Sq, Sk]
  if sliding_window:
    mask = mask & (q_pos[:, :, None] - k_pos[:, None, :] < sliding_window)
  if k_valid is not None:
    mask = mask & k_valid[:, None, :]
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  o = jnp.einsum("bgrqs,bsgk->bqgrk", probs, v)
  return o.reshape(b, sq, h, hd)
