"""Batches as the parallel step reads them: positions, CP load-balanced order, microbatches."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esjax.routing.expert_parallel import sequence_order
from esjax.sharding.plan import ParallelPlan

Batch = dict[str, jax.Array]


def with_positions(batch: Batch) -> Batch:
  """`batch` with `positions` [B, S] (0 .. S-1 in every row) unless it has them."""
  if "positions" in batch:
    return batch
  inputs = batch["inputs"]
  return dict(batch, positions=jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32),
                                                inputs.shape))


def prepare_batch(plan: ParallelPlan, batch: Batch) -> Batch:
  """Under CP: adds positions and, with load balancing, permutes every [B, S] array into the
  load-balanced sequence order (attention masks by the carried positions; the MoE's
  dropping decision is taken in the original order), so results equal the unpermuted run.
  Without CP a batch without positions keeps none: the model then knows statically that
  they are 0 .. S-1 (its attention skips the causal upper triangle)."""
  if not plan.cp:
    return batch
  batch = with_positions(batch)
  inputs = batch["inputs"]
  perm = sequence_order(plan, inputs.shape[1])
  if perm is None:
    return batch
  return {k: (v[:, perm] if v.shape[:2] == inputs.shape else v) for k, v in batch.items()}


def split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...]: batch row r goes to microbatch r % n.

  Strided, so a batch split over devices in contiguous blocks splits into the same
  microbatches on every device as on one device, and no data moves.
  """
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch {x.shape[0]} is not divisible by microbatches={n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)
