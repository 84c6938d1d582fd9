"""Router math: scores, top-k in both orders, and the auxiliary losses.

Pure functions on router logits `[tokens, experts]` (float32). The MoE block, the
expert-parallel dispatcher and the Pallas kernel all use these; the kernel is tested
against `route`.

Orders (see shared/reference/megatron.md section 3.2):
  topk_softmax: top-k of the logits, softmax over the k (Mixtral).
  softmax_topk: scores over all experts (softmax or sigmoid), top-k of the scores,
                optionally renormalised to sum to 1 (Qwen2-MoE with norm_topk_prob;
                sigmoid with k > 1 by default, as Megatron and DeepSeek-V3).
Selection only (the weights are the unbiased scores), as Megatron and DeepSeek-V3:
  bias:   an expert bias added to the sigmoid scores (DeepSeek-V3's
          `e_score_correction_bias`), updated outside the gradient (`update_expert_bias`);
  groups: group-limited top-k, the experts in `n_groups` equal groups and each token
          choosing among its best `top_k_groups` groups (`group_limited_keys`).
Ties go to the lowest expert index, as `jax.lax.top_k`; -0.0 is treated as +0.0, and NaN
ranks above +inf (NaN logits route deterministically: lowest NaN index first). Selection
and weighting are separate (`routing_from_indices`) so the Pallas kernel shares the math.

Losses take an optional token `mask` [T] (1: the token counts): padding is excluded
exactly as Megatron's `padding_mask` does (moe_utils.py). `switch_loss` is the balance
loss from per-expert sums, for callers that reduce counts over ranks or microbatches.
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


def resolve_renormalize(renormalize: bool | None, score_fn: str, top_k: int) -> bool:
  """Whether softmax_topk divides the k weights by their sum. None (the default): sigmoid
  scores with k > 1 do (Megatron's topk_routing_with_score_function, DeepSeek-V3's
  norm_topk_prob), softmax scores do not (Megatron's pre-softmax, Qwen2-MoE's default)."""
  if renormalize is None:
    return score_fn == "sigmoid" and top_k > 1
  return bool(renormalize)


def group_limited_keys(keys: jax.Array, n_groups: int, top_k_groups: int, top_k: int
                       ) -> jax.Array:
  """`keys` [T, E] with every expert outside the token's best `top_k_groups` groups at -inf.

  Experts form `n_groups` groups of E / n_groups consecutive experts; a group's score is
  the sum of its top (top_k // top_k_groups) keys (Megatron's group_limited_topk;
  transformers' DeepSeek-V3 router sums the top 2, the same for DeepSeek-V3's k=8 of 4
  groups). Ties between groups go to the lowest group index.
  """
  n_tokens, n_experts = keys.shape
  if n_groups < 1 or n_experts % n_groups:
    raise ValueError(f"n_groups={n_groups} must be >= 1 and divide n_experts={n_experts}")
  per_group = n_experts // n_groups
  if not 1 <= top_k_groups <= n_groups or not 1 <= top_k // top_k_groups <= per_group:
    raise ValueError(f"top_k_groups={top_k_groups} must be in [1, n_groups={n_groups}] "
                     f"with top_k // top_k_groups (top_k={top_k}) in [1, {per_group}]")
  grouped = canonical_keys(keys).reshape(n_tokens, n_groups, per_group)
  group_scores = jnp.sum(jax.lax.top_k(grouped, top_k // top_k_groups)[0], axis=-1)
  _, best = jax.lax.top_k(canonical_keys(group_scores), top_k_groups)
  chosen = jnp.any(jax.nn.one_hot(best, n_groups, dtype=jnp.bool_), axis=1)  # [T, G]
  return jnp.where(jnp.repeat(chosen, per_group, axis=1), keys, -jnp.inf)


def topk_indices(keys: jax.Array, top_k: int) -> jax.Array:
  """[T, k] int32 indices of the k largest keys per row (ties: lowest index first)."""
  return jax.lax.top_k(canonical_keys(keys), top_k)[1].astype(jnp.int32)


def route(logits: jax.Array, top_k: int, *, score_fn: str = "softmax",
          order: str = "topk_softmax", renormalize: bool | None = None,
          scaling: float = 1.0, bias: jax.Array | None = None, n_groups: int = 1,
          top_k_groups: int = 1) -> Routing:
  """Top-k routing of `logits` [T, E] in the given order. Weights are float32.

  `bias` [E] (sigmoid only) and the group limit change which experts are chosen, not
  their weights: DeepSeek-V3's gate (transformers' DeepseekV3TopkRouter).
  """
  check_order(score_fn, order)
  if bias is not None and score_fn != "sigmoid":
    raise ValueError(f"an expert bias needs score_fn='sigmoid', got {score_fn!r}")
  logits = logits.astype(jnp.float32)
  keys = logits if order == "topk_softmax" else scores(logits, score_fn)
  if bias is not None:
    keys = keys + jax.lax.stop_gradient(bias.astype(jnp.float32))
  if n_groups > 1:
    keys = group_limited_keys(keys, n_groups, top_k_groups, top_k)
  return routing_from_indices(logits, topk_indices(keys, top_k), score_fn=score_fn,
                              order=order, renormalize=renormalize, scaling=scaling)


def routing_from_indices(logits: jax.Array, indices: jax.Array, *, score_fn: str = "softmax",
                         order: str = "topk_softmax", renormalize: bool | None = None,
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
    if resolve_renormalize(renormalize, score_fn, indices.shape[-1]):
      weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  if score_fn == "sigmoid":  # the balance loss wants a distribution over experts
    probs = probs / (jnp.sum(probs, axis=-1, keepdims=True) + 1e-20)
  return Routing(weights * scaling, indices, probs)


def _token_weights(n_tokens: int, mask: jax.Array | None) -> jax.Array:
  """[T] float32: 1 for tokens that count (all without a mask)."""
  if mask is None:
    return jnp.ones((n_tokens,), jnp.float32)
  return mask.reshape(n_tokens).astype(jnp.float32)


def expert_counts(indices: jax.Array, n_experts: int, mask: jax.Array | None = None
                  ) -> jax.Array:
  """Number of (token, slot) assignments per expert, [E] int32; with `mask` [T], only those
  of the tokens that count."""
  onehot = jax.nn.one_hot(indices.reshape(indices.shape[0], -1), n_experts, dtype=jnp.int32)
  if mask is not None:
    onehot = onehot * mask.reshape(-1, 1, 1).astype(jnp.int32)
  return jnp.sum(onehot, axis=(0, 1))


def switch_loss(probs_sum: jax.Array, counts: jax.Array, n_tokens: jax.Array, top_k: int
                ) -> jax.Array:
  """E / (k T^2) * sum_e probs_sum_e * counts_e: Megatron's switch_load_balancing_loss_func.

  probs_sum [..., E]: sums of the scores over tokens (the gradient flows through these);
  counts [..., E]: assignments per expert (no gradient); n_tokens: the T that counts and
  f = counts / (k T) refer to. Give the sums at the level the loss is defined on: this
  batch, this rank's tokens with counts reduced over ranks (each rank's share then adds up
  to the global loss), or counts accumulated over microbatches (global-batch balance).
  """
  n_experts = probs_sum.shape[-1]
  n = jnp.maximum(jnp.asarray(n_tokens, jnp.float32), 1.0)
  f = jax.lax.stop_gradient(counts.astype(jnp.float32)) / (top_k * n)
  return n_experts * jnp.sum(f * probs_sum.astype(jnp.float32) / n, axis=-1)


def balance_sums(probs: jax.Array, indices: jax.Array, weights: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """The sums the Switch loss is made of, over tokens with `weights` [T] (1: counts):
  (scores summed per expert [E], assignments per expert [E])."""
  probs_sum = jnp.sum(probs.astype(jnp.float32) * weights[:, None], axis=0)
  return probs_sum, expert_counts(indices, probs.shape[-1], weights)


def seq_balance_sums(probs: jax.Array, indices: jax.Array, weights: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """`balance_sums` per sequence: probs [B*S, E], indices [B*S, k], weights [B, S] ->
  ([B, E], [B, E])."""
  b, s = weights.shape
  return jax.vmap(balance_sums)(probs.reshape(b, s, -1), indices.reshape(b, s, -1), weights)


def z_loss_sum(logits: jax.Array, weights: jax.Array) -> jax.Array:
  """Sum over tokens with `weights` [T] of logsumexp(logits)^2 (the z-loss's numerator)."""
  return jnp.sum(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)) * weights)


