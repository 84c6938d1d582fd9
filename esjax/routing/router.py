"""Router math: scores, top-k in both orders, and the auxiliary losses.

Pure functions on router logits `[tokens, experts]` (float32). The MoE block, the
expert-parallel dispatcher and the Pallas kernel all use these; the kernel is tested
against `route`.

Orders (see shared/reference/megatron.md section 3.2):
  topk_softmax: top-k of the logits, softmax over the k (Mixtral).
  softmax_topk: scores over all experts (softmax or sigmoid), top-k of the scores,
                optionally renormalised to sum to 1 (Qwen2-MoE with norm_topk_prob,
                DeepSeek-V3 with sigmoid).
Ties go to the lowest expert index, as `jax.lax.top_k`; -0.0 is treated as +0.0, and NaN
ranks above +inf (NaN logits route deterministically: lowest NaN index first). Selection
and weighting are separate (`routing_from_indices`) so the Pallas kernel shares the math.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  weights: jax.Array  # [T, k] float32, combine weights of the chosen experts
  indices: jax.Array  # [T, k] int32, chosen experts, best first
  probs: jax.Array  # [T, E] float32, scores over all experts (what the balance loss uses)


def scores(logits: jax.Array, score_fn: str) -> jax.Array:
  if score_fn == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if score_fn == "sigmoid":
    return jax.nn.sigmoid(logits)
  raise ValueError(f"score_fn={score_fn!r}, expected 'softmax' or 'sigmoid'")


def canonical_keys(x: jax.Array) -> jax.Array:
  """Top-k keys with a platform-independent order: -0.0 -> +0.0 and every NaN -> +NaN.

  `lax.top_k` uses a total order (+0.0 > -0.0, +NaN > +inf > ... > -NaN) that depends on
  bits an op may set differently per platform; on these keys ties (zeros, NaNs) go to the
  lowest index. Used for selection only, so gradients are untouched.
  """
  x = jnp.where(x == 0, jnp.zeros_like(x), x)
  return jnp.where(jnp.isnan(x), jnp.full_like(x, jnp.nan), x)


def check_order(score_fn: str, order: str) -> None:
  if order not in ("topk_softmax", "softmax_topk"):
    raise ValueError(f"order={order!r}, expected 'topk_softmax' or 'softmax_topk'")
  if score_fn not in ("softmax", "sigmoid"):
    raise ValueError(f"score_fn={score_fn!r}, expected 'softmax' or 'sigmoid'")
  if order == "topk_softmax" and score_fn != "softmax":
    raise ValueError(f"order='topk_softmax' needs score_fn='softmax', got {score_fn!r}")


def route(logits: jax.Array, top_k: int, *, score_fn: str = "softmax",
          order: str = "topk_softmax", renormalize: bool = False,
          scaling: float = 1.0) -> Routing:
  """Top-k routing of `logits` [T, E] in the given order. Weights are float32."""
  check_order(score_fn, order)
  logits = logits.astype(jnp.float32)
  keys = logits if order == "topk_softmax" else scores(logits, score_fn)
  _, indices = jax.lax.top_k(canonical_keys(keys), top_k)
  return routing_from_indices(logits, indices.astype(jnp.int32), score_fn=score_fn,
                              order=order, renormalize=renormalize, scaling=scaling)


def routing_from_indices(logits: jax.Array, indices: jax.Array, *, score_fn: str = "softmax",
                         order: str = "topk_softmax", renormalize: bool = False,
                         scaling: float = 1.0) -> Routing:
  """The Routing of `logits` [T, E] given the chosen experts `indices` [T, k] (best first).

  The math after selection: `route` uses it, and the Pallas kernel differentiates it with its
  own indices in the backward pass (gather = the gradient of top-k's values).
  """
  check_order(score_fn, order)
  logits = logits.astype(jnp.float32)
  probs = scores(logits, score_fn)
  if order == "topk_softmax":
    weights = jax.nn.softmax(jnp.take_along_axis(logits, indices, axis=-1), axis=-1)
  else:
    weights = jnp.take_along_axis(probs, indices, axis=-1)
    if renormalize:
      weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  if score_fn == "sigmoid":  # the balance loss wants a distribution over experts
    probs = probs / (jnp.sum(probs, axis=-1, keepdims=True) + 1e-20)
  return Routing(weights * scaling, indices, probs)


def expert_counts(indices: jax.Array, n_experts: int) -> jax.Array:
  """Number of (token, slot) assignments per expert, [E] int32."""
  onehot = jax.nn.one_hot(indices.reshape(-1), n_experts, dtype=jnp.int32)
  return jnp.sum(onehot, axis=0)


def load_balancing_loss(probs: jax.Array, indices: jax.Array) -> jax.Array:
  """Switch loss E * sum_i f_i P_i with f_i = count_i / (T k): 1.0 when balanced, E when collapsed.

  probs: [T, E] scores over all experts; indices: [T, k]. Gradient flows through P only.
  """
  n_tokens, n_experts = probs.shape
  top_k = indices.shape[-1]
  f = expert_counts(indices, n_experts).astype(jnp.float32) / (n_tokens * top_k)
  p = jnp.mean(probs.astype(jnp.float32), axis=0)
  return n_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def seq_load_balancing_loss(probs: jax.Array, indices: jax.Array, batch: int) -> jax.Array:
  """Sequence-level Switch loss: the balance loss of each sequence, averaged over the batch."""
  n_tokens, n_experts = probs.shape
  probs = probs.reshape(batch, n_tokens // batch, n_experts)
  indices = indices.reshape(batch, n_tokens // batch, -1)
  return jnp.mean(jax.vmap(load_balancing_loss)(probs, indices))


def z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (zero logits: log(E)^2)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def max_z_loss(lm_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Baichuan-2 max-z loss on LM-head logits: mean over tokens of max_v(z_v)^2."""
  per_token = jnp.square(jnp.max(lm_logits.astype(jnp.float32), axis=-1))
  if mask is None:
    return jnp.mean(per_token)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
