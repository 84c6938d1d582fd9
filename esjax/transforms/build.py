"""Running a parameter transform into a model: under jax.jit, optionally with the target's
shardings, so a large target is built directly sharded and never whole on one device.

A transform is any `fn(*args) -> params` returning the pure dict of the target `Transformer`
(`nnx.state(model, nnx.Param).to_pure_dict()` layout). With a mesh, each output parameter
gets `NamedSharding(mesh, logical_to_spec(axes, rules))` from its logical `axes` metadata,
and XLA computes on each device only that device's shards.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.parallel.rules import Rules, logical_to_spec


def params_of(model: Transformer) -> dict[str, Any]:
  """The model's parameters as a pure dict of arrays (the transforms' input)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and abstract parameter state of `Transformer(cfg)`, nothing allocated."""
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, state


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> dict[str, Any]:
  """Pure dict of NamedShardings of the parameters in `state`, from their `axes` metadata."""
  def one(v):
    return NamedSharding(mesh, logical_to_spec(v.get_metadata().get("axes", ()), rules))
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=is_var))


def _paths(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def check_shapes(params: Any, abstract: Any, what: str) -> None:
  """Raises ValueError naming the first parameter that is missing, extra or mis-shaped."""
  got, want = _paths(params), _paths(abstract)
  for name, spec in want.items():
    if name not in got:
      raise ValueError(f"{what}: parameter {name} {tuple(spec.shape)} was not produced")
    if tuple(np.shape(got[name])) != tuple(spec.shape):
      raise ValueError(f"{what}: parameter {name} has shape {tuple(np.shape(got[name]))}, the "
                       f"target config needs {tuple(spec.shape)}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"{what}: parameter {extra[0]} is not in the target model")


def target_shardings(cfg: ModelConfig, mesh: Mesh | None, rules: Rules | None) -> Any:
  """Pure dict of `Transformer(cfg)`'s parameter shardings under `rules`, None without mesh."""
  if mesh is None:
    return None
  return param_shardings(abstract_model(cfg)[1], mesh, rules or {})


def jit_transform(cfg: ModelConfig, fn: Callable[..., Any], shardings: Any = None
                  ) -> Callable[..., Any]:
  """`jax.jit` of `fn`, checked against and cast to `Transformer(cfg)`'s parameter shapes and
  dtypes, with output `shardings` (a pure dict like the parameters, or None)."""
  abstract = nnx.to_pure_dict(abstract_model(cfg)[1])

  def cast(*args):
    out = fn(*args)
    check_shapes(out, abstract, "transform")
    return jax.tree.map(lambda p, s: p.astype(s.dtype), out, abstract)

  return jax.jit(cast, out_shardings=shardings)


def transform_params(cfg: ModelConfig, fn: Callable[..., Any], *args: Any,
                     mesh: Mesh | None = None, rules: Rules | None = None) -> dict[str, Any]:
  """`jit_transform(cfg, fn)(*args)`, sharded per `rules` over `mesh` when given."""
  return jit_transform(cfg, fn, target_shardings(cfg, mesh, rules))(*args)


def build_model(cfg: ModelConfig, fn: Callable[..., Any], *args: Any, mesh: Mesh | None = None,
                rules: Rules | None = None) -> Transformer:
  """The `Transformer(cfg)` whose parameters are `fn(*args)` (see `transform_params`)."""
  graphdef, state = abstract_model(cfg)
  params = transform_params(cfg, fn, *args, mesh=mesh, rules=rules)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)
