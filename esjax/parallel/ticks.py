"""The step's loops on one device (inside the engine's shard_map), over a typed carry.

- `run_plain` (one stage): a loop over the microbatches of `jax.vjp` of the whole model
  (`Units.whole`): no schedule, no conditionals, no stash.
- `run_schedule` (pp > 1): the lock-step ticks of a `schedule.Schedule`. Per stage and
  tick at most one forward unit and one backward unit (of one chunk of one microbatch), then
  forward outputs move one stage on and input-gradients one stage back (ring `ppermute`s
  over pp). A forward unit of a middle chunk runs `jax.vjp` and stores the pullback's
  residuals in the stash slot the schedule gives it; its backward unit runs that pullback
  (nothing is recomputed beyond the model's remat policy). The last chunk's forward unit
  only keeps its input: its backward unit runs forward (with the head and loss) and
  backward together, in the same tick under 1F1B. The first chunk's embedding runs outside
  the stored units (a gather: its backward is a scatter-add of the unit's input-gradient).
  Idle units are skipped with `lax.cond`, named for the planner (`branch_weights`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from esjax.parallel import residuals as res_lib
from esjax.parallel.schedule import Schedule
from esjax.parallel.stages import STAGES, map_dicts
from esjax.parallel.units import Units
from esjax.sharding import collectives as col

# Named scopes of the loop's conditionals (see `pipeline.Engine.branch_weights`).
SCOPE_F, SCOPE_B, SCOPE_FIRST, SCOPE_LAST, SCOPE_SKIP = (
    "esjax_unit_f", "esjax_unit_b", "esjax_first", "esjax_last", "esjax_skip_last")
_TABLES = ("valid", "micro", "round", "slot")


def _cond(scope: str, pred, true_fn, false_fn, *operands):
  with jax.named_scope(scope):
    return lax.cond(pred, true_fn, false_fn, *operands)


class Carry(NamedTuple):
  """What the loop carries from one tick (or microbatch) to the next."""

  stats: dict[str, jax.Array]  # router statistics [v, n_moe, ...], summed over microbatches
  terms: dict[str, jax.Array]  # loss terms (this device's shares), summed over microbatches
  moe_loss: jax.Array  # this device's share of the router losses, summed
  grads: Any = None  # float32 gradients like the parameters (None: forward only)
  fwd: Any = None  # the activation this tick's forward unit reads (from stage s-1)
  bwd: Any = None  # the gradient this tick's backward unit reads (from stage s+1)
  inputs: Any = None  # [slots, mb, S_l, D]: last chunks' inputs, from F to B
  stash: Any = None  # per stored residual [slots, ...]: middle chunks' pullbacks


class Unit(NamedTuple):
  """The unit a stage runs at a tick: from the schedule's tables."""

  valid: jax.Array
  r: jax.Array  # round: which of the stage's chunks
  slot: jax.Array  # stash slot
  first: jax.Array  # chunk 0 (embedding before it)
  last: jax.Array  # the last chunk (head and loss after it)
  data: dict[str, jax.Array]  # the microbatch


def start(u: Units, params: Any, stat_shapes: dict, train: bool, **loop_state) -> Carry:
  """The carry before the first tick or microbatch, typed varying over every axis."""
  zeros = lambda shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
  c = Carry(stats={k: zeros(s) for k, s in stat_shapes.items()},
            terms={k: zeros(()) for k in u.zero_terms()}, moe_loss=zeros(()),
            grads=jax.tree.map(lambda a: zeros(a.shape), params) if train else None,
            **loop_state)
  # The stash keeps the varying axes of the residuals it holds.
  return col.vary(c._replace(stash=None), u.axes)._replace(stash=c.stash)


def accumulate(c: Carry, r, stats, terms, moe) -> Carry:
  """Adds a unit's statistics (flat [n_moe, ...]) at round r, its loss terms and router loss."""
  c = c._replace(moe_loss=c.moe_loss + moe)
  if terms is not None:
    c = c._replace(terms=jax.tree.map(jnp.add, c.terms, terms))
  if stats:
    flat = {k: x.reshape(-1, *x.shape[2:]) for k, x in stats.items()}
    c = c._replace(stats={k: lax.dynamic_update_index_in_dim(
        c.stats[k], lax.dynamic_index_in_dim(c.stats[k], r, 0, keepdims=False) + flat[k],
        r, 0) for k in flat})
  return c


def add_grads(c: Carry, r, d_sp: Any, d_ends: dict[str, Any]) -> Carry:
  """Adds a unit's parameter gradients: `d_sp` to round r of the stage's stacks."""
  f32 = lambda g: g.astype(jnp.float32)  # noqa: E731
  grads = dict(c.grads)
  if d_sp is not None:
    grads[STAGES] = map_dicts(
        lambda a, g: lax.dynamic_update_index_in_dim(
            a, (lax.dynamic_index_in_dim(a[0], r, 0, keepdims=False) + f32(g))[None], r, 1),
        grads[STAGES], d_sp)
  for k, g in d_ends.items():
    grads[k] = jax.tree.map(lambda a, gg: a + f32(gg), grads[k], g)
  return c._replace(grads=grads)


