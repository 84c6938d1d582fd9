"""The model's parameter tree without allocating it, and the one shape check everything uses.

The tree is `nnx.to_pure_dict(nnx.state(Transformer(cfg), nnx.Param))`: `embed`,
`layers.{i}.attn.wq`, ..., `final_norm.scale`, `lm_head` (stable names: checkpoints, growth,
upcycling and Hugging Face interop address parameters by them).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.sharding.plan import ParallelPlan


def abstract_model(cfg: ModelConfig, plan: ParallelPlan | None = None
                   ) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graphdef and abstract parameter State (shapes, dtypes and logical axes),
  with nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), plan)), nnx.Param)


def model_from_params(cfg: ModelConfig, params: Any) -> Transformer:
  """A `Transformer(cfg)` (one device) holding `params` (the pure dict; no copy)."""
  graphdef, state = abstract_model(cfg)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def shapes(cfg: ModelConfig) -> dict[str, Any]:
  """ShapeDtypeStructs of the parameters, as a pure dict."""
  return nnx.to_pure_dict(abstract_model(cfg)[1])


def _paths(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in flat}


def misfit(params: Any, abstract: Any) -> str | None:
  """The first parameter of `params` that is missing, extra or mis-shaped against the
  abstract tree `abstract`, in words; None when the trees fit."""
  got, want = _paths(params), _paths(abstract)
  for name, spec in want.items():
    if name not in got:
      return f"parameter {name!r} (shape {tuple(spec.shape)}) is missing"
    if tuple(np.shape(got[name])) != tuple(spec.shape):
      return (f"parameter {name!r} has shape {tuple(np.shape(got[name]))} but the model "
              f"expects {tuple(spec.shape)}")
  extra = sorted(set(got) - set(want))
  if extra:
    return f"parameter {extra[0]!r} is not in the model ({len(extra)} such)"
  return None
