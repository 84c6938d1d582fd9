"""One attention entry point over the implementations, chosen by name (`ModelConfig.
attention_impl`): "xla" (plain, the reference), "chunked" (linear memory, any backend),
"cudnn" (flash on NVIDIA GPUs, chunked where it does not apply), "auto". Where the caller
vouches that the positions are plain (0 .. S-1 in every row), "xla" skips the causal upper
triangle (`causal_blocks`) and "cudnn" runs flash without checking the order on the device.

"auto": cuDNN on a GPU where it applies; elsewhere chunked once the logits of one head
(Sq * Sk) reach the backend's `AUTO_CHUNKED_LOGITS`, plain below. CPU: measured with
benchmarks/attention.py (at 8 heads of 64: chunked 1.6x the plain time at seq 256, 0.47x at
512, 0.26x at 1024); other backends: a guess (not measured here) that keeps short sequences
on the plain path.
"""

from __future__ import annotations

import jax

from esjax.kernels.attention import causal_blocks, chunked, cudnn, reference

IMPLS = ("auto", "xla", "chunked", "cudnn")
SCOPE = chunked.SCOPE  # the named scope core attention runs in
AUTO_CHUNKED_LOGITS = {"cpu": 512 * 512}
AUTO_CHUNKED_LOGITS_DEFAULT = 2048 * 2048


def resolve(impl: str, q: jax.Array, k: jax.Array, v: jax.Array,
            k_valid: jax.Array | None = None, platform: str | None = None) -> str:
  """The implementation "auto" stands for with these operands on `platform` (the one the
  program is compiled for; default: the default backend)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r}, expected one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = platform or jax.default_backend()
  if backend == "gpu" and cudnn.unsupported(q, k, v, k_valid) is None:
    return "cudnn"
  threshold = AUTO_CHUNKED_LOGITS.get(backend, AUTO_CHUNKED_LOGITS_DEFAULT)
  return "chunked" if q.shape[1] * k.shape[1] >= threshold else "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
           k_valid: jax.Array | None = None, *, sliding_window: int = 0, impl: str = "auto",
           plain_positions: bool | None = None, platform: str | None = None) -> jax.Array:
  """Causal GQA attention (the contract of `reference.xla_attention`) by `impl`, for the
  `platform` the program is compiled for. `plain_positions`: True when q_pos = k_pos = 0 ..
  S-1 in every row (the caller's promise, not checked), None when unknown, False when not
  (see `cudnn.cudnn_attention`)."""
  impl = resolve(impl, q, k, v, k_valid, platform)
  if impl == "cudnn":
    return cudnn.cudnn_attention(q, k, v, q_pos, k_pos, k_valid, sliding_window=sliding_window,
                                 plain_positions=plain_positions)
  if impl == "chunked":
    return chunked.chunked_attention(q, k, v, q_pos, k_pos, k_valid,
                                     sliding_window=sliding_window, platform=platform)
  if plain_positions and k_valid is None:
    return causal_blocks.causal_blocks_attention(q, k, v, sliding_window=sliding_window)
  return reference.xla_attention(q, k, v, q_pos, k_pos, k_valid, sliding_window=sliding_window)
