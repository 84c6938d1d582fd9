"""Logical axis names -> mesh axes. The only module that knows mesh axis names.

Model code names every parameter axis and constrains activations with logical names
(`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `exp`, `embed_moe`, `mlp_moe`, `act_batch`,
`act_len`, `act_embed`, ...). `constrain` is a no-op unless a rules table is active (set by
`use_rules`) and a mesh is set with `jax.set_mesh`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import PartitionSpec as P

LogicalAxes = Sequence[str | None]
Rules = dict[str, str | tuple[str, ...] | None]

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("esjax_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[Rules]:
  token = _RULES.set(dict(rules))
  try:
    yield rules
  finally:
    _RULES.reset(token)


def active_rules() -> Rules | None:
  return _RULES.get()


def logical_to_spec(axes: LogicalAxes, rules: Rules) -> P:
  """PartitionSpec for logical `axes` under `rules`; unknown names are replicated."""
  return P(*(rules.get(a) if a is not None else None for a in axes))


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """with_sharding_constraint by logical names; identity without rules or mesh."""
  rules = _RULES.get()
  if rules is None or jax.sharding.get_abstract_mesh().empty:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of "
                     f"shape {x.shape}")
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))
