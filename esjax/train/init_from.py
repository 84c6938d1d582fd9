"""Starting a run from another run's weights (`checkpoint.init_from`), without its optimizer
state: continued pretraining, and the hook where a checkpoint is converted while it loads.

The path: `checkpoint.restore_params` (an esjax run) or `interop.load.read_params` (a Hugging
Face folder) reads the source's model config and params, `convert` turns them into
parameters of this run's model config (identity when the two configs have the same parameter
shapes), and `check_fit` refuses anything whose tree or shapes do not match the model, naming
the parameter.

`convert` is the one place for load-time conversions. `esjax.transforms` plugs in here: e.g.
a dense source checkpoint and an MoE target config are upcycled while loading (online
upcycling), a smaller source is grown. Its contract: pure function of
(source config, params, target config, experiment config), returning target params; it may
run under jit with the target's shardings.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from esjax.interop import load as hf_load
from esjax.models.config import ModelConfig
from esjax.parallel import rules as rules_lib
from esjax.train import checkpoint, state as state_lib


def _paths(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in flat}


def misfit(params: Any, abstract_params: Any) -> str | None:
  """The first parameter that is missing, extra or mis-shaped in `params`, in words."""
  got, want = _paths(params), _paths(abstract_params)
  for name, spec in want.items():
    if name not in got:
      return f"parameter {name!r} (shape {tuple(spec.shape)}) is missing from the checkpoint"
    if tuple(np.shape(got[name])) != tuple(spec.shape):
      return (f"parameter {name!r} has shape {tuple(np.shape(got[name]))} in the checkpoint "
              f"but the model expects {tuple(spec.shape)}")
  extra = sorted(set(got) - set(want))
  if extra:
    return f"parameter {extra[0]!r} is in the checkpoint but not in the model ({len(extra)} such)"
  return None


def check_fit(params: Any, abstract_params: Any, source: str) -> None:
  """Raises ValueError naming the first parameter that is missing, extra or mis-shaped."""
  problem = misfit(params, abstract_params)
  if problem:
    raise ValueError(f"checkpoint.init_from={source!r}: {problem}")


def convert(src_cfg: ModelConfig, params: Any, dst_cfg: ModelConfig, config: Any,
            shardings: Any = None) -> Any:
  """Load-time conversion hook (see module docstring). `shardings`: pure dict of the target
  parameters' shardings (None on one device). `esjax.transforms.online.convert`: identity when
  the shapes match, else growth (recipe `checkpoint.grow`) and/or upcycling, built by one jit
  with the target shardings; `check_fit` verifies the result."""
  from esjax.transforms import online  # pylint: disable=g-import-not-at-top
  grow = config.checkpoint.get("grow", "aki_pro")
  return online.convert(src_cfg, params, dst_cfg, grow=grow, seed=config.train.seed,
                        shardings=shardings)


def source_target(src_cfg: ModelConfig, mesh: Any) -> Any:
  """Abstract params of a source checkpoint placed on `mesh` by the active logical rules,
  so every device reads only its shards of it (a dimension the rule's axes do not divide,
  e.g. a smaller source's heads, is replicated instead)."""
  rules = rules_lib.active_rules() or {}
  _, abstract = state_lib.abstract_model(src_cfg)

  def place(v):
    spec = rules_lib.logical_to_spec(v.get_metadata().get("axes", ()), rules)
    fitted = []
    for size, entry in zip(v.shape, tuple(spec) + (None,) * (len(v.shape) - len(spec))):
      axes = rules_lib.entry_axes(entry)
      fitted.append(entry if size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P(*fitted)))

  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return nnx.to_pure_dict(jax.tree.map(place, abstract, is_leaf=is_var))


def load(config: Any, model_cfg: ModelConfig, shardings: Any = None) -> Any:
  """Parameters for this run's model from `config.checkpoint.init_from` (an esjax run or a
  Hugging Face folder), cast to the model's parameter dtypes. `shardings`: as in `convert`;
  with them the source is read sharded over the same mesh (`source_target`)."""
  source = config.checkpoint.init_from
  target = None
  if shardings is not None:
    mesh = jax.tree.leaves(shardings)[0].mesh
    target = lambda src_cfg: source_target(src_cfg, mesh)  # noqa: E731
  reader = hf_load.read_params if hf_load.is_hf_folder(source) else checkpoint.restore_params
  src_cfg, params = reader(source, target)
  _, abstract = state_lib.abstract_model(model_cfg)
  abstract = nnx.to_pure_dict(abstract)
  try:
    params = convert(src_cfg, params, model_cfg, config, shardings)
  except ValueError as e:  # No conversion fits: say also which parameter differs.
    raise ValueError(f"checkpoint.init_from={source!r}: {misfit(params, abstract)}; {e}"
                     ) from None
  check_fit(params, abstract, source)
  return jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract)
