"""Token dispatch: which (token, slot) assignments an expert computes, and in which buffer row.

An assignment is one of a token's top-k choices, numbered `a = token * k + slot`. Dispatch
gathers each computed assignment's token into a row of an expert buffer, the expert compute
runs on that buffer, and the combine gathers each assignment's output back and sums a
token's outputs with its routing weights. Both moves are `grouped.take_rows` gathers (their
backward passes are gathers too); dropped assignments read zeros and are never computed.

Dropless (`grouped_moe`, keep=None): every assignment is computed. Rows are sorted by expert
into contiguous groups for a grouped matmul (`lax.ragged_dot` or the blocked CPU layout).

Dropping: an expert computes at most `capacity = ceil(T * k / E * cf)` assignments; the
policy decides which (`probs`: highest routing weight first; `position`: earliest token
first), ranked explicitly by `positions_in_expert`. Dropped assignments contribute nothing
(the residual carries the token). `grouped_moe(..., keep)` computes the kept rows only;
`capacity_moe` (pad_to_capacity) gives every expert exactly `capacity` rows in [E, C, D].
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from esjax.routing.grouped import take_rows
from esjax.sharding import collectives as col

# expert_fn(rows [N, D], group_sizes [E]) -> [N, D]; rows sorted by expert, rows past
# sum(group_sizes) are padding (their output is never read).
GroupedFn = Callable[[jax.Array, jax.Array], jax.Array]
# capacity_fn(buffers [E, C, D]) -> [E, C, D]
BatchedFn = Callable[[jax.Array], jax.Array]


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
  """Switch / Megatron capacity ceil(T * k / E * cf), at least 1."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0 for token dropping")
  return max(1, math.ceil(n_tokens * top_k / n_experts * capacity_factor))


def positions_in_expert(indices: jax.Array, weights: jax.Array, n_experts: int,
                        policy: str) -> jax.Array:
  """Rank [T, k] int32 of each assignment among those routed to the same expert, by policy.

  `position`: rank by token index (earliest first), a cumulative count over tokens.
  `probs`: rank by routing weight, highest first, ties to the lower token index (an explicit
  second sort key). A token reaches an expert at most once, so ranks within an expert are
  0, 1, 2, ... with no repeats; an assignment is kept when its rank < capacity.
  """
  n_tokens, _ = indices.shape
  routed = jax.nn.one_hot(indices, n_experts, dtype=jnp.int32).sum(axis=1)  # [T, E] 0/1
  if policy == "position":
    rank_te = jnp.cumsum(routed, axis=0) - 1
  elif policy == "probs":
    w = weights.astype(jnp.float32) + 0.0  # -0.0 -> +0.0
    w_te = jnp.zeros((n_tokens, n_experts), jnp.float32).at[
        jnp.arange(n_tokens)[:, None], indices].set(w)
    neg_key = jnp.where(routed > 0, -w_te, jnp.inf)  # unrouted pairs sort last
    token = jnp.broadcast_to(jnp.arange(n_tokens, dtype=jnp.int32)[:, None], neg_key.shape)
    _, order = jax.lax.sort((neg_key, token), dimension=0, num_keys=2)  # order[r, e]: token
    rank_te = jnp.zeros_like(order).at[order, jnp.arange(n_experts)[None, :]].set(
        jnp.broadcast_to(jnp.arange(n_tokens, dtype=jnp.int32)[:, None], order.shape))
  else:
    raise ValueError(f"drop_policy={policy!r}, expected 'probs' or 'position'")
  return jnp.take_along_axis(rank_te, indices, axis=1).astype(jnp.int32)