def _split(params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  return params[STAGES], {k: x for k, x in params.items() if k != STAGES}


def run_plain(u: Units, m: int, params, micro, buffers, stat_shapes, train: bool) -> Carry:
  """One stage: a loop over the m microbatches of the whole model's vjp (a plain call for
  m = 1)."""
  sp_all, ends = _split(params)
  bufs = buffers.get(STAGES, {})

  def one(c, i):
    d = {k: lax.dynamic_index_in_dim(x, i, 0, keepdims=False) for k, x in micro.items()}
    if not train:
      _, (stats, terms) = u.whole(sp_all, ends, bufs, d)
    else:
      obj, pull, (stats, terms) = jax.vjp(lambda sp, e: u.whole(sp, e, bufs, d), sp_all,
                                          ends, has_aux=True)
      d_sp, d_ends = pull(col.match_vma(jnp.full((), 1.0 / m, obj.dtype), obj))
      c = c._replace(grads=jax.tree.map(lambda a, g: a + g.astype(jnp.float32), c.grads,
                                        {STAGES: d_sp, **d_ends}))
    moe = u.moe_loss(stats)
    c = c._replace(terms=jax.tree.map(jnp.add, c.terms, terms), moe_loss=c.moe_loss + moe,
                   stats=jax.tree.map(jnp.add, c.stats, stats))
    return c, None

  c = start(u, params, stat_shapes, train)
  if m == 1:
    return one(c, 0)[0]
  return lax.scan(one, c, jnp.arange(m))[0]


def run_schedule(u: Units, sched: Schedule, params, micro, buffers, stat_shapes,
                 train: bool) -> Carry:
  """pp > 1: the schedule's ticks (see the module docstring)."""
  return _Ticks(u, sched, params, micro, buffers, train).run(stat_shapes)


class _Ticks:
  """One device's side of a schedule's ticks: the units its stage runs."""

  def __init__(self, u: Units, sched: Schedule, params, micro, buffers, train: bool):
    self.u, self.sched, self.micro, self.train = u, sched, micro, train
    self.stage = col.axis_index(u.plan.pp)
    self.sp_all, self.ends = _split(params)
    self.bufs = buffers.get(STAGES, {})
    self.tables = {f"{p}_{k}": jnp.asarray(getattr(sched, f"{p}_{k}"))
                   for p in "fb" for k in _TABLES}
    mb, s_c = micro["inputs"].shape[1:]
    self.act = col.vary(jnp.zeros((mb, s_c // u.plan.size(u.plan.tp), u.cfg.d_model),
                                  jnp.dtype(u.cfg.dtype)), u.axes)
    self.head_keys = ("final_norm", "embed" if u.cfg.tie_embeddings else "lm_head")
    self.ct = jnp.full((), 1.0 / sched.microbatches, jnp.float32)  # d loss / d unit objective
    if train:  # the pullback structure of a middle chunk, from the first tick's unit
      n0 = self.unit("f", 0)
      self.residuals = res_lib.Residuals.of(self._middle(n0), self._middle_params(n0),
                                            self.act)

  def run(self, stat_shapes) -> Carry:
    loop = dict(fwd=self.act, bwd=self.act)
    slots = self.sched.slots
    if self.train:
      loop.update(inputs=jnp.zeros((slots,) + self.act.shape, self.act.dtype),
                  stash=self.residuals.empty(slots, self.u.plan.pp))
    c = start(self.u, {STAGES: self.sp_all, **self.ends}, stat_shapes, self.train, **loop)
    return lax.scan(self.tick, c, jnp.arange(self.sched.ticks))[0]

  def tick(self, c: Carry, t):
    pp = self.sched.pp
    c, y = self.forward(c, t) if self.train else self.forward_eval(c, t)
    c, dx = self.backward(c, t) if self.train else (c, c.bwd)
    y = lax.ppermute(y, self.u.plan.pp, [(i, (i + 1) % pp) for i in range(pp)])
    if self.train:
      dx = lax.ppermute(dx, self.u.plan.pp, [(i, (i - 1) % pp) for i in range(pp)])
    return c._replace(fwd=y, bwd=dx), None

  # What a unit is and reads.

  def unit(self, pre: str, t) -> Unit:
    get = lambda k: self.tables[f"{pre}_{k}"][t][self.stage]  # noqa: E731
    i, r = get("micro"), get("round")
    data = {k: lax.dynamic_index_in_dim(x, i, 0, keepdims=False) for k, x in self.micro.items()}
    pp, v = self.sched.pp, self.sched.virtual
    return Unit(get("valid"), r, get("slot"), (r == 0) & (self.stage == 0),
                (r == v - 1) & (self.stage == pp - 1), data)

  def _embed_or(self, x, n: Unit):
    u = self.u
    return _cond(SCOPE_FIRST, n.first,
                 lambda: u.embed(u.gather_ends({"embed": self.ends["embed"]}),
                                 n.data["inputs"]),
                 lambda: x)

  def _middle(self, n: Unit):
    return lambda sp, x: self.u.middle(sp, x, self.u.round_of(self.bufs, n.r), n.data)

  def _middle_params(self, n: Unit):
    return self.u.gather_round(self.u.round_of(self.sp_all, n.r))

  def _idle(self, c: Carry):
    return c, jnp.zeros_like(self.act)

  # Forward units.

  def forward_eval(self, c: Carry, t):
    """Evaluation: every chunk forward, the head on the last."""
    u, n = self.u, self.unit("f", t)

    def run(c):
      x = self._embed_or(c.fwd, n)
      y, stats = u.chunk(self._middle_params(n), u.round_of(self.bufs, n.r), x, n.data)
      head = lambda: u.head(  # noqa: E731  (the fsdp gathers only on the last chunk)
          u.gather_ends({k: self.ends[k] for k in self.head_keys}), y, n.data)
      terms = _cond(SCOPE_LAST, n.last, head, u.zero_terms)
      return accumulate(c, n.r, stats, terms, u.moe_loss(stats)), col.vary(y, u.axes)

    return _cond(SCOPE_F, n.valid, run, self._idle, c)

  def forward(self, c: Carry, t):
    """Training: a middle chunk's vjp, its residuals stored; the last chunk's input kept.
    The conditional returns what to store and the stash is written after it, outside: a
    loop-carried buffer updated inside a conditional may be copied whole. Every unit writes
    both buffers at its slot (zeros for what it does not keep); an idle unit's slot is one
    that no unit holds (`Schedule.f_slot`)."""
    u, n, res = self.u, self.unit("f", t), self.residuals
    no_stats = lambda: res_lib.zeros_like_types((res.aux, res.out[1]))  # noqa: E731

    def keep_input(x):
      return jnp.zeros_like(x), x, res.zeros(), *no_stats()

    def store(x):
      (y, moe), stats, found = res_lib.vjp(self._middle(n), self._middle_params(n), x)
      return col.vary(y, u.axes), jnp.zeros_like(x), res.leaves(found), stats, moe

    def run(x):
      return _cond(SCOPE_SKIP, n.last, keep_input, store, self._embed_or(x, n))

    def idle(x):
      return jnp.zeros_like(x), jnp.zeros_like(x), res.zeros(), *no_stats()

    y, kept, leaves, stats, moe = _cond(SCOPE_F, n.valid, run, idle, c.fwd)
    c = c._replace(inputs=lax.dynamic_update_index_in_dim(c.inputs, kept, n.slot, 0),
                   stash=res.put(c.stash, n.slot, leaves))
    return accumulate(c, n.r, stats, None, moe), y

  # Backward units.

  def backward(self, c: Carry, t):
    n = self.unit("b", t)

    def run(c):
      c, dx = _cond(SCOPE_LAST, n.last, functools.partial(self._last_chunk, n=n),
                    functools.partial(self._middle_chunk, n=n), c)
      return _cond(SCOPE_FIRST, n.first, functools.partial(self._embedding, n=n),
                   lambda c, dx: c, c, dx), dx

    return _cond(SCOPE_B, n.valid, run, self._idle, c)

  def _last_chunk(self, c: Carry, n: Unit):
    """Forward (chunk, head, loss) and backward together, from the kept input."""
    u = self.u
    x = lax.dynamic_index_in_dim(c.inputs, n.slot, 0, keepdims=False)
    gather = lambda sp, e: (u.gather_round(sp), u.gather_ends(e))  # noqa: E731
    p, gather_pull = jax.vjp(gather, u.round_of(self.sp_all, n.r),
                             {k: self.ends[k] for k in self.head_keys})
    obj, pull, (stats, terms) = jax.vjp(
        lambda p, x: u.last(p, x, u.round_of(self.bufs, n.r), n.data), p, x, has_aux=True)
    dp, dx = pull(col.match_vma(self.ct.astype(obj.dtype), obj))
    c = add_grads(c, n.r, *gather_pull(dp))
    return accumulate(c, n.r, stats, terms, u.moe_loss(stats)), dx

  def _middle_chunk(self, c: Carry, n: Unit):
    """The stored pullback of the unit's forward."""
    sp, gather_pull = jax.vjp(self.u.gather_round, self.u.round_of(self.sp_all, n.r))
    pull = self.residuals.pullback(c.stash, n.slot, sp)
    d_sp, dx = pull(self.residuals.cotangent((c.bwd, self.ct)))
    return add_grads(c, n.r, gather_pull(d_sp)[0], {}), dx

  def _embedding(self, c: Carry, dx, n: Unit):
    """The first chunk's embedding gradient: a scatter-add of its input-gradient."""
    u = self.u
    _, pull = jax.vjp(lambda e: u.embed(u.gather_ends({"embed": e}), n.data["inputs"]),
                      self.ends["embed"])
    return add_grads(c, n.r, None, {"embed": pull(dx)[0]})