def load_balancing_loss(probs: jax.Array, indices: jax.Array, mask: jax.Array | None = None
                        ) -> jax.Array:
  """Switch loss E * sum_i f_i P_i with f_i = count_i / (T k): 1.0 when balanced, E when collapsed.

  probs: [T, E] scores over all experts; indices: [T, k]; mask: [T] (T = tokens that count).
  Gradient flows through P only.
  """
  w = _token_weights(probs.shape[0], mask)
  return switch_loss(*balance_sums(probs, indices, w), jnp.sum(w), indices.shape[-1])


def seq_load_balancing_loss(probs: jax.Array, indices: jax.Array, batch: int,
                            mask: jax.Array | None = None) -> jax.Array:
  """Sequence-level Switch loss: the balance loss of each sequence, averaged over the batch.

  Tokens are [B * S] in batch-major order. With a `mask`, T is the mean number of tokens
  that count per sequence, for every sequence (Megatron's _apply_seq_aux_loss).
  """
  w = _token_weights(probs.shape[0], mask).reshape(batch, -1)
  sums = seq_balance_sums(probs, indices, w)
  return jnp.mean(switch_loss(*sums, jnp.sum(w) / batch, indices.shape[-1]))


def z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens (that count) of logsumexp(logits)^2 (zero
  logits: log(E)^2)."""
  w = _token_weights(logits.shape[0], mask)
  return z_loss_sum(logits, w) / jnp.maximum(jnp.sum(w), 1.0)


def update_expert_bias(bias: jax.Array, expert_load: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing: bias + rate * sign(mean load - load), per row of experts.

  `expert_load` [..., E]: assignments (or their fractions) per expert over the global batch,
  padding excluded (Megatron's get_updated_expert_bias; DeepSeek-V3 section 2.1.2). Applied
  outside the gradient, once per optimizer step.
  """
  load = jax.lax.stop_gradient(expert_load.astype(jnp.float32))
  offset = jnp.mean(load, axis=-1, keepdims=True) - load
  return (bias + rate * jnp.sign(offset)).astype(bias.dtype)


def max_z_loss(lm_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Baichuan-2 max-z loss on LM-head logits: mean over tokens of max_v(z_v)^2."""
  per_token = jnp.square(jnp.max(lm_logits.astype(jnp.float32), axis=-1))
  if mask is None:
    return jnp.mean(per_token)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
