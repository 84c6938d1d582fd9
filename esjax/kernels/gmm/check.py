"""Do the grouped-matmul kernels compute right on this process's accelerator?

`mismatch(backend)` runs the grouped SwiGLU of `ops.swiglu_gmm` on a small problem with the
backend's own tiles (the kernels the model runs; only their loop counts differ at the real
expert shapes), forward and backward, and compares it with the same SwiGLU written on
`lax.ragged_dot` in float32, differentiated by autodiff: an independent implementation
(XLA's). Groups of uneven sizes that straddle row blocks, an empty group and rows past the
groups are in it. It answers None, or one line saying what differs or what failed (a kernel
that does not compile or run on this device). `moe_impl='auto'` runs the kernels only where
this passes (`esjax.models.moe.pin_unchecked_kernels`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from esjax.kernels.gmm import ops

SIZES = (200, 0, 77, 300)  # rows per group; 63 rows past them
ROWS, D_MODEL, D_FF = 640, 256, 256  # multiples of every backend's tiles
TOLERANCE = 2e-2  # relative error of a bfloat16 product with float32 accumulation: ~4e-3


def _problem(dtype: Any, seed: int = 0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, s=1.0: jnp.asarray(rng.normal(size=shape) * s, dtype)  # noqa
  g = len(SIZES)
  return (normal(ROWS, D_MODEL), jnp.asarray(SIZES, jnp.int32),
          normal(g, D_MODEL, D_FF, s=0.1), normal(g, D_MODEL, D_FF, s=0.1),
          normal(g, D_FF, D_MODEL, s=0.1), normal(ROWS, D_MODEL))


def _ragged_swiglu(rows, gs, w_gate, w_up, w_down):
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  dot = lambda x, w: lax.ragged_dot(x, f32(w), gs)  # noqa: E731
  x = f32(rows)
  return dot(jax.nn.silu(dot(x, w_gate)) * dot(x, w_up), w_down)


def _value_and_grads(fn: Callable, rows, gs, w_gate, w_up, w_down, dy):
  out, pull = jax.vjp(lambda *a: fn(a[0], gs, *a[1:]), rows, w_gate, w_up, w_down)
  return (out, *pull(dy.astype(out.dtype)))


def mismatch(backend: str, num_sms: int | None = None, dtype: Any = "bfloat16",
             interpret: Any = None, kernel: Callable | None = None) -> str | None:
  """None if `kernel` (default: `ops.swiglu_gmm` on `backend` with its default tiles, one
  program per each of `num_sms` multiprocessors; None: an H100 SXM's) agrees in `dtype`
  with the float32 ragged_dot SwiGLU on this process's default device; else why not, in one
  line (nothing raised here escapes). `interpret`: Pallas' interpreter (the CPU tests)."""
  opts = ops.Options(backend, num_sms=num_sms, interpret=interpret)
  kernel = kernel or (lambda x, gs, a, b, c: ops.swiglu_gmm(x, gs, a, b, c, opts))
  try:
    args = _problem(dtype)
    got = jax.jit(lambda *a: _value_and_grads(kernel, *a))(*args)
    got = [np.asarray(jnp.asarray(g, jnp.float32), np.float64) for g in got]
    want = [np.asarray(w, np.float64) for w in
            jax.jit(lambda *a: _value_and_grads(_ragged_swiglu, *a))(*args)]
  except Exception as e:  # noqa: BLE001  (a kernel that fails to build or run: the answer)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"the {backend} kernels failed here: {type(e).__name__}: {first}"
  total = sum(SIZES)
  for name, g, w in zip(("output", "d_rows", "d_w_gate", "d_w_up", "d_w_down"), got, want):
    if not np.isfinite(g).all():
      return f"the {backend} kernels' {name} is not finite"
    if name in ("output", "d_rows") and np.abs(g[total:]).max(initial=0) > 0:
      return f"the {backend} kernels wrote {name} rows past the groups"
    err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
    if not err <= TOLERANCE:
      return (f"the {backend} kernels' {name} differs from lax.ragged_dot's: relative error "
              f"{err:.3g} (at most {TOLERANCE})")
  return None


@functools.cache
def on_this_device(backend: str, num_sms: int | None, dtype: str) -> str | None:
  """`mismatch` with the real kernels, once per process and arguments (a fact of the device:
  every model built here asks it)."""
  return mismatch(backend, num_sms, dtype)
