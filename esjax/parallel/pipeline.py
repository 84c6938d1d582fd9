"""Pipeline parallelism: a GPipe schedule over microbatches, MoE layers inside the stages.

Stage s holds layers [s*L/pp, (s+1)*L/pp). Inside the step the layer parameters are stacked
per slot j into [pp, ...] arrays sharded over `pp` (the rules' `layers` axis), and one loop
iteration runs every stage at once with `jax.vmap(..., spmd_axis_name="pp")`: iteration t
feeds microbatch t to stage 0, stage s works on microbatch t - s, and the activations move
one stage on with a roll over the pp-sharded axis (a collective-permute). M microbatches
take M + pp - 1 iterations (bubble (pp-1)/(M+pp-1)). The MoE blocks' `shard_map` runs
manual over `pp` too, so each stage routes and drops over its own microbatch.

Embedding, final norm, LM head and loss run outside the pipeline, per microbatch, through
the model's own `loss_fn` (the layer loop is replaced by the pipeline's output through
`hooks.override_layers`), so the loss is the mean of the microbatch losses, as in gradient
accumulation without PP. Parameters stay in the model's own tree; each layer's weights are
stored split over `pp` (`step.param_shardings`), so a device holds 1/pp of the layers'
weights and optimizer state. The stacking inside the step is an all-to-all over pp that
hands every stage its layers, and its transpose returns the stage's gradients the same way
(`python -m esjax.parallel.report` lists both).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from esjax.parallel import context, hooks, mesh as mesh_lib
from esjax.parallel.rules import active_rules, constrain, logical_to_spec

_RESIDUAL = ("act_batch", "act_res_len", "act_embed")


def _stack_stage_params(model, pp: int) -> tuple[list[nnx.GraphDef], list[Any]]:
  """Per layer slot j: the graphdef of stage 0's layer j and the pp layers' states stacked."""
  n = len(model.layers)
  per = n // pp
  graphdefs, stacked = [], []
  rules = active_rules() or {}
  for j in range(per):
    splits = [nnx.split(model.layers[s * per + j]) for s in range(pp)]
    graphdefs.append(splits[0][0])
    states = [st for _, st in splits]

    def stack(*vs):
      x = jnp.stack([v[...] if isinstance(v, nnx.Variable) else v for v in vs])
      axes = vs[0].get_metadata().get("axes") if isinstance(vs[0], nnx.Variable) else None
      if axes is not None and rules and not jax.sharding.get_abstract_mesh().empty:
        spec = logical_to_spec(("layers", *axes), rules)
        x = jax.lax.with_sharding_constraint(x, spec)
      return vs[0].replace(value=x) if isinstance(vs[0], nnx.Variable) else x

    stacked.append(jax.tree.map(stack, *states, is_leaf=lambda v: isinstance(v, nnx.Variable)))
  return graphdefs, stacked


def run_pipeline(model, x: jax.Array, positions: jax.Array, pp: int
                 ) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
  """x [M, mb, S, D] embedded microbatches -> (outputs [M, mb, S, D], per MoE layer (in layer
  order) a dict of stats with a leading microbatch axis [M, ...])."""
  from esjax.models.transformer import run_block  # pylint: disable=g-import-not-at-top
  cfg = model.cfg
  m = x.shape[0]
  graphdefs, stacked = _stack_stage_params(model, pp)

  def stage(states, h, pos):
    stats = []
    for graphdef, state in zip(graphdefs, states):
      h, s = run_block(nnx.merge(graphdef, state), h, pos, cfg.remat)
      stats.append(s)
    return h, [s for s in stats if s is not None]

  vstage = jax.vmap(stage, spmd_axis_name="pp")
  shapes = jax.eval_shape(vstage, stacked, jnp.zeros((pp, *x.shape[1:]), x.dtype),
                          jnp.zeros((pp, *positions.shape[1:]), positions.dtype))[1]
  acc0 = jax.tree.map(lambda s: jnp.zeros((s.shape[0], m, *s.shape[1:]), s.dtype), shapes)
  carry0 = (jnp.zeros((pp, *x.shape[1:]), x.dtype),
            jnp.zeros((pp, *positions.shape[1:]), positions.dtype),
            jnp.zeros_like(x), acc0)

  def body(carry, t):
    h, pos, outputs, acc = carry
    feed = jnp.minimum(t, m - 1)
    h = jnp.roll(h, 1, axis=0).at[0].set(x[feed])
    pos = jnp.roll(pos, 1, axis=0).at[0].set(positions[feed])
    h = constrain(h, ("act_stage", *_RESIDUAL))
    h, stats = vstage(stacked, h, pos)
    done = t - (pp - 1)  # the microbatch leaving the last stage
    outputs = jnp.where(done >= 0, outputs.at[jnp.maximum(done, 0)].set(h[pp - 1]), outputs)
    # Stage s worked on microbatch t - s: add its stats there (bubble iterations add zeros).
    hit = jnp.arange(m)[None, :] == (t - jnp.arange(pp))[:, None]  # [pp, M]

    def add(a, s):
      mask = hit.reshape(hit.shape + (1,) * (s.ndim - 1)).astype(s.dtype)
      return a + mask * s[:, None]

    acc = jax.tree.map(add, acc, stats)
    return (h, pos, outputs, acc), None

  (_, _, outputs, acc), _ = jax.lax.scan(body, carry0, jnp.arange(m + pp - 1))
  # acc: per slot j (MoE slots only) dicts of [pp, M, ...]; layer s*per + j is acc[j][:, s].
  per_stage = [[{k: v[s] for k, v in slot.items()} for slot in acc] for s in range(pp)]
  return outputs, [d for stage_stats in per_stage for d in stage_stats]


def loss_and_grads(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array],
                   layout: mesh_lib.Layout, loss_fn: Callable
                   ) -> tuple[jax.Array, dict, Any]:
  """Mean microbatch loss, mean metrics and gradients, with the layers pipelined over pp."""
  from esjax.parallel.step import split_microbatches  # pylint: disable=g-import-not-at-top
  pp, n_micro = layout.pp, layout.microbatches
  if n_micro < 1:
    raise ValueError(f"microbatches={n_micro} must be >= 1")
  batch = context.with_positions(batch)
  micro = split_microbatches(batch, n_micro)

  def total(p):
    model = nnx.merge(graphdef, p)
    if len(model.layers) % pp:
      raise ValueError(f"n_layers={len(model.layers)} is not divisible by pp={pp}")
    x = split_microbatches(model.embed_tokens(batch["inputs"]), n_micro)
    outputs, stats = run_pipeline(model, x, micro["positions"], pp)
    losses, metrics = [], []
    for i in range(n_micro):
      mb = {k: v[i] for k, v in micro.items()}
      layer_stats = [{k: v[i] for k, v in s.items()} for s in stats]
      fn = lambda mdl, h, pos, i=i, ls=layer_stats: (outputs[i], ls)  # noqa: E731
      with hooks.override_layers(fn):
        loss, met = loss_fn(model, mb)
      losses.append(loss)
      metrics.append(met)
    metrics = jax.tree.map(lambda *ms: jnp.mean(jnp.stack(ms), axis=0), *metrics)
    return jnp.mean(jnp.stack(losses)), metrics

  (loss, metrics), grads = jax.value_and_grad(total, has_aux=True)(params)
  return loss, metrics, grads
