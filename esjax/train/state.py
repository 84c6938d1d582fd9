"""The train state: a plain pytree (step, params, optimizer state) built functionally.

`params` is the model's parameter tree as a pure nested dict,
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` (layers keyed by int), so checkpoints, growth
and upcycling handle it as ordinary arrays; `nnx.merge(graphdef, params)` rebuilds the model
inside a jitted step.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any


def abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graphdef and abstract parameter State (shapes, dtypes and the `axes`
  metadata that sharding rules read), without allocating anything."""
  model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def init_params(model_cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Fresh parameters as a pure dict (call under jit to build them sharded)."""
  return nnx.to_pure_dict(nnx.state(Transformer(model_cfg, nnx.Rngs(params=rng)), nnx.Param))


def new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def create_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                       rng: jax.Array, shardings: Any = None, params: Any = None
                       ) -> TrainState:
  """A fresh train state, from `rng` or from given `params` (init_from), built by one jit
  with `shardings` (a TrainState of shardings, or None on one device) as its output
  shardings, so no device ever holds more than its shard."""
  if params is None:
    init = jax.jit(lambda r: new_state(init_params(model_cfg, r), tx), out_shardings=shardings)
    return init(rng)
  return jax.jit(lambda p: new_state(p, tx), out_shardings=shardings)(params)


def abstract_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                         shardings: Any = None) -> TrainState:
  """The train state's ShapeDtypeStructs (with shardings when given): the restore target."""
  shapes = jax.eval_shape(lambda r: new_state(init_params(model_cfg, r), tx),
                          jax.random.key(0))
  if shardings is None:
    return shapes
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
