"""Router math: scores, top-k in both orders, and the auxiliary losses.

Pure functions on router logits `[tokens, experts]` (float32). The MoE block, the
expert-parallel dispatcher and the Pallas kernel all use these; the kernel is tested
against `route`.

Orders (see shared/reference/megatron.md section 3.2):
  topk_softmax: top-k of the logits, softmax over the k (Mixtral).
  softmax_topk: scores over all experts (softmax or sigmoid), top-k of the scores,
                optionally renormalised to sum to 1 (Qwen2-MoE with norm_topk_prob,
                DeepSeek-V3 with sigmoid).
Ties go to the lowest expert index, as `jax.lax.top_k`; -0.0 is treated as +0.0.
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


def canonical_zero(x: jax.Array) -> jax.Array:
  """Maps -0.0 to +0.0 so that top-k ties between zeros go to the lowest index."""
  return jnp.where(x == 0, jnp.zeros_like(x), x)


def route(logits: jax.Array, top_k: int, *, score_fn: str = "softmax",
          order: str = "topk_softmax", renormalize: bool = False,
          scaling: float = 1.0) -> Routing:
  """Top-k routing of `logits` [T, E] in the given order. Weights are float32."""
  logits = canonical_zero(logits.astype(jnp.float32))
  probs = scores(logits, score_fn)
  if order == "topk_softmax":
    if score_fn != "softmax":
      raise ValueError(f"order='topk_softmax' needs score_fn='softmax', got {score_fn!r}")
    top_logits, indices = jax.lax.top_k(logits, top_k)
    weights = jax.nn.softmax(top_logits, axis=-1)
  elif order == "softmax_topk":
    weights, indices = jax.lax.top_k(canonical_zero(probs), top_k)
    if renormalize:
      weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  else:
    raise ValueError(f"order={order!r}, expected 'topk_softmax' or 'softmax_topk'")
  if score_fn == "sigmoid":  # the balance loss wants a distribution over experts
    probs = probs / (jnp.sum(probs, axis=-1, keepdims=True) + 1e-20)
  return Routing(weights * scaling, indices.astype(jnp.int32), probs)


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
