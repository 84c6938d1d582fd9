"""The training objective: next-token cross-entropy plus the router losses.

A batch is a dict of int32 arrays `inputs` [B, S] and `targets` [B, S], and optionally
`mask` [B, S] (1 for tokens that count) and `positions` [B, S]. The same functions serve
training, validation, the parallel step and the DGS workers.

Under a plan with tp > 1 the logits are split over the vocabulary; `token_sums` computes the
cross-entropy as Megatron's vocabulary-parallel cross-entropy (max, sum of exponentials and
the target logit reduced over tp), never gathering [B, S, V]. The sums are over this device's
tokens; `finish` reduces them over the data axes (dp and cp) into the means.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.sharding import collectives as col

Sums = dict[str, jax.Array]


def token_sums(cfg: ModelConfig, logits: jax.Array, targets: jax.Array,
               mask: jax.Array | None, tp: tuple[str, ...]) -> Sums:
  """Sums over this device's tokens: `ce` (cross-entropy, masked), `tokens` (tokens that
  count) and, when cfg.max_z_loss_coef, `max_z` (Baichuan-2 max_v(z_v)^2, masked).

  logits [B, S, V_l] float32 (this rank's vocabulary shard), targets/mask [B, S].
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  shift = col.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), tp)  # any shift is exact
  lse = jnp.log(col.psum(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1), tp)) + shift
  local = targets - col.axis_index(tp) * vocab
  here = (local >= 0) & (local < vocab)
  picked = jnp.take_along_axis(logits, jnp.where(here, local, 0)[..., None], axis=-1)[..., 0]
  ce = lse - col.psum(jnp.where(here, picked, 0.0), tp)
  w = jnp.ones_like(ce) if mask is None else mask.astype(jnp.float32)
  out = {"ce": jnp.sum(ce * w), "tokens": jnp.sum(w)}
  if cfg.max_z_loss_coef:
    shard_max = jnp.max(logits, axis=-1, keepdims=True)  # max over V by gathering shard maxes
    z = jnp.max(col.all_gather(shard_max, tp, shard_max.ndim - 1), axis=-1)
    out["max_z"] = jnp.sum(jnp.square(z) * w)
  return out


def means(sums: Sums, data_axes: tuple[str, ...]) -> Sums:
  """The token sums of a (micro-)batch, reduced over `data_axes`, as means over its tokens
  that count (`ce`, `max_z`), beside their number (`tokens`)."""
  sums = col.psum(sums, data_axes)
  n = jnp.maximum(sums["tokens"], 1.0)
  return {k: v if k == "tokens" else v / n for k, v in sums.items()}


def total(cfg: ModelConfig, terms: Sums, moe_loss: jax.Array) -> jax.Array:
  """The objective: CE + the (already weighted) router losses + the weighted max-z loss."""
  out = terms["ce"] + moe_loss
  if cfg.max_z_loss_coef:
    out = out + cfg.max_z_loss_coef * terms["max_z"]
  return out


def finish(cfg: ModelConfig, sums: Sums, moe: dict[str, jax.Array],
           data_axes: tuple[str, ...]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total loss, metrics) of one (micro-)batch from its token sums and MoE statistics."""
  terms = means(sums, data_axes)
  loss = total(cfg, terms, moe["moe_loss"])
  metrics = {"ce_loss": terms["ce"], "n_tokens": terms["tokens"], **moe, "loss": loss}
  if cfg.max_z_loss_coef:
    metrics["max_z_loss"] = terms["max_z"]
  return loss, metrics


def lm_loss(model: Transformer, batch: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss = CE + router losses (already weighted) + max-z loss; metrics alongside.

  The model's own forward on one device, or on this device's shard of the batch inside the
  step's shard_map (then the means are over the whole batch)."""
  cfg, plan = model.cfg, model.plan
  x, moe = model.hidden(batch["inputs"], batch.get("positions"), batch.get("mask"))
  sums = token_sums(cfg, model.logits(x), batch["targets"], batch.get("mask"), plan.tp)
  return finish(cfg, sums, moe, plan.dp + plan.cp)
