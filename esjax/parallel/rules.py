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


def entry_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry, as a tuple (() for None)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """with_sharding_constraint by logical names; identity without rules or mesh."""
  rules = _RULES.get()
  if rules is None or jax.sharding.get_abstract_mesh().empty:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of "
                     f"shape {x.shape}")
  y = jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))
  records = _RECORDS.get()
  if records is not None:  # the sharding the compiler gave y, reported at compile time
    jax.debug.inspect_array_sharding(
        y, callback=lambda s, a=tuple(axes): records.append((a, s)))
  return y


_RECORDS: contextvars.ContextVar[list | None] = contextvars.ContextVar("esjax_records",
                                                                      default=None)


@contextlib.contextmanager
def record_shardings() -> Iterator[list]:
  """Collects (logical axes, compiled sharding) of every `constrain` compiled inside."""
  records: list = []
  token = _RECORDS.set(records)
  try:
    yield records
  finally:
    _RECORDS.reset(token)


def layout_rules(fm, cfg=None) -> Rules:
  """The logical-axis table of a folded mesh (`esjax.parallel.mesh.FoldedMesh`).

  Attention and dense layers use the attention view: heads, MLP width and vocabulary over tp,
  batch over dp, sequence over cp (and over cp then tp in the residual stream: sequence
  parallelism); K/V along the sequence are replicated (all-gathered over cp) unless CP
  attention is the ring, which keeps them sharded. Expert weights use the MoE view: experts
  over ep, expert width over etp. With fsdp, the model dimension of weights is sharded over
  the data axes: dp*cp for dense weights, edp for expert weights. KV heads are replicated
  when tp does not divide them.
  """
  ax = fm.axes
  tp = ax("tp")
  data = ax("dp") + ax("cp")
  kv_tp = tp if cfg is None or cfg.n_kv_heads % fm.layout.tp == 0 else ()
  fsdp = fm.layout.fsdp
  table = {
      # Parameters.
      "vocab": tp, "embed": data if fsdp else (), "heads": tp, "kv_heads": kv_tp,
      "head_dim": (), "mlp": tp, "norm": (), "layers": ax("pp"),
      "exp": ax("ep"), "embed_moe": ax("edp") if fsdp else (), "mlp_moe": ax("etp"),
      # Activations.
      "act_batch": ax("dp"), "act_len": ax("cp"),
      "act_kv_len": ax("cp") if fm.layout.cp_impl == "ring" else (),
      "act_res_len": ax("cp") + tp, "act_embed": (), "act_heads": tp, "act_kv_heads": kv_tp,
      "act_mlp": tp, "act_vocab": tp, "act_stage": ax("pp"),
  }
  return {k: (v if v else None) for k, v in table.items()}

