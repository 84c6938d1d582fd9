"""A training worker of asynchronous PS training: plain Python, no Ray (runtime.py wraps it).

A worker owns a copy of the model, its shard of the token stream and its optimizer state. One
step is `compute()` (gradient on the local model -> payload for the server) followed by
`receive(reply)` (the server's reply is the only thing that changes the local model, as in
the reference code). Splitting the two lets tests replay any arrival order without Ray.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from esjax.data import dataset
from esjax.models import ModelConfig, Transformer, moe
from esjax.optim import dgs
from esjax.models.loss import lm_loss
from esjax.train.optimizer import clip_by_global_norm


def abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params, other state) without allocating the weights."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))), nnx.Param, ...)


def init_params(model_cfg: ModelConfig, seed: int) -> list[np.ndarray]:
  """Fresh parameters as numpy leaves in `jax.tree` order (what the server stores)."""
  _, params, _ = nnx.split(Transformer(model_cfg, nnx.Rngs(seed)), nnx.Param, ...)
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def lr_schedule(optim: dict[str, Any]) -> optax.Schedule:
  """Linear warmup to `lr`, then constant, or cosine to `lr * final_lr_fraction` at
  `decay_steps` (steps of this worker)."""
  lr, warmup = optim["lr"], optim.get("warmup_steps", 0)
  if optim.get("schedule", "constant") == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(optim["decay_steps"], warmup + 1),
        lr * optim.get("final_lr_fraction", 0.0))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


class Worker:
  """Model copy + data shard + SAMomentum (sparse modes) or heavy-ball (dense) state.

  `windows` [N, seq_len + 1] are this worker's token windows (its shard of the corpus); it
  draws shuffled batches of them with `esjax.data.dataset.BatchIterator`. With
  `ratio_follows_lr` a sparse upload's density is `ratio * lr / optim["lr"]` (the authors'
  worker), else `ratio`.
  """

  def __init__(self, worker_id: int, model_cfg: dict[str, Any], optim: dict[str, Any],
               mode: str, ratio: float, windows: np.ndarray, batch_size: int, seed: int = 0,
               ratio_follows_lr: bool = True):
    self.worker_id, self.mode, self.ratio = worker_id, mode, ratio
    self.ratio_follows_lr = ratio_follows_lr and mode != "dense"
    self.lr0 = float(optim["lr"])
    self.batches = dataset.BatchIterator(np.asarray(windows), batch_size, seed + worker_id)
    cfg = moe.checked(ModelConfig.from_dict(dict(model_cfg)))  # the kernels, checked
    self.graphdef, abstract, self.rest = abstract_model(cfg)
    self.treedef = jax.tree.structure(abstract)
    self.sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)]
    self.params = None
    self.opt_state = None
    self.schedule = lr_schedule(optim)
    self.step = 0
    self._step_fn = functools.partial(
        _worker_step, graphdef=self.graphdef, sparse=mode != "dense", ratio=ratio,
        momentum=float(optim.get("momentum", 0.9)),
        weight_decay=float(optim.get("weight_decay", 0.0)),
        clip_norm=float(optim.get("clip_norm", 0.0)))

  def set_params(self, leaves: list[np.ndarray]) -> None:
    self.params = self.treedef.unflatten([jnp.asarray(x) for x in leaves])
    if self.opt_state is None:
      self.opt_state = dgs.samomentum_init(self.params)

  def compute(self) -> tuple[list, dict[str, Any]]:
    """One gradient step on the local model; returns (payload leaves, info for the log)."""
    batch = next(self.batches)
    lr = float(self.schedule(self.step))
    kept = None
    if self.ratio_follows_lr:
      kept = [dgs.scheduled_kept(n, self.ratio, lr, self.lr0) for n in self.sizes]
    payload, self.opt_state, loss = self._step_fn(
        self.params, self.rest, self.opt_state, batch, lr,
        None if kept is None else self.treedef.unflatten([np.int32(k) for k in kept]))
    loss = float(loss)
    if not np.isfinite(loss):
      raise FloatingPointError(f"worker {self.worker_id}: loss is {loss} at local step {self.step}")
    self.step += 1
    leaves = jax.tree.leaves(jax.device_get(payload), is_leaf=lambda x: isinstance(x, dgs.Sparse))
    if kept is not None:
      leaves = dgs.trim(leaves, kept)
    return leaves, {"loss": loss, "lr": lr, "worker_step": self.step}

  def receive(self, reply: list) -> None:
    """Apply the server's reply: a sparse model difference, or the dense model."""
    if reply and isinstance(reply[0], dgs.Sparse):
      self.params = _apply_sparse(self.params, self.treedef.unflatten(reply))
    else:
      self.set_params(reply)

  def param_leaves(self) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(self.params)]


@jax.jit
def _apply_sparse(params, reply):
  return dgs.apply_payload(params, reply)


@functools.partial(jax.jit, static_argnames=("graphdef", "sparse", "ratio", "momentum",
                                             "weight_decay", "clip_norm"))
def _worker_step(params, rest, opt_state, batch, lr, kept, *, graphdef, sparse, ratio,
                 momentum, weight_decay, clip_norm):
  def loss_fn(p):
    return lm_loss(nnx.merge(graphdef, p, rest), batch)

  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if clip_norm:
    grads, _ = clip_by_global_norm(clip_norm).update(grads, optax.EmptyState())
  step = jax.tree.map(lambda g, p: lr * (g + weight_decay * p), grads, params)
  if sparse:
    payload, opt_state = dgs.samomentum_update(step, opt_state, momentum, ratio, kept)
  else:
    payload, opt_state = dgs.momentum_update(step, opt_state, momentum)
  return payload, opt_state, loss
