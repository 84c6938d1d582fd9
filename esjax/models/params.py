"""The model's parameter tree without allocating it, and the one shape check everything uses.

Parameters are `nnx.to_pure_dict(nnx.state(Transformer(cfg), nnx.Param))`: `embed`,
`layers.{i}.attn.wq`, ..., `final_norm.scale`, `lm_head` (stable names: checkpoints, growth,
upcycling and Hugging Face interop address parameters by them). Buffers are the model's
other variables (no gradient, no optimizer), in the same layout.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from esjax.models import moe
from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.sharding.plan import ParallelPlan


def abstract_model(cfg: ModelConfig, plan: ParallelPlan | None = None
                   ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """The model's graphdef, abstract parameter State (shapes, dtypes and logical axes) and
  abstract buffers (its non-Param variables: DeepSeek-V3's expert biases; usually empty),
  with nothing allocated."""
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), plan))
  return nnx.split(model, nnx.Param, ...)


def buffer_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """ShapeDtypeStructs of the buffers, as a pure dict ({} for most models)."""
  return nnx.to_pure_dict(abstract_model(cfg)[2])


def initial_buffers(cfg: ModelConfig) -> dict[str, Any]:
  """The buffers' initial values (every expert bias starts at zero)."""
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), buffer_shapes(cfg))


def model_from_params(cfg: ModelConfig, params: Any, buffers: Any = None) -> Transformer:
  """A `Transformer(cfg)` (one device) holding `params` and `buffers` (pure dicts; no copy;
  buffers default to their initial values), to run here: moe_impl='auto' is checked on this
  device first (`moe.checked`)."""
  cfg = moe.checked(cfg)
  graphdef, state, rest = abstract_model(cfg)
  nnx.replace_by_pure_dict(state, params)
  nnx.replace_by_pure_dict(rest, initial_buffers(cfg) if buffers is None else buffers)
  return nnx.merge(graphdef, state, rest)


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
