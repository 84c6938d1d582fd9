"""Layer overrides a parallel layout installs: EP MoE, CP attention, the pipelined stack.

Model code asks `moe_override()` / `attention_override()` at trace time and, when one is
set, hands its computation over. This module imports nothing from the models, so the models
can import it without a cycle.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

_MOE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("esjax_moe", default=None)
_LAYERS: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("esjax_layers",
                                                                        default=None)
_ATTN: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("esjax_attn",
                                                                      default=None)


def moe_override() -> Callable | None:
  """`fn(moe_module, x [B, S, D]) -> (y, stats)` while a parallel layout is active."""
  return _MOE.get()


def layers_override() -> Callable | None:
  """`fn(model, x [B, S, D], positions) -> (x, [per-MoE-layer stats])` replacing the layer
  loop of `Transformer.__call__` (the pipeline), or None."""
  return _LAYERS.get()


@contextlib.contextmanager
def override_layers(fn: Callable) -> Iterator[None]:
  token = _LAYERS.set(fn)
  try:
    yield
  finally:
    _LAYERS.reset(token)


def attention_override() -> Callable | None:
  """`fn(q, k, v, q_pos, k_pos, *, sliding_window) -> o`, the contract of
  `esjax.kernels.attention.ops.attend`, or None."""
  return _ATTN.get()


@contextlib.contextmanager
def install(fm: Any) -> Iterator[None]:
  """Installs the overrides of folded mesh `fm` (an `esjax.parallel.mesh.FoldedMesh`)."""
  from esjax.parallel import context, expert  # pylint: disable=g-import-not-at-top
  moe_token = _MOE.set(expert.moe_forward_fn(fm))
  attn_token = _ATTN.set(context.attention_fn(fm))
  try:
    yield
  finally:
    _ATTN.reset(attn_token)
    _MOE.reset(moe_token)
