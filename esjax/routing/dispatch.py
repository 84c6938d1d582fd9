"""Token dispatch: which (token, slot) assignments an expert computes, and the grouped compute.

Dropless: every assignment is computed. Tokens are sorted by expert, the experts run as one
grouped matmul over contiguous row groups, and the results are unsorted and combined with the
routing weights.

Dropping: an expert computes at most `capacity = ceil(T * k / E * cf)` assignments; the
policy decides which (`probs`: highest routing weight first; `position`: earliest token
first). Dropped assignments contribute nothing (the residual carries the token). With
`pad_to_capacity` every expert computes exactly `capacity` rows in an [E, C, D] buffer.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# expert_fn(rows [N, D], group_sizes [E]) -> [N, D]; rows sorted by expert, rows past
# sum(group_sizes) are padding and must come back as zeros.
GroupedFn = Callable[[jax.Array, jax.Array], jax.Array]
# capacity_fn(buffers [E, C, D]) -> [E, C, D]
BatchedFn = Callable[[jax.Array], jax.Array]


class DispatchStats(NamedTuple):
  counts: jax.Array  # [E] int32 assignments routed to each expert (before dropping)
  drop_fraction: jax.Array  # scalar float32, dropped assignments / all assignments


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
  """Switch capacity ceil(T * k / E * cf), at least 1."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0 for token dropping")
  return max(1, math.ceil(n_tokens * top_k / n_experts * capacity_factor))


def positions_in_expert(indices: jax.Array, weights: jax.Array, n_experts: int,
                        policy: str) -> jax.Array:
  """Rank of each assignment [T, k] among those routed to the same expert, by policy.

  `position`: rank by token index (earliest first). `probs`: rank by weight, highest first,
  ties by token index. A token reaches an expert at most once, so ranks are unique.
  """
  n_tokens, top_k = indices.shape
  routed = jax.nn.one_hot(indices, n_experts, dtype=jnp.int32).sum(axis=1)  # [T, E] 0/1
  if policy == "position":
    rank_te = jnp.cumsum(routed, axis=0) - 1
  elif policy == "probs":
    w_te = jnp.zeros((n_tokens, n_experts), jnp.float32).at[
        jnp.arange(n_tokens)[:, None], indices].set(weights.astype(jnp.float32))
    key = jnp.where(routed > 0, w_te, -jnp.inf)
    # Sort each expert's column by (-weight, token index); rank = place in that order.
    token = jnp.broadcast_to(jnp.arange(n_tokens)[:, None], key.shape)
    _, order = jax.lax.sort((-key, token), dimension=0, num_keys=2)
    rank_te = jnp.zeros_like(order).at[order, jnp.arange(n_experts)[None, :]].set(
        jnp.broadcast_to(jnp.arange(n_tokens)[:, None], order.shape))
  else:
    raise ValueError(f"drop_policy={policy!r}, expected 'probs' or 'position'")
  return jnp.take_along_axis(rank_te, indices, axis=1)


def keep_mask(indices: jax.Array, weights: jax.Array, n_experts: int, capacity_: int,
              policy: str) -> jax.Array:
  """[T, k] bool: the assignments that fit in their expert's capacity under `policy`."""
  return positions_in_expert(indices, weights, n_experts, policy) < capacity_


def grouped_moe(x: jax.Array, indices: jax.Array, weights: jax.Array, n_experts: int,
                expert_fn: GroupedFn, keep: jax.Array | None = None,
                ) -> tuple[jax.Array, DispatchStats]:
  """Sort assignments by expert, run `expert_fn` on contiguous groups, unsort and combine.

  x: [T, D]; indices, weights: [T, k]; keep: optional [T, k] bool (dropped assignments are
  sorted past every group and not computed). Returns y [T, D] in x.dtype and the stats.
  """
  n_tokens, top_k = indices.shape
  flat_e = indices.reshape(-1)
  counts = jnp.bincount(flat_e, length=n_experts).astype(jnp.int32)
  if keep is None:
    sort_key = flat_e
    group_sizes = counts
    drop_fraction = jnp.zeros((), jnp.float32)
  else:
    flat_keep = keep.reshape(-1)
    sort_key = jnp.where(flat_keep, flat_e, n_experts)  # dropped rows sort last
    group_sizes = jnp.bincount(flat_e, weights=flat_keep.astype(jnp.int32), length=n_experts).astype(jnp.int32)
    drop_fraction = 1.0 - jnp.mean(flat_keep.astype(jnp.float32))
  order = jnp.argsort(sort_key, stable=True)
  rows = jnp.take(x, order // top_k, axis=0)
  out_sorted = expert_fn(rows, group_sizes)
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
  combine = weights.astype(jnp.float32)
  if keep is not None:
    combine = jnp.where(keep, combine, 0.0)
  y = jnp.einsum("tkd,tk->td", out.reshape(n_tokens, top_k, -1).astype(jnp.float32), combine)
  return y.astype(x.dtype), DispatchStats(counts, drop_fraction)


def capacity_moe(x: jax.Array, indices: jax.Array, weights: jax.Array, n_experts: int,
                 capacity_: int, policy: str, expert_fn: BatchedFn,
                 ) -> tuple[jax.Array, DispatchStats]:
  """Dropping with buffers padded to capacity: every expert computes exactly C rows."""
  n_tokens, top_k = indices.shape
  pos = positions_in_expert(indices, weights, n_experts, policy)
  keep = pos < capacity_
  counts = jnp.bincount(indices.reshape(-1), length=n_experts).astype(jnp.int32)
  # Slot of each kept assignment in the flat [E * C] buffer; dropped ones go to a spill row.
  slot = jnp.where(keep, indices * capacity_ + pos, n_experts * capacity_)
  token = jnp.broadcast_to(jnp.arange(n_tokens)[:, None], indices.shape)
  buffers = jnp.zeros((n_experts * capacity_ + 1, x.shape[-1]), x.dtype).at[
      slot.reshape(-1)].set(jnp.take(x, token.reshape(-1), axis=0))
  out = expert_fn(buffers[:-1].reshape(n_experts, capacity_, -1)).reshape(-1, x.shape[-1])
  out = jnp.concatenate([out, jnp.zeros_like(out[:1])], axis=0)
  gathered = jnp.take(out, slot.reshape(-1), axis=0).reshape(n_tokens, top_k, -1)
  combine = jnp.where(keep, weights.astype(jnp.float32), 0.0)
  y = jnp.einsum("tkd,tk->td", gathered.astype(jnp.float32), combine)
  drop_fraction = 1.0 - jnp.mean(keep.astype(jnp.float32))
  return y.astype(x.dtype), DispatchStats(counts, drop_fraction)
