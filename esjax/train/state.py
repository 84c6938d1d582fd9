"""The train state: a plain pytree (step, params, optimizer state, buffers) built
functionally.

`params` are the master weights (`ModelConfig.param_dtype`) in the stacked layout of
`esjax.parallel.stages` (layers stacked per pipeline stage), laid out by the engine's master
specs; `params_from_state` / `params_for_state` convert to and from the model's own tree
(`nnx.to_pure_dict(nnx.state(model, nnx.Param))`, layers keyed by int), which growth,
upcycling, evaluation and Hugging Face interop use. `buffers` are the model's non-Param
variables (DeepSeek-V3's expert biases; empty for most models), stacked the same way and
updated by the train step outside the gradient.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from esjax.models import params as params_lib
from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.parallel import rules, stages
from esjax.parallel.pipeline import Engine


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  buffers: Any = flax.struct.field(default_factory=dict)


def init_params(model_cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Fresh parameters of the model's own tree (call under jit to build them sharded)."""
  return nnx.to_pure_dict(nnx.state(Transformer(model_cfg, nnx.Rngs(params=rng)), nnx.Param))


def buffers_from_state(buffers: Any, engine: Engine) -> Any:
  return stages.unstack(buffers, engine.fmt) if buffers else {}


def params_for_state(params: dict[str, Any], engine: Engine) -> dict[str, Any]:
  """The model's tree -> the train state's stacked tree (cast to the parameter dtypes)."""
  return stages.stack(params, engine.fmt)


def params_from_state(params: dict[str, Any], engine: Engine) -> dict[str, Any]:
  return stages.unstack(params, engine.fmt)


def new_state(params: Any, tx: optax.GradientTransformation, buffers: Any = None
              ) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    buffers={} if buffers is None else buffers)


def buffers_for_state(cfg: ModelConfig, engine: Engine, buffers: Any = None) -> Any:
  """The model's buffers (default: their initial values) in the state's stacked layout."""
  buffers = params_lib.initial_buffers(cfg) if buffers is None else buffers
  return stages.stack(buffers, engine.fmt) if buffers else {}


def _mirror(tree: Any, params: Any, params_leaf: Any, default: Any) -> Any:
  """Per leaf of `tree` (e.g. an optax state): subtrees shaped like `params` get
  `params_leaf`, every other leaf `default`."""
  params_def = jax.tree.structure(params)

  def visit(node):
    if jax.tree.structure(node) == params_def:
      return params_leaf
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:  # a leaf
      return default
    return jax.tree.unflatten(treedef, [visit(c) for c in children])

  return visit(tree)


def abstract_train_state(engine: Engine, tx: optax.GradientTransformation) -> TrainState:
  """The train state's ShapeDtypeStructs with their shardings (nothing allocated, no device
  touched: this is what a deviceless compile and a restore target need)."""
  cfg = engine.cfg

  def fresh():
    params = params_for_state(init_params(cfg, jax.random.key(0)), engine)
    return new_state(params, tx, buffers_for_state(cfg, engine))

  shapes = jax.eval_shape(fresh)
  shardings = state_shardings(engine, shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def state_shardings(engine: Engine, shapes: TrainState) -> TrainState:
  """NamedShardings of a train state: params and optimizer moments by the master specs
  (ZeRO-1 splits them over their replica axes), scalars replicated."""
  plan = engine.plan
  master = rules.named(plan, engine.master_specs(shapes.params))
  replicated = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
  return TrainState(step=replicated, params=master,
                    opt_state=_mirror(shapes.opt_state, shapes.params, master, replicated),
                    buffers=rules.named(plan, engine.buffer_specs(shapes.buffers)))


def create_train_state(engine: Engine, tx: optax.GradientTransformation, rng: jax.Array,
                       params: Any = None) -> TrainState:
  """A fresh train state, from `rng` or from the model-tree `params` (init_from), built by one
  jit with the state's shardings as output shardings, so no device holds more than its
  shard."""
  cfg = engine.cfg
  shardings = state_shardings(engine, abstract_train_state(engine, tx))
  buffers = buffers_for_state(cfg, engine)
  if params is None:
    build = lambda r: new_state(params_for_state(init_params(cfg, r), engine), tx,  # noqa
                                buffers)
    return jax.jit(build, out_shardings=shardings)(rng)
  build = lambda p: new_state(params_for_state(p, engine), tx, buffers)  # noqa: E731
  return jax.jit(build, out_shardings=shardings)(params)
