"""The training objective: next-token cross-entropy plus the router losses.

A batch is a dict of int32 arrays `inputs` [B, S] and `targets` [B, S], and optionally
`mask` [B, S] (1 for tokens that count). The same function serves training, validation,
the parallel tests and the DGS workers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from esjax.models.transformer import Transformer
from esjax.routing import router


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy (float32) and the number of tokens it averages over."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  if mask is None:
    return jnp.mean(ce), jnp.asarray(ce.size, jnp.float32)
  mask = mask.astype(jnp.float32)
  n = jnp.sum(mask)
  return jnp.sum(ce * mask) / jnp.maximum(n, 1.0), n


def lm_loss(model: Transformer, batch: dict[str, jax.Array]
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss = CE + router losses (already weighted) + max-z loss; metrics alongside."""
  cfg = model.cfg
  logits, aux = model(batch["inputs"], batch.get("positions"))
  ce, n_tokens = cross_entropy(logits, batch["targets"], batch.get("mask"))
  total = ce + aux["moe_loss"]
  metrics = {"ce_loss": ce, "n_tokens": n_tokens, **aux}
  if cfg.max_z_loss_coef:
    mz = router.max_z_loss(logits, batch.get("mask"))
    total = total + cfg.max_z_loss_coef * mz
    metrics["max_z_loss"] = mz
  metrics["loss"] = total
  return total, metrics