def keep_mask(indices: jax.Array, weights: jax.Array, n_experts: int, capacity_: int,
              policy: str) -> jax.Array:
  """[T, k] bool: the assignments that fit in their expert's capacity under `policy`."""
  return positions_in_expert(indices, weights, n_experts, policy) < capacity_


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, a, b)` in float32, whose backward keeps a and b in their own dtypes
  and casts them again (exact): autodiff would keep the float32 copies, twice a bf16
  operand's bytes, for every microbatch a pipeline stage holds."""
  return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))


def _einsum_f32_fwd(spec, a, b):
  return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, res, g):
  a, b = res
  _, pull = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a.astype(jnp.float32),
                    b.astype(jnp.float32))
  return tuple(col.like_primal(d.astype(x.dtype), x) for d, x in zip(pull(g), res))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def _combine(out: jax.Array, weights: jax.Array | None, keep: jax.Array | None,
             top_k: int) -> jax.Array:
  """y[t] = sum_j w[t, j] * out[t * k + j] in float32 (w = 1 where `weights` is None);
  dropped assignments weigh 0."""
  out = out.reshape(-1, top_k, out.shape[-1])
  if weights is None:  # constant weights: autodiff keeps only them, [T, k]
    w = jnp.ones(out.shape[:2], jnp.float32) if keep is None else keep.astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", out.astype(jnp.float32), w)
  w = weights.astype(jnp.float32)
  if keep is not None:
    w = jnp.where(keep, w, 0.0)
  return einsum_f32("tkd,tk->td", out, w)


def grouped_moe(x: jax.Array, indices: jax.Array, weights: jax.Array | None, n_experts: int,
                expert_fn: GroupedFn, keep: jax.Array | None = None,
                ) -> jax.Array:
  """Sort assignments by expert, run `expert_fn` on contiguous groups, gather back, combine.

  x: [T, D]; indices, weights: [T, k] (weights None: each assignment weighs 1); keep:
  optional [T, k] bool (dropped assignments are placed after every group and not computed).
  Returns y [T, D] in x.dtype.
  """
  n_tokens, top_k = indices.shape
  n = n_tokens * top_k
  flat_e = indices.reshape(-1).astype(jnp.int32)
  if keep is None:
    kept = jnp.ones((n,), bool)
    group_sizes = jnp.bincount(flat_e, length=n_experts).astype(jnp.int32)
  else:
    kept = keep.reshape(-1)
    group_sizes = jnp.bincount(jnp.where(kept, flat_e, n_experts), length=n_experts
                               ).astype(jnp.int32)
  # The buffer row of each assignment: its expert's group, any order inside the group.
  order = jnp.argsort(jnp.where(kept, flat_e, n_experts))  # row -> assignment
  pos = jnp.arange(n, dtype=jnp.int32)
  row = jnp.zeros((n,), jnp.int32).at[order].set(pos)  # assignment -> row
  src = jnp.where(pos < jnp.sum(group_sizes), order, n).astype(jnp.int32)  # n: empty row
  row = jnp.where(kept, row, n)
  rows = take_rows(jnp.repeat(x, top_k, axis=0), src, row)
  out = take_rows(expert_fn(rows, group_sizes), row, src)
  return _combine(out, weights, keep, top_k).astype(x.dtype)


def capacity_moe(x: jax.Array, indices: jax.Array, weights: jax.Array, n_experts: int,
                 capacity_: int, positions: jax.Array, expert_fn: BatchedFn,
                 ) -> jax.Array:
  """Dropping with buffers padded to capacity: every expert computes exactly C rows.

  `positions` [T, k]: each assignment's rank in its expert (`positions_in_expert`, or ranks
  decided over more tokens than these); assignments ranked >= C are dropped.
  """
  n_tokens, top_k = indices.shape
  n = n_tokens * top_k
  keep = positions < capacity_
  n_rows = n_experts * capacity_
  row = jnp.where(keep, indices * capacity_ + positions, n_rows).reshape(-1).astype(jnp.int32)
  src = jnp.full((n_rows,), n, jnp.int32).at[row].set(jnp.arange(n, dtype=jnp.int32),
                                                     mode="drop")
  buffers = take_rows(jnp.repeat(x, top_k, axis=0), src, row)
  out = expert_fn(buffers.reshape(n_experts, capacity_, -1)).reshape(n_rows, -1)
  out = take_rows(out, row, src)
  return _combine(out, weights, keep, top_k).astype(x.dtype)
