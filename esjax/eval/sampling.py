"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

The filters run in the order Hugging Face `generate` applies them: temperature, then top-k,
then top-p. `temperature == 0` is greedy (argmax) and ignores the other settings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick each token. Hashable: it is a static argument of the jitted decode step."""

  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
  top_k: int = 0  # 0: no top-k filter

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """Temperature-scaled float32 logits [B, V] with filtered-out tokens set to -inf."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < sampling.top_p  # the first token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens [B] int32 for logits [B, V]."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)
