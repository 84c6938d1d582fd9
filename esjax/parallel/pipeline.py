"""The gradient of one step on any layout: microbatches, pipeline schedules, one reduction.

`Engine.loss_and_grads(params, batch)` runs inside one `shard_map` over the whole mesh, every
axis manual, so each device sees its shards and every collective is explicit:

- parameters arrive in the stacked layout of `esjax.parallel.stages` (stage s holds its own
  layers: weights and optimizer state stay on their stage), cast to the compute dtype;
- the local batch [B_l, S_c] is cut into microbatches locally (row j -> microbatch j % M, the
  same microbatches the single-device step uses), nothing is gathered;
- a lock-step loop over the ticks of a `schedule.Schedule` runs, per stage, at most one
  forward unit (one chunk of one microbatch: embedding on stage 0's first chunk, the blocks
  as a `lax.scan` over the chunk's layers) and one backward unit (the chunk's forward again
  under `jax.vjp`, then its backward; LM head and loss inside the last chunk). Forward outputs
  move one stage on and input-gradients one stage back with `ppermute` over pp; idle units
  are skipped with `lax.cond`;
- parameter gradients are accumulated locally in float32 (parameters are typed
  device-varying before the loop, so no collective runs per microbatch) and reduced once after
  it: a psum over the axes a parameter is replicated on, or with the distributed optimizer a
  reduce-scatter onto its master shard. fsdp parameters are all-gathered per use; autodiff
  turns that into a reduce-scatter of their gradients.

With one stage and one microbatch this is `jax.value_and_grad` of `esjax.models.loss.lm_loss`
with the layers under a scan: tests/parallel_equivalence_test.py checks every layout against
exactly that, on one device, without this module.
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

from esjax.models import loss as loss_lib
from esjax.models.config import ModelConfig
from esjax.models.moe import update_expert_biases
from esjax.models.transformer import (Block, embed_lookup, head_logits, run_block,
                                      stacked_moe_stats, vocab_of)
from esjax.parallel import rules, schedule as schedule_lib, stages
from esjax.parallel.batch import prepare_batch, split_microbatches
from esjax.sharding import collectives as col
from esjax.sharding.plan import ParallelPlan

STATS = ("aux_loss", "seq_aux_loss", "z_loss", "expert_load", "drop_fraction",
         "ep_overflow_fraction")

# Named scopes of the loop's conditionals: the forward and backward units, and inside them
# the first chunk's embedding and the last chunk's head (see `Engine.branch_weights`).
SCOPE_F, SCOPE_B, SCOPE_FIRST, SCOPE_LAST, SCOPE_SKIP = (
    "esjax_unit_f", "esjax_unit_b", "esjax_first", "esjax_last", "esjax_skip_last")


def _first(pred, true_fn, false_fn):
  with jax.named_scope(SCOPE_FIRST):
    return lax.cond(pred, true_fn, false_fn)


def _last(pred, true_fn, false_fn, scope=SCOPE_LAST):
  with jax.named_scope(scope):
    return lax.cond(pred, true_fn, false_fn)


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
    """Share of executions of each loop conditional that take its true branch, on the
    busiest device (what `esjax.plan.report` weighs collectives by): a unit runs at M*v of
    the ticks; the first chunk's embedding (stage 0) and the last chunk's head (stage pp-1)
    in 1/v of a stage's units; the forward unit skips the last chunk on stage pp-1 only, so
    a device of any other stage runs every forward chunk. `mean`: averaged over the stages
    instead (what the planner's FLOP count multiplies by the number of devices): the
    embedding, the head and the skip in 1/(v*pp) of the units."""
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

    def body(p, b, bufs):
      return _Step(self, gathers, train).run(p, b, bufs, master_specs)

    fn = jax.shard_map(body, mesh=self.plan.mesh, in_specs=in_specs, out_specs=out_specs)
    return fn(params, batch, buffers)


class _Step:
  """One device's side of the step (inside the shard_map)."""

  def __init__(self, engine: Engine, gathers: dict[str, Any], train: bool):
    self.e, self.gathers, self.train = engine, gathers, train
    self.cfg, self.plan, self.fmt = engine.cfg, engine.plan, engine.fmt
    self.sched = engine.schedule if train else engine.schedule.forward_only()
    self.axes = self.plan.all_axes
    self.data = self.plan.dp + self.plan.cp  # the axes that split a microbatch's tokens

  # Parameters: slices of this stage's stacks, fsdp gathers (their gradient: reduce-scatter).

  def _gather(self, tree, gathers):
    def one(x, gs):
      for dim, axes in gs:
        x = col.all_gather(x, axes, dim)
      return x
    return stages.map_dicts(one, tree, gathers)

  def _slice_round(self, stage_params, r):
    """Round r of this stage's layer stacks: {slot: tree [R, ...]}."""
    return stages.map_dicts(lambda x: lax.dynamic_index_in_dim(x[0], r, 0, keepdims=False),
                            stage_params)

  def _gather_round(self, sp):
    g = stages.map_dicts(lambda gs: tuple((d - 2, a) for d, a in gs),
                         self.gathers[stages.STAGES])
    return self._gather(sp, g)

  def _end(self, ends, name):
    return self._gather(ends[name], self.gathers[name])

  # Model pieces: the model's own functions.

  def _embed(self, ends, tokens):
    x = embed_lookup(self._end(ends, "embed"), tokens, self.plan.tp, self.cfg.dtype)
    return col.vary(x, self.axes)

  def _chunk(self, sp, bp, x, positions, mask):
    """The chunk's layers on x [mb, S_l, D] (a scan over its R repeats of the slot
    pattern): (y, stats [R, MoE slots, ...]). `bp`: the chunk's buffers (no gradient)."""
    cfg, defs = self.cfg, self.e.slot_defs
    sp = self._gather_round(sp)

    def rep(h, trees):
      out = []
      for gd, (tree, buf) in zip(defs, trees):
        h, s = run_block(nnx.merge(gd, tree, buf), h, positions, cfg.remat, mask)
        if s is not None:
          out.append(s)
      return h, ({k: jnp.stack([s[k] for s in out]) for k in STATS} if out else {})

    trees = tuple((sp[p], lax.stop_gradient(bp.get(p, {}))) for p in range(self.fmt.period))
    if self.fmt.repeats == 1:
      x, stats = rep(x, jax.tree.map(lambda a: a[0], trees))
      return x, jax.tree.map(lambda a: a[None], stats)
    return lax.scan(rep, x, trees)

  def _share(self, tree):
    """This device's share of (possibly replicated) loss terms: they sum to the terms over
    all devices, with exact gradients (`collectives.share`)."""
    return col.share(tree, self.axes, self.plan.size)

  def _head(self, ends, y, d):
    """Loss terms of one microbatch on its last chunk (ce, tokens, max_z: means over the
    microbatch's tokens), as this device's share."""
    cfg = self.cfg
    w = self._end(ends, "embed").T if cfg.tie_embeddings else self._end(ends, "lm_head")
    logits = head_logits(y, self._end(ends, "final_norm")["scale"], w, cfg.norm_eps,
                         self.plan.tp, vocab_of(cfg))
    sums = col.psum(loss_lib.token_sums(cfg, logits, d["targets"], d.get("mask"),
                                        self.plan.tp), self.data)
    n = jnp.maximum(sums["tokens"], 1.0)
    out = {"ce": sums["ce"] / n, "tokens": sums["tokens"]}
    if cfg.max_z_loss_coef:
      out["max_z"] = sums["max_z"] / n
    return self._share(out)

  def _zero_terms(self):
    keys = ("ce", "tokens", "max_z") if self.cfg.max_z_loss_coef else ("ce", "tokens")
    return col.vary({k: jnp.zeros((), jnp.float32) for k in keys}, self.axes)

  def _moe_loss(self, stats):
    """This device's share of the weighted router losses of a chunk's MoE layers."""
    if not stats:
      return col.vary(jnp.zeros((), jnp.float32), self.axes)
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in stats.items()}
    return self._share(stacked_moe_stats(self.cfg, flat)["moe_loss"])

  def _objective(self, terms, stats):
    """The unit's share of the microbatch loss: its MoE layers' router losses, and on the
    last chunk CE + the weighted max-z loss."""
    out = terms["ce"] + self._moe_loss(stats)
    if self.cfg.max_z_loss_coef:
      out = out + self.cfg.max_z_loss_coef * terms["max_z"]
    return out

  # The loop.

  def run(self, params, batch, buffers, master_specs):
    plan, sched, cfg, axes = self.plan, self.sched, self.cfg, self.axes
    pp, v, m = sched.pp, sched.virtual, sched.microbatches
    params = col.vary(params, axes)  # gradients stay local until the one reduction
    micro = split_microbatches(batch, m)  # varying over the data axes only: a mask must
    # not make the (tp-replicated) CE terms look tp-varying
    stage = col.axis_index(plan.pp)
    stage_params = params[stages.STAGES]
    stage_buffers = col.vary(buffers.get(stages.STAGES, {}), axes)
    ends = {k: x for k, x in params.items() if k != stages.STAGES}
    mb, s_c = micro["inputs"].shape[1:]
    act = jnp.zeros((mb, s_c // plan.size(plan.tp), cfg.d_model), jnp.dtype(cfg.dtype))
    n_moe = self.fmt.repeats * len(self.e.moe_slots)
    carry = {
        "fwd": act, "bwd": act,
        "stash": jnp.zeros((sched.stash_size,) + act.shape, act.dtype),
        "stats": {k: jnp.zeros((v,) + shp, jnp.float32)
                  for k, shp in self._stat_shapes(n_moe).items()},
        "terms": {k: jnp.zeros((), jnp.float32) for k in self._zero_terms()},
        "moe_loss": jnp.zeros((), jnp.float32),
    }
    if self.train:
      carry["grads"] = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), params)
    carry = col.vary(carry, axes)
    tables = {k: jnp.asarray(getattr(sched, k)) for k in
              ("f_valid", "f_micro", "f_round", "f_slot", "b_valid", "b_micro", "b_round",
               "b_slot")}

    def unit(pre, t):
      get = lambda k: tables[f"{pre}_{k}"][t][stage]  # noqa: E731
      i, r = get("micro"), get("round")
      data = {k: lax.dynamic_index_in_dim(x, i, 0, keepdims=False) for k, x in micro.items()}
      return (get("valid"), r, get("slot"), (r == 0) & (stage == 0),
              (r == v - 1) & (stage == pp - 1), data)

    def accumulate(c, r, stats, terms):
      c = dict(c, terms=jax.tree.map(jnp.add, c["terms"], terms),
               moe_loss=c["moe_loss"] + self._moe_loss(stats))
      if stats:
        flat = {k: x.reshape(-1, *x.shape[2:]) for k, x in stats.items()}
        c["stats"] = {k: lax.dynamic_update_index_in_dim(
            c["stats"][k], lax.dynamic_index_in_dim(c["stats"][k], r, 0, keepdims=False)
            + flat[k], r, 0) for k in flat}
      return c

    def forward(c, t):
      valid, r, slot, first, last, d = unit("f", t)

      def run(c):
        x = _first(first, lambda: self._embed(ends, d["inputs"]), lambda: c["fwd"])
        c = dict(c, stash=lax.dynamic_update_index_in_dim(c["stash"], x, slot, 0))
        chunk = lambda: self._chunk(self._slice_round(stage_params, r),  # noqa: E731
                                    self._slice_round(stage_buffers, r), x, d["positions"],
                                    d.get("mask"))
        if self.train:  # the last chunk runs in its backward unit, with the head
          y = _last(last, lambda: jnp.zeros_like(x), lambda: col.vary(chunk()[0], axes),
                    SCOPE_SKIP)
          return c, y
        y, stats = chunk()
        terms = _last(last, lambda: self._head(ends, y, d), self._zero_terms)
        return accumulate(c, r, stats, terms), col.vary(y, axes)

      with jax.named_scope(SCOPE_F):
        return lax.cond(valid, run, lambda c: (c, jnp.zeros_like(c["fwd"])), c)

    def backward(c, t):
      valid, r, slot, first, last, d = unit("b", t)

      def run(c):
        x_stashed = lax.dynamic_index_in_dim(c["stash"], slot, 0, keepdims=False)
        sp = self._slice_round(stage_params, r)
        bp = self._slice_round(stage_buffers, r)

        def f(sp, ends, x):
          x = _first(first, lambda: self._embed(ends, d["inputs"]), lambda: x)
          y, stats = self._chunk(sp, bp, x, d["positions"], d.get("mask"))
          terms = _last(last, lambda: self._head(ends, y, d), self._zero_terms)
          return (y, self._objective(terms, stats)), (stats, terms)

        (_, obj), vjp, (stats, terms) = jax.vjp(f, sp, ends, x_stashed, has_aux=True)
        dy = jnp.where(last, jnp.zeros_like(c["bwd"]), c["bwd"])
        d_sp, d_ends, dx = vjp((dy, col.match_vma(jnp.full((), 1.0 / m, obj.dtype), obj)))
        grads = dict(c["grads"])
        grads[stages.STAGES] = stages.map_dicts(
            lambda a, g: lax.dynamic_update_index_in_dim(
                a, (lax.dynamic_index_in_dim(a[0], r, 0, keepdims=False)
                    + g.astype(jnp.float32))[None], r, 1),
            grads[stages.STAGES], d_sp)
        for k, g in d_ends.items():
          grads[k] = jax.tree.map(lambda a, gg: a + gg.astype(jnp.float32), grads[k], g)
        return accumulate(dict(c, grads=grads), r, stats, terms), dx

      with jax.named_scope(SCOPE_B):
        return lax.cond(valid, run, lambda c: (c, jnp.zeros_like(c["bwd"])), c)

    def tick(c, t):
      c, y = forward(c, t)
      c, dx = backward(c, t) if self.train else (c, c["bwd"])
      if pp > 1:
        y = lax.ppermute(y, plan.pp, [(i, (i + 1) % pp) for i in range(pp)])
        if self.train:
          dx = lax.ppermute(dx, plan.pp, [(i, (i - 1) % pp) for i in range(pp)])
      return dict(c, fwd=y, bwd=dx), None

    carry, _ = lax.scan(tick, carry, jnp.arange(sched.ticks))
    metrics = self._metrics(carry, n_moe)
    if not self.train:
      return metrics, None
    return metrics, self._reduce(carry["grads"], master_specs)

  # The end of the step.

  def _stat_shapes(self, n_moe: int) -> dict[str, tuple[int, ...]]:
    if not n_moe:
      return {}
    e = self.cfg.n_experts
    return {"aux_loss": (n_moe,), "seq_aux_loss": (n_moe,), "z_loss": (n_moe,),
            "expert_load": (n_moe, e), "drop_fraction": (n_moe,),
            "ep_overflow_fraction": (n_moe,)}

  def _metrics(self, c, n_moe):
    """Means over microbatches of the loss metrics and the per-layer router statistics,
    replicated on every device: loss terms are shares (summed over all devices), router
    statistics live on every stage of a chunk's layers (gathered over pp) and agree across
    the stage (pmean only makes them replicated in type)."""
    plan, m, cfg = self.plan, self.sched.microbatches, self.cfg
    total = lambda x: col.psum(x, self.axes) / m  # noqa: E731
    terms = jax.tree.map(total, c["terms"])
    out = {"ce_loss": terms["ce"], "n_tokens": terms["tokens"],
           "moe_loss": total(c["moe_loss"])}
    out["loss"] = out["ce_loss"] + out["moe_loss"]
    if cfg.max_z_loss_coef:
      out["max_z_loss"] = terms["max_z"]
      out["loss"] = out["loss"] + cfg.max_z_loss_coef * terms["max_z"]
    if n_moe:
      layers = {k: self._layer_order(col.pmean(self._all_stages(x), plan.stage_axes)) / m
                for k, x in c["stats"].items()}
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

    return stages.map_dicts(one, grads, self.e.compute_specs, master_specs)
