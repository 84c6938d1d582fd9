"""A parallel train step: shardings from the rules, microbatches, pipeline, optax update.

`make_train_step` is what the report tool compiles and what the parallel tests run; the
training loop can use the same pieces (`param_shardings`, `init_opt_state`,
`loss_and_grads`). On any layout the batch is split into `microbatches`
(`split_microbatches`), the loss is the mean of the microbatch losses and the gradient its
gradient: one device with the same microbatch count computes the same function.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from esjax.parallel import context, mesh as mesh_lib, rules as rules_lib
from esjax.train.loss import lm_loss

Batch = dict[str, jax.Array]


def param_shardings(params: nnx.State, fm: mesh_lib.FoldedMesh, cfg=None) -> nnx.State:
  """NamedShardings of model parameters from their `axes` metadata and the layout rules."""
  table = rules_lib.layout_rules(fm, cfg)

  def sharding(v):
    axes = v.get_metadata().get("axes") if isinstance(v, nnx.Variable) else None
    spec = P() if axes is None else rules_lib.logical_to_spec(axes, table)
    return v.replace(value=NamedSharding(fm.mesh, spec))

  return jax.tree.map(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


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


def loss_and_grads(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
                   layout: mesh_lib.Layout, rest: nnx.State | None = None,
                   loss_fn: Callable = lm_loss) -> tuple[jax.Array, dict, nnx.State]:
  """Mean loss over microbatches, its metrics (means) and gradients w.r.t. `params`.

  Runs the pipeline when layout.pp > 1. `rest` holds non-parameter model state (if any).
  """
  rest = nnx.State({}) if rest is None else rest
  if layout.pp > 1:
    from esjax.parallel import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.loss_and_grads(graphdef, params, batch, layout, rest, loss_fn)

  def micro_loss(p, mb):
    model = nnx.merge(graphdef, p, rest)
    return loss_fn(model, mb)

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
                    fm: mesh_lib.FoldedMesh | None, cfg=None,
                    layout: mesh_lib.Layout | None = None, with_grads: bool = False
                    ) -> Callable:
  """step(params, opt_state, batch) -> (params, opt_state, metrics), not yet jitted.

  With a folded mesh `fm` the step runs under its layout (rules, EP/CP overrides) and the
  batch is put in load-balanced order for CP. Without one it is the single-device step;
  `layout` then only supplies the microbatch count. `with_grads` adds the gradients to the
  metrics (tests).
  """
  layout = fm.layout if fm is not None else (layout or mesh_lib.Layout(dp=1))

  def step(params, opt_state, batch):
    if fm is not None:
      batch = context.reorder_batch(layout, batch)
    loss, metrics, grads = loss_and_grads(graphdef, params, batch, layout)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if with_grads:
      metrics["grads"] = grads
    return params, opt_state, metrics

  return step


def jit_train_step(step: Callable, fm: mesh_lib.FoldedMesh, params_sharding: Any,
                   opt_sharding: Any, cfg=None) -> Callable:
  """jax.jit of `step` with the state's shardings in and out, run under the layout."""
  jitted = jax.jit(step, in_shardings=(params_sharding, opt_sharding, batch_sharding(fm)),
                   out_shardings=(params_sharding, opt_sharding, None), donate_argnums=(0, 1))

  def run(*args):
    with mesh_lib.activate(fm, cfg):
      return jitted(*args)

  run.lower = lambda *args: _lower(jitted, fm, cfg, *args)  # type: ignore[attr-defined]
  return run


def _lower(jitted, fm, cfg, *args):
  with mesh_lib.activate(fm, cfg):
    return jitted.lower(*args)


def init_opt_state(tx: optax.GradientTransformation, params: nnx.State,
                   fm: mesh_lib.FoldedMesh | None, cfg=None) -> tuple[Any, Any]:
  """Optimizer state created on device, each parameter-shaped leaf sharded like its parameter.

  Returns (opt_state, its shardings); shardings are None without a mesh.
  """
  if fm is None:
    return tx.init(params), None
  shapes = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(fm.mesh, P())
  opt_sharding = optax.tree_map_params(
      tx, lambda _, sharding: sharding, shapes, param_shardings(params, fm, cfg),
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
  return opt_state, opt_sharding
