"""Layer overrides a parallel layout installs: the expert-parallel MoE and the CP attention.

Model code asks `moe_override()` / `attention_override()` at trace time and, when one is
set, hands its computation over. This module imports nothing from the models, so the models
can import it without a cycle.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

_MOE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("esjax_moe", default=None)
_ATTN: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("esjax_attn",
                                                                      default=None)


def moe_override() -> Callable | None:
  """`fn(moe_module, x [B, S, D]) -> (y, stats)` while a parallel layout is active."""
  return _MOE.get()


def attention_override() -> Callable | None:
  """`fn(q, k, v, q_pos, k_pos) -> o`, same contract as `attention.attend`, or None."""
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
