"""Parallel training: state and batch shardings, the microbatched / pipelined gradient, and
the `Layout` the training loop uses (`esjax.train.partition`).

On any layout the batch is split into `microbatches` (`split_microbatches`), the loss is the
mean of the microbatch losses and the gradient its gradient: one device with the same
microbatch count computes the same function (tests/parallel_equivalence_test.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable, ContextManager

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from esjax.data import hosts
from esjax.parallel import context, mesh as mesh_lib, rules as rules_lib
from esjax.train.loss import lm_loss

Batch = dict[str, jax.Array]


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(params: nnx.State, fm: mesh_lib.FoldedMesh, cfg=None) -> nnx.State:
  """NamedShardings of model parameters (same tree) from their `axes` metadata and rules.

  With pp > 1 every decoder layer's parameters are also split over `pp` (on their first
  dimension that divides), so each device stores 1/pp of the layers' weights and optimizer
  state, as a stage would; the pipeline gathers a stage's layers at the start of the step.
  """
  table = rules_lib.layout_rules(fm, cfg)
  pp = fm.layout.pp

  def sharding(path, v):
    axes = v.get_metadata().get("axes") if _is_var(v) else None
    spec = P() if axes is None else rules_lib.logical_to_spec(axes, table)
    if pp > 1 and getattr(path[0], "key", None) == "layers":
      spec = _split_over_pp(spec, v.shape, fm)
    named = NamedSharding(fm.mesh, spec)
    return v.replace(value=named) if _is_var(v) else named

  return jax.tree_util.tree_map_with_path(sharding, params, is_leaf=_is_var)


def _split_over_pp(spec: P, shape: tuple[int, ...], fm: mesh_lib.FoldedMesh) -> P:
  """`spec` with `pp` added to the first dimension it divides (unchanged if none)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  for d, entry in enumerate(entries):
    axes = rules_lib.entry_axes(entry)
    shards = math.prod(fm.mesh.shape[a] for a in axes) * fm.layout.pp
    if shape[d] % shards == 0:
      entries[d] = ("pp", *axes)
      return P(*entries)
  return spec


def mirror_shardings(tree: Any, params: Any, params_sharding: Any, default: Any) -> Any:
  """Shardings for e.g. an optax state: subtrees shaped like `params` get `params_sharding`,
  every other leaf `default`."""
  params_def = jax.tree.structure(params)

  def visit(node):
    if jax.tree.structure(node) == params_def:
      return params_sharding
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:  # a leaf
      return default
    return jax.tree.unflatten(treedef, [visit(c) for c in children])

  return visit(tree)


def batch_sharding(fm: mesh_lib.FoldedMesh) -> NamedSharding:
  """[B, S] arrays: batch over dp, sequence over cp."""
  return NamedSharding(fm.mesh, P(fm.batch_axes or None, fm.axes("cp") or None))


def split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...]: batch row r goes to microbatch r % n.

  Strided, so a batch sharded over dp in contiguous blocks keeps that sharding in every
  microbatch (no data movement).
  """
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch {x.shape[0]} is not divisible by microbatches={n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def prepare_batch(batch: Batch) -> Batch:
  """The batch as the active layout's model expects it (CP load-balanced sequence order)."""
  fm = mesh_lib.active()
  return batch if fm is None else context.reorder_batch(fm.layout, batch)


