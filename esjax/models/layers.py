"""Small building blocks: parameter creation with logical axes, RMSNorm, RoPE.

Every parameter names its dimensions logically in flax's `out_sharding` metadata (`embed`,
`heads`, `mlp`, `exp`, ...); `esjax.parallel.rules` maps the names onto a plan's mesh axes
with flax's `nnx.get_partition_spec`. esjax places parameters itself (jit out_shardings), so
flax's eager sharding of new variables is off (`esjax/__init__.py`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from esjax.models.config import ModelConfig
from esjax.sharding import collectives as col


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
  """y = x / rms(x) * scale, computed in float32 (HF Llama's LlamaRMSNorm), over the trailing
  dimensions `shape` of x (one dimension, or e.g. (heads, head_dim) for OLMoE's q/k norm)."""

  def __init__(self, shape: int | tuple[int, ...], eps: float, dtype: str = "float32",
               axes: tuple[str | None, ...] = ("norm",)):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    self.eps = eps
    self.scale = const_param(jnp.ones(shape, dtype), axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale over the trailing `scale.ndim` axes, in float32, returned in x's
  dtype. Its backward keeps x (in its own dtype) and 1 / rms(x): autodiff of the float32
  arithmetic would keep three float32 copies of x's size, 6x the bytes of a bf16 x."""
  return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
  x32 = x.astype(jnp.float32)
  dims = tuple(range(-scale.ndim, 0))
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=dims, keepdims=True) + eps)
  return (x32 * inv * scale.astype(jnp.float32)).astype(x.dtype), (x, scale, inv)


def _rms_norm_bwd(eps, res, dy):
  """n = x / rms(x): dx = (dn - n mean(dn n)) / rms(x) with dn = dy * scale; dscale = the
  sum of dy * n over the leading axes."""
  del eps
  x, scale, inv = res
  dims = tuple(range(-scale.ndim, 0))
  n = x.astype(jnp.float32) * inv
  g = dy.astype(jnp.float32)
  dn = g * scale.astype(jnp.float32)
  dx = inv * (dn - n * jnp.mean(dn * n, axis=dims, keepdims=True))
  dscale = jnp.sum(g * n, axis=tuple(range(x.ndim - scale.ndim)))
  return (col.like_primal(dx.astype(x.dtype), x),
          col.like_primal(dscale.astype(scale.dtype), scale))


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rope_frequencies(cfg: ModelConfig, seq_len: jax.Array | None = None
                     ) -> tuple[jax.Array, float]:
  """(inverse frequencies [head_dim / 2] float32, cos/sin scale) of `cfg`'s RoPE, as
  transformers' modeling_rope_utils computes them for `cfg.rope_type`.

  "dynamic" (NTK) raises the base once the sequence is longer than `effective_rope_original_max_len`:
  `seq_len` is the current length, max position + 1 (transformers' dynamic_rope_update).
  """
  dim, base, kind, factor = cfg.effective_head_dim, cfg.rope_theta, cfg.rope_type, cfg.rope_factor
  orig = cfg.effective_rope_original_max_len
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  if kind == "dynamic":
    seq = jnp.maximum(jnp.asarray(orig if seq_len is None else seq_len, jnp.float32), orig)
    base = base * ((factor * seq / orig) - (factor - 1)) ** (dim / (dim - 2))
  inv_freq = 1.0 / (base ** exponent)
  scale = 1.0
  if kind == "linear":
    inv_freq = inv_freq / factor
  elif kind == "llama3":
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
    inv_freq = jnp.where(medium, smoothed, scaled)
  elif kind == "yarn":
    def correction_dim(rotations):
      return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
    lo, hi = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
      lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if lo == hi else hi  # no singularity
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - lo) / (hi - lo), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    scale = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1 if factor > 1 else 1.0)
  return inv_freq, scale


def rope_tables(positions: jax.Array, cfg: ModelConfig, seq_len: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [..., seq, head_dim] for integer `positions` [..., seq]. Dynamic RoPE
  scales with the sequence length: `seq_len`, by default max position + 1 of `positions`
  (negative positions, padding, do not count); a caller holding a slice of the sequence
  passes the whole sequence's."""
  if cfg.rope_type == "dynamic" and seq_len is None:
    seq_len = jnp.max(positions) + 1
  inv_freq, scale = rope_frequencies(cfg, seq_len if cfg.rope_type == "dynamic" else None)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE (HF Llama layout). x: [batch, seq, heads, head_dim]; cos/sin [batch, seq, hd]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  x32 = x.astype(jnp.float32)
  out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)
