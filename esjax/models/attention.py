"""Causal grouped-query attention with RoPE (Llama / Mixtral / Qwen2 layout), tensor and
context parallel as in Megatron.

Under a plan with tp > 1 the input is the sequence-parallel residual shard [B, S_c/tp, D]: it
is all-gathered over tp along the sequence, q/k/v are column-parallel (this rank's heads), the
output projection is row-parallel and its partial sums are reduce-scattered back. K/V heads
are sharded over tp when tp divides them; when they divide tp instead they are replicated and
each rank uses the one K/V head its query heads share. With cp > 1 the sequence is also split
over cp and keys/values come from every cp rank (`esjax.models.context_parallel`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from esjax.kernels.attention import ops as attention_ops
from esjax.models import context_parallel, layers
from esjax.models.cache import KVCache
from esjax.models.config import ModelConfig
from esjax.sharding import collectives as col
from esjax.sharding.plan import ParallelPlan

# Named scopes of the parts (the planner counts compiled FLOPs per part by them).
SCOPE_PROJ, SCOPE_CORE = "attn_proj", attention_ops.SCOPE


class Attention(nnx.Module):
  """wq [D, H, hd], wk/wv [D, KV, hd], wo [H, hd, D]; optional q/k/v biases (Qwen2), and
  optional RMSNorms of q and k before RoPE: over each head's hd (`qk_norm="head"`, Qwen3)
  or over the whole projection [H, hd] / [KV, hd] (`qk_norm="full"`, OLMoE)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, plan: ParallelPlan | None = None):
    self.cfg = cfg
    self.plan = plan or ParallelPlan.single()
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.effective_head_dim
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

  def _kv_params(self) -> list[jax.Array]:
    """wk, wv (and bk, bv) for this rank's query heads (see the module docstring)."""
    cfg, tp = self.cfg, self.plan.tp
    ps = [self.wk[...], self.wv[...]]
    if cfg.qkv_bias:
      ps += [self.bk[...], self.bv[...]]
    n_tp = self.plan.size(tp)
    if n_tp > 1 and cfg.n_kv_heads % n_tp:  # replicated: pick the shared head
      head = col.axis_index(tp) * (cfg.n_heads // n_tp) // (cfg.n_heads // cfg.n_kv_heads)
      axis = lambda p: p.ndim - 2  # noqa: E731  (the kv_heads axis)
      ps = [lax.dynamic_slice_in_dim(p, head, 1, axis=axis(p)) for p in ps]
    return ps

  def project_qkv(self, x: jax.Array, positions: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, S, D] -> q [B, S, H_l, hd], k/v [B, S, KV_l, hd] (this rank's heads), RoPE
    applied to q and k."""
    cfg, dt = self.cfg, x.dtype
    kv = self._kv_params()
    with jax.named_scope(SCOPE_PROJ):
      q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
      k = jnp.einsum("bsd,dhk->bshk", x, kv[0].astype(dt))
      v = jnp.einsum("bsd,dhk->bshk", x, kv[1].astype(dt))
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + kv[2].astype(dt), v + kv[3].astype(dt)
    if cfg.qk_norm != "none":
      q = self._qk_norm(q, self.q_norm, cfg.n_heads)
      k = self._qk_norm(k, self.k_norm, cfg.n_kv_heads)
    seq_len = None
    if cfg.rope_type == "dynamic":  # the whole sequence's length, over the cp ranks
      seq_len = col.pmax(jnp.max(positions), self.plan.cp) + 1
    cos, sin = layers.rope_tables(positions, cfg, seq_len)
    return layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin), v

  def _qk_norm(self, x: jax.Array, norm: layers.RMSNorm, heads: int) -> jax.Array:
    """RMSNorm of q or k [B, S, heads_l, hd]: per head ("head"), or over all `heads` heads
    ("full"; they are split over tp, so the sum of squares is summed over tp)."""
    if self.cfg.qk_norm == "head" or not self.plan.tp:
      return norm(x)
    x32 = x.astype(jnp.float32)
    total = heads * self.cfg.effective_head_dim
    ms = col.psum(jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True), self.plan.tp) / total
    y = x32 * jax.lax.rsqrt(ms + norm.eps)
    return (y * norm.scale[...].astype(jnp.float32)).astype(x.dtype)

  def output(self, o: jax.Array) -> jax.Array:
    """o [B, S, H_l, hd] -> partial sums [B, S, D] of this rank's heads."""
    with jax.named_scope(SCOPE_PROJ):
      return jnp.einsum("bshk,hkd->bsd", o, self.wo[...].astype(o.dtype))

  def __call__(self, x: jax.Array, positions: jax.Array | None, cache: KVCache | None = None
               ) -> jax.Array | tuple[jax.Array, KVCache]:
    """x [B, S_l, D] (this rank's residual shard), positions [B, S_c] of the cp rank's
    tokens -> attention output [B, S_l, D]. positions None: plain, 0 .. S-1 in every row
    (no cp), which lets the kernel skip what the causal mask hides. With a `cache` (one
    device), also the cache with these tokens added: queries then see the cached tokens
    too; negative positions mark padding. The kernel is `cfg.attention_impl`
    (esjax.kernels.attention) on the plan's platform."""
    plan, window = self.plan, self.cfg.sliding_window
    plain = positions is None
    attend = functools.partial(attention_ops.attend, impl=self.cfg.attention_impl,
                               sliding_window=window, platform=plan.platform,
                               plain_positions=True if plain else None)
    if cache is not None:
      if plan.tp or plan.cp:
        raise ValueError(f"KV-cache decoding runs on one device, not on {plan}")
      if plain:
        raise ValueError("KV-cache decoding needs the tokens' positions, got None")
      q, k, v = self.project_qkv(x, positions)
      cache = cache.update(k, v, positions)
      with jax.named_scope(SCOPE_CORE):
        o = attend(q, cache.k, cache.v, positions, cache.pos, cache.valid)
      return self.output(o), cache
    x = col.all_gather(x, plan.tp, 1)
    if plain:
      if plan.cp:
        raise ValueError(f"context parallelism ({plan.cp}) needs the positions of each rank")
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    q, k, v = (checkpoint_name(t, "qkv") for t in self.project_qkv(x, positions))
    with jax.named_scope(SCOPE_CORE):
      if not plan.cp:
        o = attend(q, k, v, positions, positions)
      elif plan.layout.cp_impl == "ring":
        o = context_parallel.ring_attend(q, k, v, positions, positions, plan.cp,
                                         plan.layout.cp, sliding_window=window,
                                         platform=plan.platform)
      else:
        o = context_parallel.allgather_attend(attend, q, k, v, positions, positions, plan.cp)
    o = checkpoint_name(o, "attn_out")  # names for the remat policies of transformer.py
    return col.psum_scatter(checkpoint_name(self.output(o), "attn_proj"), plan.tp, 1)
