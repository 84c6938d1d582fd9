"""One device's pieces of the step, inside the engine's shard_map: the model's own embedding,
blocks and head applied to this device's shards, and the units a schedule runs.

A unit is one chunk of layers for one microbatch. Its objective is this device's share of
the microbatch loss (`collectives.share`): the chunk's MoE router losses, plus on the last
chunk the cross-entropy and the max-z loss. Units take gathered parameters (fsdp gathers
happen outside them, so a stored pullback never holds a gathered weight: the backward unit
gathers again and autodiff of the gather reduce-scatters the gradient).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from esjax.models import loss as loss_lib
from esjax.models.transformer import (embed_lookup, head_logits, run_block, stacked_moe_stats,
                                      vocab_of)
from esjax.parallel import stages
from esjax.sharding import collectives as col

# A chunk of at most this many repeats runs unrolled (no loop in its HLO). The tiny MoE of
# benchmarks.vs_maxtext (one CPU device, interleaved A/B): 2 layers +6.7% tokens/s unrolled,
# 4 layers -6.6% (and -5.8% with unroll=2), so only the shallowest chunks are unrolled.
UNROLL_REPEATS = 2

STATS = ("aux_loss", "seq_aux_loss", "z_loss", "expert_load", "drop_fraction",
         "ep_overflow_fraction")


class Units:
  """The model pieces of `engine` on one device (`engine`: a `pipeline.Engine`)."""

  def __init__(self, engine, gathers: dict[str, Any]):
    self.cfg, self.plan, self.fmt = engine.cfg, engine.plan, engine.fmt
    self.slot_defs, self.gathers = engine.slot_defs, gathers
    self.axes = self.plan.all_axes
    self.data = self.plan.dp + self.plan.cp  # the axes that split a microbatch's tokens

  # Parameters: round r of this stage's stacks, and fsdp gathers.

  @staticmethod
  def round_of(stage_tree: Any, r) -> Any:
    """Round r of this stage's layer stacks: {slot: tree [R, ...]}."""
    return stages.map_dicts(lambda x: lax.dynamic_index_in_dim(x[0], r, 0, keepdims=False),
                            stage_tree)

  def _gather(self, tree, gathers):
    def one(x, gs):
      for dim, axes in gs:
        x = col.all_gather(x, axes, dim)
      return x
    return stages.map_dicts(one, tree, gathers)

  def gather_round(self, sp: Any) -> Any:
    g = stages.map_dicts(lambda gs: tuple((d - 2, a) for d, a in gs),
                         self.gathers[stages.STAGES])
    return self._gather(sp, g)

  def gather_ends(self, ends: dict[str, Any]) -> dict[str, Any]:
    return {k: self._gather(v, self.gathers[k]) for k, v in ends.items()}

  # The model's pieces.

  def embed(self, ends: dict[str, Any], tokens: jax.Array) -> jax.Array:
    x = embed_lookup(ends["embed"], tokens, self.plan.tp, self.cfg.dtype)
    return col.vary(x, self.axes)

  def chunk(self, sp: Any, bp: Any, x: jax.Array, d: dict[str, jax.Array]):
    """The chunk's layers on x [mb, S_l, D] (a scan over its R repeats of the slot pattern):
    (y, stats {name: [R, MoE slots, ...]}). `bp`: the chunk's buffers (no gradient)."""
    cfg, defs, mask = self.cfg, self.slot_defs, d.get("mask")

    def rep(h, trees):
      out = []
      for gd, (tree, buf) in zip(defs, trees):
        h, s = run_block(nnx.merge(gd, tree, buf), h, d.get("positions"), cfg.remat, mask)
        if s is not None:
          out.append(s)
      return h, ({k: jnp.stack([s[k] for s in out]) for k in STATS} if out else {})

    trees = tuple((sp[p], lax.stop_gradient(bp.get(p, {}))) for p in range(self.fmt.period))
    # A scan even over one repeat (XLA removes a one-trip loop): autodiff of a scan passes
    # the weights to the backward as they came in, so a stored pullback refers to the
    # unit's parameters instead of holding a sliced copy of them per stash slot.
    repeats = jax.tree.leaves(trees)[0].shape[0]
    return lax.scan(rep, x, trees, unroll=repeats <= UNROLL_REPEATS)

  def head(self, ends: dict[str, Any], y: jax.Array, d: dict[str, jax.Array]):
    """Loss terms of one microbatch on its last chunk (ce, tokens, max_z: means over the
    microbatch's tokens), as this device's share."""
    cfg = self.cfg
    w = ends["embed"].T if cfg.tie_embeddings else ends["lm_head"]
    logits = head_logits(y, ends["final_norm"]["scale"], w, cfg.norm_eps, self.plan.tp,
                         vocab_of(cfg))
    sums = loss_lib.token_sums(cfg, logits, d["targets"], d.get("mask"), self.plan.tp)
    return col.share(loss_lib.means(sums, self.data), self.axes, self.plan.size)

  def zero_terms(self) -> dict[str, jax.Array]:
    keys = ("ce", "tokens", "max_z") if self.cfg.max_z_loss_coef else ("ce", "tokens")
    return col.vary({k: jnp.zeros((), jnp.float32) for k in keys}, self.axes)

  def moe_loss(self, stats) -> jax.Array:
    """This device's share of the weighted router losses of a chunk's MoE layers."""
    if not stats:
      return col.vary(jnp.zeros((), jnp.float32), self.axes)
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in stats.items()}
    return col.share(stacked_moe_stats(self.cfg, flat)["moe_loss"], self.axes,
                     self.plan.size)

  def objective(self, terms, stats) -> jax.Array:
    """A unit's share of the microbatch loss: its router losses, and with `terms` (the last
    chunk) CE + the weighted max-z loss."""
    return loss_lib.total(self.cfg, terms, self.moe_loss(stats))

  # Unit functions (differentiated by the schedules).

  def middle(self, sp, x, bp, d):
    """A chunk that is not the last: ((y, its router losses), stats)."""
    y, stats = self.chunk(sp, bp, x, d)
    return (y, self.moe_loss(stats)), stats

  def last(self, params, x, bp, d):
    """The last chunk with the head: (objective, (stats, terms)); params = (sp, ends)."""
    sp, ends = params
    y, stats = self.chunk(sp, bp, x, d)
    terms = self.head(ends, y, d)
    return self.objective(terms, stats), (stats, terms)

  def whole(self, stage_params, ends, stage_buffers, d):
    """One device's whole model (pp = 1: the stage's v chunks in order) on a microbatch:
    (objective, (stats [v, ...], terms)). Takes the stored (ungathered) parameters."""
    ends = self.gather_ends(ends)
    x = self.embed(ends, d["inputs"])
    per_round = []
    for r in range(self.fmt.virtual):
      sp = self.gather_round(self.round_of(stage_params, r))
      x, stats = self.chunk(sp, self.round_of(stage_buffers, r), x, d)
      per_round.append(stats)
    terms = self.head(ends, x, d)
    stats = {k: jnp.stack([s[k] for s in per_round]).reshape(
        len(per_round), -1, *per_round[0][k].shape[2:]) for k in per_round[0]}
    return self.objective(terms, stats), (stats, terms)  # stats [v, n_moe, ...]
