"""The decoder: embeddings, a stack of (attention, MLP or MoE) blocks, final norm, LM head.

Tensor parallel as in Megatron when the plan has tp > 1: the embedding and the LM head are
split over the vocabulary, the residual stream between blocks is split over the sequence
(sequence parallelism: [B, S_c/tp, D], where S_c is the cp rank's share of the sequence),
and every block gathers and scatters it itself. With a one-device plan (the default) all of
it is the plain model.
"""

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
from esjax.sharding import collectives as col
from esjax.sharding.plan import ParallelPlan

SCOPE_LOGITS = "logits"  # named scope of the LM head matmul, for the planner
_cp = jax.checkpoint_policies
# ModelConfig.remat -> jax.checkpoint policy of one decoder layer (None: save nothing).
REMAT_POLICIES = {
    "full": None,
    "dots": _cp.checkpoint_dots_with_no_batch_dims,
    "dots_except_mlp": _cp.save_only_these_names("qkv", "attn_out", "attn_proj"),
    "attn": _cp.save_only_these_names("attn_out"),
    "offload_attn": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("attn_out",),
        offload_src="device", offload_dst="pinned_host"),
}


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs,
               plan: ParallelPlan | None = None):
    self.cfg = cfg
    self.attn_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    self.attn = Attention(cfg, rngs, plan)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    if cfg.is_moe_layer(layer):
      self.mlp = MoE(cfg, rngs, plan)
    else:
      self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.init_std, rngs, cfg.param_dtype, plan)

  @property
  def is_moe(self) -> bool:
    return isinstance(self.mlp, MoE)

  def __call__(self, x: jax.Array, positions: jax.Array | None,
               cache: KVCache | None = None, mask: jax.Array | None = None):
    """(x, MoE stats or None); with a KV `cache`, (x, stats, updated cache). positions None:
    0 .. S-1 in every row (see `Attention`). `mask` [B, S]: the tokens the router losses
    count (None: all)."""
    if cache is None:
      x = x + self.attn(self.attn_norm(x), positions)
    else:
      a, cache = self.attn(self.attn_norm(x), positions, cache)
      x = x + a
    h = self.mlp_norm(x)
    stats = None
    if self.is_moe:
      h, stats = self.mlp(h, mask)
    else:
      h = self.mlp(h)
    x = x + h
    return (x, stats) if cache is None else (x, stats, cache)


def run_block(block: Block, x: jax.Array, positions: jax.Array | None, remat: str,
              mask: jax.Array | None = None):
  """`block(x, positions, mask=mask)`, under `nnx.remat` with the named policy unless
  remat='none'."""
  if remat == "none":
    return block(x, positions, mask=mask)
  return nnx.remat(lambda blk, h, p, m: blk(h, p, mask=m), policy=REMAT_POLICIES[remat])(
      block, x, positions, mask)


class Transformer(nnx.Module):
  """Llama / Mixtral / Qwen2-MoE decoder.

  `model(tokens [B, S] int32)` returns float32 logits [B, S, V] and an aux dict: `moe_loss`
  (the weighted router losses to add to the LM loss) and, for MoE models, `aux_loss`,
  `seq_aux_loss`, `z_loss` (means over MoE layers), `expert_load` [n_moe_layers, E] and
  `drop_fraction`, `ep_overflow_fraction` [n_moe_layers]. `mask` [B, S] (1: the token counts, e.g. the batch's loss mask) keeps
  padding out of the router losses and the expert load. Under a plan with tp > 1 (inside the
  step's shard_map) the logits are this rank's vocabulary shard.

  Incremental decoding (one device): `model(tokens, positions, cache=init_cache(cfg, B, L))`
  writes the tokens' keys/values at the cache's index and returns `(logits, aux, cache)`;
  tokens with a negative position are padding (see `esjax.models.cache`). Positions default to
  `cache index + arange(S)`.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, plan: ParallelPlan | None = None):
    self.cfg = cfg
    self.plan = plan or ParallelPlan.single()
    self.embed = layers.param(rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"),
                              cfg.init_std, cfg.param_dtype)
    self.layers = nnx.List([Block(cfg, i, rngs, plan) for i in range(cfg.n_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.param(rngs, (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"),
                                  cfg.init_std, cfg.param_dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, S_c] -> residual stream [B, S_c/tp, D] (vocabulary-parallel lookup)."""
    return embed_lookup(self.embed[...], tokens, self.plan.tp, self.cfg.dtype)

  def head_weights(self) -> jax.Array:
    """[D, V_l]: the LM head (or the tied embedding), this rank's vocabulary shard."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

  def logits(self, x: jax.Array) -> jax.Array:
    """Residual stream [B, S_c/tp, D] -> float32 logits [B, S_c, V_l] (vocabulary shard)."""
    return head_logits(x, self.final_norm.scale[...], self.head_weights(), self.cfg.norm_eps,
                       self.plan.tp, vocab_of(self.cfg))

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
             mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The decoder without its head: tokens [B, S_c] -> (residual stream after the blocks
    [B, S_c/tp, D], the router statistics of its MoE layers). Training's and evaluation's
    forward (`__call__`, `esjax.models.loss.lm_loss`). positions None: 0 .. S-1 in every
    row, which the attention kernel knows statically."""
    _check_tokens(tokens)
    x = self.embed_tokens(tokens)
    stats = []
    for block in self.layers:
      x, s = run_block(block, x, positions, self.cfg.remat, mask)
      if s is not None:
        stats.append(s)
    return x, aggregate_moe_stats(self.cfg, stats)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               cache: list[KVCache] | None = None, mask: jax.Array | None = None):
    """(logits [B, S_c, V_l], router statistics), and the updated `cache` when given one."""
    if cache is None:
      x, stats = self.hidden(tokens, positions, mask)
      return self.logits(x), stats
    positions = _positions(tokens, positions, cache[0].index)
    x = self.embed_tokens(tokens)
    stats, new_cache = [], []
    for block, layer_cache in zip(self.layers, cache):
      x, s, c = block(x, positions, layer_cache, mask)
      new_cache.append(c)
      if s is not None:
        stats.append(s)
    return self.logits(x), aggregate_moe_stats(self.cfg, stats), new_cache


