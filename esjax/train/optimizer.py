"""The optimizer: AdamW (decoupled weight decay on matrices only) with linear warmup then
cosine or constant learning rate, after global-norm gradient clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from esjax.parallel.stages import STAGES


def learning_rate(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * final_lr_fraction` at
  `total_steps`, or constant `lr`."""
  lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
  if optim_cfg.schedule == "constant":
    if not warmup:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if optim_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=lr * optim_cfg.final_lr_fraction)
  raise ValueError(f"optim.schedule={optim_cfg.schedule!r}, expected 'cosine' or 'constant'")


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and expert stacks (ndim >= 2), not on norms or biases. Layer
  stacks of the train state (`esjax.parallel.stages`) have three leading stack dimensions."""
  def decayed(path, p):
    stacked = getattr(path[0], "key", None) == STAGES if path else False
    return p.ndim - (3 if stacked else 0) >= 2
  return jax.tree_util.tree_map_with_path(decayed, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Gradients times min(1, max_norm / global norm): optax's clipping, by a scalar.

  optax divides every element by the norm, and XLA does not duplicate a division into two
  consumers, so the clipped gradients are written out and read back by both Adam moments.
  A scalar factor fuses into them: the ~100M MoE step of `benchmarks.mfu` on CPU ran 3.4%
  faster (2,189 vs 2,268 ms, interleaved), its AdamW fusions one pass per leaf fewer."""
  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_cfg: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate(optim_cfg, total_steps)
  adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  if optim_cfg.grad_clip > 0:
    return optax.chain(clip_by_global_norm(optim_cfg.grad_clip), adamw), schedule
  return adamw, schedule
