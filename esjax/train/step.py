"""The train and eval step functions (pure; the loop jits them with donation and shardings)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import nnx

from esjax.parallel import step as parallel_step
from esjax.train import loss as loss_lib
from esjax.train.state import TrainState

LossFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_fn: LossFn = loss_lib.lm_loss
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, batch) -> (state, metrics)`: one AdamW update on the batch loss.

  metrics: those of `loss_fn` (loss, ce_loss, router statistics), plus `grad_norm` (before
  clipping) and `lr` (the learning rate this update used).
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    # Microbatches, pipeline and CP order as the active esjax.parallel layout says.
    _, metrics, grads = parallel_step.loss_and_grads(graphdef, state.params, batch, loss_fn)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn = loss_lib.lm_loss
                   ) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """`eval_step(params, batch) -> metrics` of `loss_fn` (no update)."""

  def eval_step(params: Any, batch: dict[str, jax.Array]):
    batch = parallel_step.prepare_batch(batch)  # CP load-balanced order under a layout
    return loss_fn(nnx.merge(graphdef, params), batch)[1]

  return eval_step