def _check_tokens(tokens: jax.Array) -> None:
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")


def _positions(tokens: jax.Array, positions: jax.Array | None, start) -> jax.Array:
  """`positions`, or start, start + 1, ... along each row of `tokens` [B, S]."""
  _check_tokens(tokens)
  if positions is not None:
    return positions
  return jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def embed_lookup(table: jax.Array, tokens: jax.Array, tp: tuple[str, ...], dtype
                 ) -> jax.Array:
  """Embedding rows of `tokens` [B, S] from this rank's vocabulary shard `table` [V/tp, D],
  summed over tp and scattered along the sequence: [B, S/tp, D] (Megatron's
  VocabParallelEmbedding with sequence parallelism)."""
  if not tp:
    return jnp.take(table, tokens, axis=0).astype(dtype)
  rows = table.shape[0]
  ids = tokens - col.axis_index(tp) * rows
  here = (ids >= 0) & (ids < rows)
  x = jnp.take(table, jnp.where(here, ids, 0), axis=0) * here[..., None].astype(table.dtype)
  return col.psum_scatter(x.astype(dtype), tp, 1)


def vocab_of(cfg: ModelConfig) -> int | None:
  """The vocabulary `head_logits` masks the padded head rows beyond (None: no padding)."""
  return cfg.vocab_size if cfg.padded_vocab != cfg.vocab_size else None


def head_logits(x: jax.Array, norm_scale: jax.Array, w: jax.Array, eps: float,
                tp: tuple[str, ...], vocab: int | None = None) -> jax.Array:
  """Final norm of the residual shard x [B, S/tp, D], gathered over tp along the sequence,
  times this rank's head shard w [D, V/tp]: float32 logits [B, S, V/tp]. With `vocab`, the
  columns of the padded vocabulary from `vocab` on are the lowest float32 (they take no
  probability in the loss, the softmax or sampling)."""
  h = col.all_gather(layers.rms_norm(x, norm_scale, eps), tp, 1)
  with jax.named_scope(SCOPE_LOGITS):
    logits = jnp.einsum("bsd,dv->bsv", h, w.astype(h.dtype),
                        preferred_element_type=jnp.float32)
  if vocab is None:
    return logits
  cols = col.axis_index(tp) * w.shape[1] + jnp.arange(w.shape[1])
  return jnp.where(cols < vocab, logits, jnp.finfo(jnp.float32).min)


def aggregate_moe_stats(cfg: ModelConfig, stats: list[dict[str, jax.Array]]
                        ) -> dict[str, jax.Array]:
  """Sums the weighted router losses over layers; reports their means over layers."""
  if not stats:
    return {"moe_loss": jnp.zeros((), jnp.float32)}
  stacked = {k: jnp.stack([s[k] for s in stats]) for k in stats[0]}
  return stacked_moe_stats(cfg, stacked)


def stacked_moe_stats(cfg: ModelConfig, stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`aggregate_moe_stats` of statistics stacked over MoE layers (leading axis)."""
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
      "ep_overflow_fraction": stacked["ep_overflow_fraction"],  # per MoE layer
  }
