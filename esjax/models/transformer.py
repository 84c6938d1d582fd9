"""The decoder: embeddings, a stack of (attention, MLP or MoE) blocks, final norm, LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from esjax.models import layers
from esjax.models.attention import Attention
from esjax.models.cache import KVCache
from esjax.models.config import ModelConfig
from esjax.models.mlp import MLP
from esjax.models.moe import MoE
from esjax.parallel import hooks
from esjax.parallel.rules import constrain

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    if cfg.is_moe_layer(layer):
      self.mlp = MoE(cfg, rngs)
    else:
      self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.init_std, rngs, cfg.param_dtype)

  @property
  def is_moe(self) -> bool:
    return isinstance(self.mlp, MoE)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None):
    """(x, MoE stats or None); with a KV `cache`, (x, stats, updated cache)."""
    if cache is None:
      x = x + self.attn(self.attn_norm(x), positions)
    else:
      a, cache = self.attn(self.attn_norm(x), positions, cache)
      x = x + a
    x = constrain(x, ("act_batch", "act_res_len", "act_embed"))
    h = self.mlp_norm(x)
    stats = None
    if self.is_moe:
      h, stats = self.mlp(h)
    else:
      h = self.mlp(h)
    x = constrain(x + h, ("act_batch", "act_res_len", "act_embed"))
    return (x, stats) if cache is None else (x, stats, cache)


class Transformer(nnx.Module):
  """Llama / Mixtral / Qwen2-MoE decoder.

  `model(tokens [B, S] int32)` returns float32 logits [B, S, V] and an aux dict: `moe_loss`
  (the weighted router losses to add to the LM loss) and, for MoE models, `aux_loss`,
  `seq_aux_loss`, `z_loss` (means over MoE layers), `expert_load` [n_moe_layers, E] and
  `drop_fraction`.

  Incremental decoding: `model(tokens, positions, cache=init_cache(cfg, B, L))` writes the
  tokens' keys/values at the cache's index and returns `(logits, aux, cache)`; tokens with a
  negative position are padding (see `esjax.models.cache`). Positions default to
  `cache index + arange(S)`.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = layers.param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                              cfg.init_std, cfg.param_dtype)
    self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                  cfg.init_std, cfg.param_dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.dtype)
    return constrain(x, ("act_batch", "act_res_len", "act_embed"))

  def logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      w = self.embed[...].T
    else:
      w = self.lm_head[...]
    logits = jnp.einsum("bsd,dv->bsv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_len", "act_vocab"))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               cache: list[KVCache] | None = None):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if positions is None:
      start = 0 if cache is None else cache[0].index
      positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                   tokens.shape)
    x = self.embed_tokens(tokens)
    stack = hooks.layers_override() if cache is None else None  # the pipeline (esjax.parallel)
    if stack is not None:
      x, stats = stack(self, x, positions)
      return self.logits(x), aggregate_moe_stats(self.cfg, stats)
    stats, new_cache = [], []
    for i, block in enumerate(self.layers):
      if cache is not None:
        x, s, c = block(x, positions, cache[i])
        new_cache.append(c)
      else:
        x, s = run_block(block, x, positions, self.cfg.remat)
      if s is not None:
        stats.append(s)
    out = self.logits(x), aggregate_moe_stats(self.cfg, stats)
    return out if cache is None else (*out, new_cache)


def run_block(block: Block, x: jax.Array, positions: jax.Array, remat: str):
  """`block(x, positions)`, under `nnx.remat` with the named policy unless remat='none'."""
  if remat == "none":
    return block(x, positions)
  return nnx.remat(lambda blk, h, p: blk(h, p), policy=_REMAT_POLICIES[remat])(
      block, x, positions)


def aggregate_moe_stats(cfg: ModelConfig, stats: list[dict[str, jax.Array]]
                        ) -> dict[str, jax.Array]:
  """Sums the weighted router losses over layers; reports their means over layers."""
  if not stats:
    return {"moe_loss": jnp.zeros((), jnp.float32)}
  stacked = {k: jnp.stack([s[k] for s in stats]) for k in stats[0]}
  moe_loss = (cfg.aux_loss_coef * jnp.sum(stacked["aux_loss"])
              + cfg.seq_aux_loss_coef * jnp.sum(stacked["seq_aux_loss"])
              + cfg.z_loss_coef * jnp.sum(stacked["z_loss"]))
  return {
      "moe_loss": moe_loss,
      "aux_loss": jnp.mean(stacked["aux_loss"]),
      "seq_aux_loss": jnp.mean(stacked["seq_aux_loss"]),
      "z_loss": jnp.mean(stacked["z_loss"]),
      "expert_load": stacked["expert_load"],
      "drop_fraction": jnp.mean(stacked["drop_fraction"]),
  }
