"""Logical axis names -> mesh axes: the parameter layouts of a plan.

Model code names every parameter dimension logically (flax `out_sharding` metadata: `vocab`,
`embed`, `heads`, `kv_heads`, `mlp`, `exp`, `embed_moe`, `mlp_moe`, ...). `logical_rules`
maps the names onto a plan's mesh axes, and flax's own `nnx.get_partition_spec` applies them.
Three layouts of the same parameters follow:

- model specs: the canonical tree (`layers.{i}`), for transforms, init_from, export;
- compute specs: the train state's stacked tree (`esjax.parallel.stages`), layer stacks split
  over pp; the shard_map of the step sees these shards;
- master specs: where master weights and optimizer moments live. With
  `distributed_optimizer` (ZeRO-1) each parameter is further split over its replica axes
  (the mesh axes its compute spec does not use) on the first dimension they divide; with
  `fsdp` (ZeRO-3) the compute specs already split `embed` / `embed_moe` over the data axes.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from esjax.models.config import ModelConfig
from esjax.models import params as params_lib
from esjax.parallel import stages as stages_lib
from esjax.sharding.plan import ParallelPlan

Rules = tuple[tuple[str, Any], ...]


def logical_rules(plan: ParallelPlan, cfg: ModelConfig) -> Rules:
  """The rules table of `plan` for `cfg` (flax's format: (logical name, mesh axes) pairs).

  Attention and dense layers use the attention view (heads, MLP width and vocabulary over tp);
  expert weights the MoE view (experts over ep, expert width over etp). With fsdp the model
  dimension of weights is split over the data axes: dp and cp for dense weights, edp for
  expert weights. K/V heads are replicated when tp does not divide them.
  """
  tp = plan.tp
  n_tp = plan.size(tp)
  kv = tp if cfg.n_kv_heads % n_tp == 0 else ()
  fsdp = plan.layout.fsdp
  table = {
      "vocab": tp, "embed": plan.dp + plan.cp if fsdp else (), "heads": tp, "kv_heads": kv,
      "head_dim": (), "mlp": tp, "norm": (), "exp": plan.ep,
      "embed_moe": plan.edp if fsdp else (), "mlp_moe": plan.etp,
  }
  return tuple((k, v or None) for k, v in table.items())


def specs(cfg: ModelConfig, table: Rules | dict[str, Any]) -> dict[str, Any]:
  """PartitionSpecs of the model's own parameter tree under a rules table, by flax's
  `nnx.get_partition_spec` (a pure dict like the parameters). A logical name the table
  does not list is replicated."""
  table = dict(table)
  names = jax.tree.leaves(_logical_names(cfg), is_leaf=lambda x: isinstance(x, tuple))
  table = tuple({**{n: None for leaf in names for n in leaf if n}, **table}.items())
  _, state, _ = params_lib.abstract_model(cfg)
  with nnx.logical_axis_rules(table):
    out = nnx.get_partition_spec(state)
  return nnx.to_pure_dict(out)


def model_specs(plan: ParallelPlan, cfg: ModelConfig) -> dict[str, Any]:
  """PartitionSpecs of the canonical parameter tree on `plan`."""
  return specs(cfg, logical_rules(plan, cfg))


def _entry_axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _logical_names(cfg: ModelConfig) -> dict[str, Any]:
  """The canonical tree of each parameter's logical axis names (tuples)."""
  _, state, _ = params_lib.abstract_model(cfg)
  names = jax.tree.map(lambda v: v.replace(tuple(v.get_metadata().get("out_sharding") or ())),
                       state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(names)


def _stacked(tree: dict[str, Any], fmt: stages_lib.StageFormat, lead=None,
             rest=None) -> dict[str, Any]:
  """A canonical per-leaf tree (specs or names) in the stacked layout: `lead` maps the
  leaves of layer stacks, `rest` the others (identity when None)."""
  lead, rest = lead or (lambda x: x), rest or (lambda x: x)
  index = fmt.layer_index()
  out = {k: stages_lib.map_dicts(rest, v) for k, v in tree.items() if k != "layers"}
  out[stages_lib.STAGES] = {
      p: stages_lib.map_dicts(lead, tree["layers"][int(index[p, 0, 0, 0])])
      for p in range(fmt.period)}
  return out


def compute_specs(plan: ParallelPlan, cfg: ModelConfig, fmt: stages_lib.StageFormat
                  ) -> dict[str, Any]:
  """PartitionSpecs of the train state's stacked parameters as the step computes with them:
  layer stacks [pp, v, R, ...] split over pp, everything else as the rules say."""
  pp = plan.pp or None
  return _stacked(model_specs(plan, cfg), fmt, lambda s: P(pp, None, None, *s))


def fsdp_gathers(plan: ParallelPlan, cfg: ModelConfig, fmt: stages_lib.StageFormat
                 ) -> dict[str, Any]:
  """Per stacked leaf, the ((dim, mesh axes), ...) that fsdp splits and the step gathers
  before each use (empty without fsdp). Dims count from the leaf's own first axis."""
  data = {"embed": plan.dp + plan.cp, "embed_moe": plan.edp} if plan.layout.fsdp else {}

  def gathers(names, lead):
    return tuple((lead + d, data[n]) for d, n in enumerate(names) if data.get(n))

  return _stacked(_logical_names(cfg), fmt, lambda n: gathers(n, 3), lambda n: gathers(n, 0))


def replica_axes(plan: ParallelPlan, spec: P) -> tuple[str, ...]:
  """The mesh axes a parameter of compute spec `spec` is replicated over (mesh order)."""
  used = {a for e in spec for a in _entry_axes(e)}
  return tuple(a for a in plan.all_axes if a not in used)


def zero_split(plan: ParallelPlan, spec: P, shape: tuple[int, ...]) -> tuple[int, tuple]:
  """(dim, axes): where ZeRO-1 splits a parameter further: all its replica axes on the first
  dimension whose local size they divide, or (-1, ()) when none does (it stays replicated)."""
  axes = replica_axes(plan, spec)
  if not axes:
    return -1, ()
  n = plan.size(axes)
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  for d, (size, e) in enumerate(zip(shape, entries)):
    if (size // plan.size(_entry_axes(e))) % n == 0:
      return d, axes
  return -1, ()


def master_specs(plan: ParallelPlan, compute: Any, shapes: Any) -> Any:
  """Specs of master weights / optimizer moments: the compute specs, split further over the
  replica axes with `distributed_optimizer` (see `zero_split`)."""
  if not plan.layout.distributed_optimizer:
    return compute

  def one(spec, shape):
    d, axes = zero_split(plan, spec, tuple(shape.shape))
    if d < 0:
      return spec
    entries = list(tuple(spec) + (None,) * (len(shape.shape) - len(spec)))
    entries[d] = (*_entry_axes(entries[d]), *axes)
    return P(*entries)

  return stages_lib.map_dicts(one, compute, shapes)


def extra_axes(compute: P, master: P) -> tuple[int, tuple[str, ...]]:
  """(dim, axes) that a master spec adds to a compute spec (ZeRO-1), or (-1, ())."""
  n = max(len(compute), len(master))
  c = tuple(compute) + (None,) * (n - len(compute))
  m = tuple(master) + (None,) * (n - len(master))
  for d, (ce, me) in enumerate(zip(c, m)):
    extra = tuple(a for a in _entry_axes(me) if a not in _entry_axes(ce))
    if extra:
      return d, extra
  return -1, ()


def named(plan: ParallelPlan, specs: Any) -> Any:
  """NamedShardings on the plan's mesh for a tree of PartitionSpecs."""
  return stages_lib.map_dicts(lambda s: NamedSharding(plan.mesh, s), specs)


def fit_to_shape(plan: ParallelPlan, spec: P, shape: tuple[int, ...]) -> P:
  """`spec` with every entry whose axes do not divide its dimension replaced by None (e.g. a
  smaller source model read onto a bigger model's mesh)."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  return P(*(e if size % plan.size(_entry_axes(e)) == 0 else None
             for size, e in zip(shape, entries)))

