"""The train and eval steps of every layout (one device is a one-device mesh), jitted with
the train state's shardings: what the loop runs, the planner compiles and the benchmarks time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import optax

from esjax.configs import common
from esjax.models import moe
from esjax.models.config import ModelConfig
from esjax.parallel.pipeline import Engine
from esjax.sharding.layout import Layout, check_model
from esjax.sharding.plan import ParallelPlan, make_plan
from esjax.train import optimizer, state as state_lib
from esjax.train.state import TrainState


def make_train_step(engine: Engine, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, shapes: TrainState, with_grads: bool = False
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, batch) -> (state, metrics)`: one update of `tx` on the batch loss.

  metrics: the loss metrics (loss, ce_loss, router statistics), plus `grad_norm` (before
  clipping), `lr` (the learning rate this update used) and, `with_grads`, the gradients
  (for tests and debugging).
  """
  master_specs = engine.master_specs(shapes.params)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    compute = engine.compute_params(state.params)
    metrics, grads = engine.loss_and_grads(compute, batch, master_specs, state.buffers)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    buffers = engine.update_buffers(state.buffers, metrics)  # expert biases: no gradient
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    if with_grads:
      metrics["grads"] = grads
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         buffers=buffers), metrics

  return train_step


def make_eval_step(engine: Engine) -> Callable[[Any, dict[str, jax.Array], Any], dict]:
  """`eval_step(params, batch, buffers) -> metrics` (no update)."""
  return lambda params, batch, buffers: engine.evaluate(engine.compute_params(params), batch,
                                                        buffers)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps of one run and the layouts they take."""

  engine: Engine
  abstract_state: TrainState  # ShapeDtypeStructs with shardings
  batch_sharding: jax.sharding.NamedSharding
  train: Callable  # (state, batch) -> (state, metrics); donates the state
  evaluate: Callable  # (params, batch, buffers) -> metrics


def build(engine: Engine, tx: optax.GradientTransformation, schedule: optax.Schedule
          ) -> Steps:
  """The train and eval steps of `engine`, jitted with the train state's shardings."""
  abstract = state_lib.abstract_train_state(engine, tx)
  shardings = jax.tree.map(lambda s: s.sharding, abstract)
  batch_sh = jax.sharding.NamedSharding(engine.plan.mesh, engine.batch_spec())
  train = jax.jit(make_train_step(engine, tx, schedule, abstract),
                  in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                  donate_argnums=0)
  evaluate = jax.jit(make_eval_step(engine),
                     in_shardings=(shardings.params, batch_sh, shardings.buffers))
  return Steps(engine, abstract, batch_sh, train, evaluate)


@dataclasses.dataclass(frozen=True)
class Run:
  """What an experiment config builds: model config, plan, optimizer and the jitted steps."""

  model_cfg: ModelConfig
  plan: ParallelPlan
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  steps: Steps


def for_config(config: Any, devices: Sequence[Any] | None = None) -> Run:
  """The training loop's steps for an experiment config, on `devices` (default: every device
  of the job, where moe_impl='auto' first checks the grouped-matmul kernels on them; a
  deviceless topology's devices for `python -m esjax.plan`, which plans the kernels)."""
  model_cfg = common.model_config(config)
  plan = make_plan(Layout.from_config(config.parallel), devices)
  if devices is None:
    model_cfg = moe.checked(model_cfg, plan)
  check_model(plan.layout, model_cfg, seq_len=config.train.seq_len,
              batch=config.train.batch_size)
  tx, schedule = optimizer.make_optimizer(config.optim, config.train.steps)
  engine = Engine.build(model_cfg, plan)
  return Run(model_cfg, plan, tx, schedule, build(engine, tx, schedule))
