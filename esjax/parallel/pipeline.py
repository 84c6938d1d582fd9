"""The gradient of one step on any layout: microbatches, pipeline schedules, one reduction.

`Engine.loss_and_grads(params, batch)` runs inside one `shard_map` over the whole mesh, every
axis manual, so each device sees its shards and every collective is explicit:

- parameters arrive in the stacked layout of `esjax.parallel.stages` (stage s holds its own
  layers: weights and optimizer state stay on their stage), cast to the compute dtype;
- the local batch [B_l, S_c] is cut into microbatches locally (row j -> microbatch j % M, the
  same microbatches the single-device step uses), nothing is gathered;
- the loops of `esjax.parallel.ticks` run the model's pieces (`esjax.parallel.units`): with
  one stage a plain loop of `jax.vjp` of the whole model over the microbatches, with pp > 1
  the lock-step ticks of a `schedule.Schedule`, whose backward units run the pullbacks their
  forward units stored (`esjax.parallel.residuals`);
- parameter gradients are accumulated locally in float32 (parameters are typed
  device-varying before the loop, so no collective runs per microbatch) and reduced once after
  it: a psum over the axes a parameter is replicated on, or with the distributed optimizer a
  reduce-scatter onto its master shard. fsdp parameters are all-gathered per use; autodiff
  turns that into a reduce-scatter of their gradients.

tests/parallel_equivalence_test.py checks every layout against `jax.value_and_grad` of
`esjax.models.loss.lm_loss` on one device, without this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from esjax.models.config import ModelConfig
from esjax.models.moe import update_expert_biases
from esjax.models.transformer import Block
from esjax.parallel import rules, schedule as schedule_lib, stages, ticks
from esjax.parallel.batch import prepare_batch, split_microbatches
from esjax.parallel.ticks import SCOPE_B, SCOPE_F, SCOPE_FIRST, SCOPE_LAST, SCOPE_SKIP
from esjax.parallel.units import STATS, Units
from esjax.sharding import collectives as col
from esjax.sharding.plan import ParallelPlan

_KEEP_DTYPE = ("router",)  # parameters the compute-dtype cast leaves in their own dtype


@dataclasses.dataclass(frozen=True)
class Engine:
  """The step's model, layout and schedule. Build with `Engine.build(cfg, plan)`."""

  cfg: ModelConfig
  plan: ParallelPlan
  fmt: stages.StageFormat
  slot_defs: tuple[nnx.GraphDef, ...]
  schedule: schedule_lib.Schedule
  moe_slots: tuple[int, ...]  # slots p (within a period) that are MoE layers

  @classmethod
  def build(cls, cfg: ModelConfig, plan: ParallelPlan) -> "Engine":
    lay = plan.layout
    fmt = stages.StageFormat.of(cfg, lay.pp, lay.virtual_stages)
    defs, moe = [], []
    for p in range(fmt.period):
      layer = fmt.layer(0, 0, 0, p)
      block = nnx.eval_shape(lambda layer=layer: Block(cfg, layer, nnx.Rngs(0), plan))
      defs.append(nnx.split(block, nnx.Param, ...)[0])  # the rest: buffers
      if cfg.is_moe_layer(layer):
        moe.append(p)
    name = lay.schedule if lay.pp > 1 else "1f1b"
    sched = schedule_lib.make_schedule(name, lay.pp, lay.microbatches, lay.virtual_stages)
    return cls(cfg, plan, fmt, tuple(defs), sched, tuple(moe))

  def branch_weights(self, train: bool = True, mean: bool = False) -> dict[str, float]:
    """Share of executions of each conditional of `ticks.run_schedule` that take its true
    branch, on the busiest device (what `esjax.plan.report` weighs collectives by): a unit
    runs at M*v of the ticks; the first chunk's embedding (stage 0) and the last chunk's
    head (stage pp-1) in 1/v of a stage's units; the forward unit skips the last chunk on
    stage pp-1 only, so a device of any other stage runs every forward chunk. `mean`:
    averaged over the stages instead (what the planner's FLOP count multiplies by the
    number of devices): the embedding, the head and the skip in 1/(v*pp) of the units. One
    stage (`ticks.run_plain`) has no conditionals."""
    s = self.schedule
    busy = s.microbatches * s.virtual / s.ticks
    end = 1 / (s.virtual * s.pp) if mean else 1 / s.virtual
    skip = end if mean else (1.0 if s.pp == 1 else 0.0)
    return {SCOPE_F: busy, SCOPE_B: busy if train else 0.0, SCOPE_FIRST: end,
            SCOPE_LAST: end, SCOPE_SKIP: skip}

  # Layouts of the parameters and the batch.

  @property
  def compute_specs(self) -> dict[str, Any]:
    return rules.compute_specs(self.plan, self.cfg, self.fmt)

  def master_specs(self, shapes: Any) -> dict[str, Any]:
    return rules.master_specs(self.plan, self.compute_specs, shapes)

  def buffer_specs(self, shapes: Any) -> Any:
    """Buffers (stacked like the layers) live with their stage, replicated within it."""
    pp = self.plan.pp or None
    return stages.map_dicts(lambda a: P(pp, *([None] * (len(a.shape) - 1))), shapes)

  def update_buffers(self, buffers: Any, metrics: dict[str, jax.Array]) -> Any:
    """The buffers after a step: each MoE layer's expert bias moved by the aux-loss-free rule
    from the step's expert load (`moe.update_expert_biases`), outside the gradient."""
    if not buffers or not self.cfg.expert_bias:
      return buffers
    load = metrics["expert_load"]  # [n_moe_layers, E] in layer order
    row = {layer: i for i, layer in enumerate(self.cfg.moe_layers)}
    index = self.fmt.layer_index()
    slots = dict(buffers[stages.STAGES])
    for p, tree in slots.items():
      if tree:
        rows = jnp.asarray(np.vectorize(row.__getitem__)(index[int(p)]))  # [pp, v, R]
        bias = update_expert_biases(self.cfg, tree["mlp"]["expert_bias"], load[rows])
        slots[p] = {**tree, "mlp": {**tree["mlp"], "expert_bias": bias}}
    return {**buffers, stages.STAGES: slots}

  def batch_spec(self) -> P:
    """[B, S] batch arrays: batch over dp, sequence over cp (replicated over tp and pp)."""
    return P(self.plan.dp or None, self.plan.cp or None)

  def compute_params(self, master: dict[str, Any]) -> dict[str, Any]:
    """Master weights -> the weights the step computes with: the compute dtype, laid out by
    the compute specs (with ZeRO-1 this is the one all-gather of the weights per step)."""
    dtype = jnp.dtype(self.cfg.dtype)

    def cast(path, x):
      keep = any(getattr(k, "key", None) in _KEEP_DTYPE for k in path)
      return x if keep or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)

    params = jax.tree_util.tree_map_with_path(cast, master)
    return jax.lax.with_sharding_constraint(params, rules.named(self.plan, self.compute_specs))

  # The step.

  def loss_and_grads(self, params: dict[str, Any], batch: dict[str, jax.Array],
                     master_specs: dict[str, Any], buffers: Any = None
                     ) -> tuple[dict[str, jax.Array], Any]:
    """(metrics, float32 gradients laid out by `master_specs`) of the mean microbatch loss."""
    return self._run(params, batch, master_specs, buffers or {}, train=True)

  def evaluate(self, params: dict[str, Any], batch: dict[str, jax.Array], buffers: Any = None
               ) -> dict[str, jax.Array]:
    """The loss metrics of `batch` (forward only, the same microbatches and pipeline)."""
    return self._run(params, batch, None, buffers or {}, train=False)[0]

  def _run(self, params, batch, master_specs, buffers, train: bool):
    batch = prepare_batch(self.plan, batch)
    bspec = self.batch_spec()
    gathers = rules.fsdp_gathers(self.plan, self.cfg, self.fmt)
    in_specs = (self.compute_specs, {k: bspec for k in batch}, self.buffer_specs(buffers))
    out_specs = (P(), master_specs if train else P())

    def body(params, batch, buffers):
      u = Units(self, gathers)
      params = col.vary(params, u.axes)  # gradients stay local until the one reduction
      buffers = col.vary(buffers, u.axes)
      m = self.plan.layout.microbatches
      micro = split_microbatches(batch, m)  # varying over the data axes only: a mask must
      # not make the (tp-replicated) CE terms look tp-varying
      shapes = self._stat_shapes()
      if self.plan.layout.pp == 1:
        c = ticks.run_plain(u, m, params, micro, buffers, shapes, train)
      else:
        sched = self.schedule if train else self.schedule.forward_only()
        c = ticks.run_schedule(u, sched, params, micro, buffers, shapes, train)
      metrics = self._metrics(c, m)
      return metrics, (self._reduce(c.grads, master_specs) if train else None)

    fn = jax.shard_map(body, mesh=self.plan.mesh, in_specs=in_specs, out_specs=out_specs)
    return fn(params, batch, buffers)

  # The end of the step.

  def _stat_shapes(self) -> dict[str, tuple[int, ...]]:
    """Router statistics per round of a stage: [v, n_moe (MoE layers of a chunk), ...]."""
    n_moe = self.fmt.repeats * len(self.moe_slots)
    if not n_moe:
      return {}
    v, e = self.fmt.virtual, self.cfg.n_experts
    return {k: (v, n_moe, e) if k == "expert_load" else (v, n_moe) for k in STATS}

  def _metrics(self, c: ticks.Carry, m: int) -> dict[str, jax.Array]:
    """Means over microbatches of the loss metrics and the per-layer router statistics,
    replicated on every device: loss terms are shares (summed over all devices), router
    statistics live on every stage of a chunk's layers (gathered over pp) and agree across
    the stage (pmean only makes them replicated in type)."""
    plan, cfg = self.plan, self.cfg
    total = lambda x: col.psum(x, plan.all_axes) / m  # noqa: E731
    terms = jax.tree.map(total, c.terms)
    out = {"ce_loss": terms["ce"], "n_tokens": terms["tokens"], "moe_loss": total(c.moe_loss)}
    out["loss"] = out["ce_loss"] + out["moe_loss"]
    if cfg.max_z_loss_coef:
      out["max_z_loss"] = terms["max_z"]
      out["loss"] = out["loss"] + cfg.max_z_loss_coef * terms["max_z"]
    if c.stats:
      layers = {k: self._layer_order(col.pmean(self._all_stages(x), plan.stage_axes)) / m
                for k, x in c.stats.items()}
      out.update({k: jnp.mean(x) for k, x in layers.items() if k != "expert_load"})
      out["expert_load"] = layers["expert_load"]
    return out

  def _all_stages(self, x):
    """[v, n, ...] per stage -> [pp, v, n, ...] on every device."""
    if not self.plan.pp:
      return x[None]
    return lax.all_gather(x, self.plan.pp, axis=0, tiled=False, to="invarying")

  def _layer_order(self, x):
    """[pp, v, n, ...] -> [n_moe_layers, ...]: chunk q = r * pp + s holds MoE layers
    q*n .. q*n + n - 1."""
    pp, v = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape(pp * v * x.shape[2], *x.shape[3:])

  def _reduce(self, grads, master_specs):
    """The one gradient reduction per step: a psum over the axes a parameter is replicated
    on, or a reduce-scatter onto its master shard where the distributed optimizer splits it."""
    plan = self.plan

    def one(g, c_spec, m_spec):
      dim, split = rules.extra_axes(c_spec, m_spec)
      g = col.psum(g, tuple(a for a in rules.replica_axes(plan, c_spec) if a not in split))
      return col.psum_scatter(g, split, dim) if split else g

    return stages.map_dicts(one, grads, self.compute_specs, master_specs)
