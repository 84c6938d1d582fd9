"""Small building blocks: parameter creation with logical axes, RMSNorm, RoPE.

Every parameter names its dimensions logically in flax's `out_sharding` metadata (`embed`,
`heads`, `mlp`, `exp`, ...); `esjax.parallel.rules` maps the names onto a plan's mesh axes
with flax's `nnx.get_partition_spec`. esjax places parameters itself (jit out_shardings), so
flax's eager sharding of new variables is off (`esjax/__init__.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...],
          std: float, dtype: str = "float32") -> nnx.Param:
  """A normal(0, std) parameter whose `out_sharding` metadata names each dimension."""
  if len(shape) != len(axes):
    raise ValueError(f"param: shape {shape} and logical axes {axes} differ in rank")
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), out_sharding=tuple(axes))


def const_param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(axes))


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32 (HF Llama's LlamaRMSNorm)."""

  def __init__(self, dim: int, eps: float, dtype: str = "float32"):
    self.eps = eps
    self.scale = const_param(jnp.ones((dim,), dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale over the last axis, in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float
                ) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [..., seq, head_dim] for integer `positions` [..., seq]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE (HF Llama layout). x: [batch, seq, heads, head_dim]; cos/sin [batch, seq, hd]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  x32 = x.astype(jnp.float32)
  out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)
