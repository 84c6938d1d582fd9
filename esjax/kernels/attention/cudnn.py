"""cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) where it
applies, the chunked kernel where it does not.

cuDNN masks by index (causal, sliding window), so it is exact only when the positions are
the plain order: q_pos == k_pos and each row counts up by one. The caller says so with
`plain_positions=True`; with None (unknown) the positions are checked on the device and a
`lax.cond` runs cuDNN or the chunked kernel (both are compiled); False: always chunked.
Statically the chunked kernel also takes over when cuDNN cannot: `unsupported` names why.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from esjax.kernels.attention import chunked

DTYPES = (jnp.bfloat16, jnp.float16)


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array,
                k_valid: jax.Array | None) -> str | None:
  """Why cuDNN flash attention cannot run these operands, or None when it can."""
  hd = q.shape[-1]
  if q.dtype not in DTYPES or not q.dtype == k.dtype == v.dtype:
    return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: cuDNN takes bfloat16 or float16"
  if hd % 8 or hd > 256:
    return f"head_dim={hd}: cuDNN takes a multiple of 8, at most 256 (128 before Hopper)"
  if q.shape[1] != k.shape[1]:
    return f"Sq={q.shape[1]} != Sk={k.shape[1]}: the causal mask is by index"
  if k_valid is not None:
    return "k_valid (KV-cache slots) is not a causal index mask"
  return None


def plain_order(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
  """[] bool: q_pos == k_pos and every row counts up by one (index mask == position mask)."""
  return jnp.all(q_pos == k_pos) & jnp.all(jnp.diff(q_pos, axis=1) == 1)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                    k_pos: jax.Array, k_valid: jax.Array | None = None, *,
                    sliding_window: int = 0, plain_positions: bool | None = None
                    ) -> jax.Array:
  """`reference.xla_attention`'s contract, on cuDNN when `unsupported` is None and the
  positions are plain (see the module docstring), else `chunked.chunked_attention`."""
  if unsupported(q, k, v, k_valid) or plain_positions is False:
    return chunked.chunked_attention(q, k, v, q_pos, k_pos, k_valid,
                                     sliding_window=sliding_window)
  window = (sliding_window - 1, 0) if sliding_window else None

  def flash(q, k, v, q_pos, k_pos):
    del q_pos, k_pos
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                        implementation="cudnn")

  def fallback(q, k, v, q_pos, k_pos):
    return chunked.chunked_attention(q, k, v, q_pos, k_pos, sliding_window=sliding_window)

  if plain_positions:
    return flash(q, k, v, q_pos, k_pos)
  return lax.cond(plain_order(q_pos, k_pos), flash, fallback, q, k, v, q_pos, k_pos)