def loss_and_grads(graphdef: nnx.GraphDef, params: Any, batch: Batch,
                   loss_fn: Callable = lm_loss, layout: mesh_lib.Layout | None = None
                   ) -> tuple[jax.Array, dict, Any]:
  """(mean loss over microbatches, mean metrics, gradients w.r.t. `params`).

  `layout` defaults to the active one (`mesh.activate`), else a single device. Under an
  active layout the batch is put in CP load-balanced order, and pp > 1 runs the pipeline.
  """
  fm = mesh_lib.active()
  if layout is None:
    layout = fm.layout if fm is not None else mesh_lib.Layout(dp=1)
  batch = prepare_batch(batch)
  if layout.pp > 1:
    from esjax.parallel import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.loss_and_grads(graphdef, params, batch, layout, loss_fn)

  def micro_loss(p, mb):
    return loss_fn(nnx.merge(graphdef, p), mb)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  n = layout.microbatches
  if n == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return loss, metrics, grads

  def body(acc, mb):
    (loss, metrics), grads = grad_fn(params, mb)
    return jax.tree.map(jnp.add, acc, grads), (loss, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (losses, metrics) = jax.lax.scan(body, zeros, split_microbatches(batch, n))
  grads = jax.tree.map(lambda g: g / n, grads)
  metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  return jnp.mean(losses), metrics, grads


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    layout: mesh_lib.Layout | None = None, with_grads: bool = False
                    ) -> Callable:
  """step(params, opt_state, batch) -> (params, opt_state, metrics), not yet jitted.

  A minimal step for the parallel tests, the report and the benchmark (the training loop's
  step, `esjax.train.step`, calls the same `loss_and_grads`). `with_grads` adds the
  gradients to the metrics.
  """

  def step(params, opt_state, batch):
    loss, metrics, grads = loss_and_grads(graphdef, params, batch, layout=layout)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if with_grads:
      metrics["grads"] = grads
    return params, opt_state, metrics

  return step


def init_opt_state(tx: optax.GradientTransformation, params: Any,
                   fm: mesh_lib.FoldedMesh | None, params_sharding: Any = None
                   ) -> tuple[Any, Any]:
  """Optimizer state built on device, parameter-shaped leaves sharded like the parameters.

  Returns (opt_state, its shardings); shardings are None without a mesh.
  """
  if fm is None:
    return tx.init(params), None
  if params_sharding is None:
    params_sharding = jax.tree.map(lambda x: x.sharding, params)
  shapes = jax.eval_shape(tx.init, params)
  opt_sharding = mirror_shardings(shapes, params, params_sharding,
                                  NamedSharding(fm.mesh, P()))
  opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
  return opt_state, opt_sharding


def jit_train_step(step: Callable, fm: mesh_lib.FoldedMesh, params_sharding: Any,
                   opt_sharding: Any, cfg=None) -> Callable:
  """jax.jit of `step` with the state's shardings in and out; calls run under the layout.

  `run.lower(*args)` lowers it (for the report) under the layout as well.
  """
  jitted = jax.jit(step, in_shardings=(params_sharding, opt_sharding, batch_sharding(fm)),
                   out_shardings=(params_sharding, opt_sharding, None), donate_argnums=(0, 1))

  def run(*args):
    with mesh_lib.activate(fm, cfg):
      return jitted(*args)

  def lower(*args):
    with mesh_lib.activate(fm, cfg):
      return jitted.lower(*args)

  run.lower = lower  # type: ignore[attr-defined]
  return run


class ParallelTraining:
  """`esjax.train.partition.Layout` of a folded mesh: what the training loop uses."""

  def __init__(self, layout: mesh_lib.Layout, model_cfg, devices=None):
    self.fm = mesh_lib.make_mesh(layout, devices)
    self.layout = self.fm.layout
    self.model_cfg = model_cfg
    mesh_lib.check_model(self.layout, model_cfg)

  def context(self) -> ContextManager[Any]:
    return mesh_lib.activate(self.fm, self.model_cfg)

  def state_shardings(self, abstract_state: Any, abstract_params: nnx.State) -> Any:
    """TrainState of shardings: params by the rules, optimizer state mirroring them."""
    params = param_shardings(abstract_params, self.fm, self.model_cfg)
    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    replicated = NamedSharding(self.fm.mesh, P())
    return mirror_shardings(abstract_state, abstract_state.params, params, replicated)

  def batch_sharding(self) -> NamedSharding:
    return batch_sharding(self.fm)

  def put_batch(self, batch: dict[str, np.ndarray], rows: np.ndarray | None = None,
                batch_size: int | None = None) -> dict[str, jax.Array]:
    """Global batch (the same on every process) -> global device arrays; with `rows`, this
    process's rows of a `batch_size` global batch (esjax.data.hosts)."""
    sharding = self.batch_sharding()
    if jax.process_count() == 1:
      return jax.device_put(batch, sharding)
    if rows is not None:
      return hosts.global_batch(batch, rows, sharding, batch_size)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}
