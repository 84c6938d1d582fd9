"""Running a parameter transform into a model: under jax.jit, optionally with the target's
shardings, so a large target is built directly sharded and never whole on one device.

A transform is any `fn(*args) -> params` returning the pure dict of the target `Transformer`
(`esjax.models.params`). With a mesh, each output parameter gets the NamedSharding that a
logical-axis rules table gives it (`esjax.parallel.rules.specs`, flax's partitioning), and
XLA computes on each device only that device's shards.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from esjax.models import params as params_lib
from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.parallel import rules as rules_lib, stages


def params_of(model: Transformer) -> dict[str, Any]:
  """The model's parameters as a pure dict of arrays (the transforms' input)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def target_shardings(cfg: ModelConfig, mesh: Mesh | None, rules: Any) -> Any:
  """Pure dict of `Transformer(cfg)`'s parameter shardings under a rules table (a dict or
  flax's (name, axes) pairs), None without a mesh."""
  if mesh is None:
    return None
  return stages.map_dicts(lambda s: NamedSharding(mesh, s), rules_lib.specs(cfg, rules or {}))


def jit_transform(cfg: ModelConfig, fn: Callable[..., Any], shardings: Any = None
                  ) -> Callable[..., Any]:
  """`jax.jit` of `fn`, checked against and cast to `Transformer(cfg)`'s parameter shapes and
  dtypes, with output `shardings` (a pure dict like the parameters, or None)."""
  abstract = params_lib.shapes(cfg)

  def cast(*args):
    out = fn(*args)
    problem = params_lib.misfit(out, abstract)
    if problem:
      raise ValueError(f"transform: {problem} (the target config decides the shapes)")
    return jax.tree.map(lambda p, s: p.astype(s.dtype), out, abstract)

  return jax.jit(cast, out_shardings=shardings)


def transform_params(cfg: ModelConfig, fn: Callable[..., Any], *args: Any,
                     mesh: Mesh | None = None, rules: Any = None) -> dict[str, Any]:
  """`jit_transform(cfg, fn)(*args)`, sharded per `rules` over `mesh` when given."""
  return jit_transform(cfg, fn, target_shardings(cfg, mesh, rules))(*args)


def build_model(cfg: ModelConfig, fn: Callable[..., Any], *args: Any, mesh: Mesh | None = None,
                rules: Any = None) -> Transformer:
  """The `Transformer(cfg)` whose parameters are `fn(*args)` (see `transform_params`)."""
  params = transform_params(cfg, fn, *args, mesh=mesh, rules=rules)
  return params_lib.model_from_params(cfg, params)
