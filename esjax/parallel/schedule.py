"""Pipeline schedules as static tables: which forward and backward unit each stage runs at
each tick of the lock-step loop in `esjax.parallel.pipeline`.

The model is cut into `pp * v` chunks; stage s holds chunks s, s + pp, ..., s + (v-1)*pp
(v = virtual stages; chunk q = r * pp + s is round r of stage s). A microbatch goes through
the chunks in order, so from stage pp-1 it wraps round to stage 0 for the next round. At
every tick each stage runs at most one forward unit (F: one chunk of one microbatch) and one
backward unit (B), then sends its F output one stage on and its B input-gradient one stage
back (ring `ppermute`s over pp). Every schedule here consumes what arrives at the next tick,
so nothing waits in a queue; a stage keeps what each F stored (its chunk's residuals, in a
stash slot) until its B runs.

Microbatch i = g*pp + k (group g, k < pp; with v > 1, M must be a multiple of pp):

  F(i, r, s) = g*pp*v + r*pp + k + s
  B(i, r, s) = B0 + g*pp*v + (v-1-r)*pp + k + (pp-1-s)

`1f1b` / `interleaved` start the backward as early as possible, B0 = v*pp - 1 (the last
chunk's B runs in the same tick as its F on the last stage): a stage holds at most 2*v*pp - 1
stashed units, whatever M. `gpipe` runs every forward first (B0 = M*v + pp - 1) and stashes
all M*v. Either way the pipeline takes M*v + pp - 1 ticks of F and as many of B, so
its bubble is (pp-1) / (M*v + pp - 1) of the step; the loop skips idle units (lax.cond), so
warm-up and cool-down ticks cost one unit, not two.

Ticks run in lock step, so a hop costs a whole tick each way: 1F1B here keeps up to 2pp-1
microbatches in flight on stage 0 where asynchronous Megatron keeps pp (memory O(pp) either
way, not O(M) as GPipe).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Static tables, indexed [tick, stage]: for F and B, `valid` (bool), the microbatch, the
  round r (which of the stage's chunks), and the stash slot written (F) or read (B). An idle
  F writes too (the loop writes the stash outside its conditional): to a slot no unit holds
  at that tick, or to a scratch slot where every slot is held (GPipe's cool-down). Equal and
  hashed by what determines the tables, so it can be part of a jit's static arguments."""

  name: str
  pp: int
  virtual: int
  microbatches: int
  f_valid: np.ndarray
  f_micro: np.ndarray
  f_round: np.ndarray
  f_slot: np.ndarray
  b_valid: np.ndarray
  b_micro: np.ndarray
  b_round: np.ndarray
  b_slot: np.ndarray
  stash_size: int  # the most units a stage holds at once
  slots: int  # stash slots to allocate: stash_size, plus a scratch slot if an idle F needs one

  def _key(self):
    return (self.name, self.pp, self.virtual, self.microbatches)

  def __eq__(self, other):
    return isinstance(other, Schedule) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @property
  def ticks(self) -> int:
    return self.f_valid.shape[0]

  @property
  def bubble(self) -> float:
    """Idle fraction of the step: (pp-1) / (M*v + pp - 1)."""
    busy = self.microbatches * self.virtual
    return (self.pp - 1) / (busy + self.pp - 1)

  def forward_only(self) -> "Schedule":
    """The same forward tables with no backward (evaluation)."""
    b = np.zeros_like(self.b_valid)
    return dataclasses.replace(self, name=self.name + "-forward", b_valid=b)


def make_schedule(name: str, pp: int, microbatches: int, virtual: int = 1) -> Schedule:
  """The tables of schedule `name` ('gpipe', '1f1b', 'interleaved') for `pp` stages,
  `microbatches` and `virtual` chunks per stage."""
  if name not in ("gpipe", "1f1b", "interleaved"):
    raise ValueError(f"schedule={name!r}, expected 'gpipe', '1f1b' or 'interleaved'")
  m, v = microbatches, virtual
  if m < 1 or pp < 1 or v < 1:
    raise ValueError(f"schedule: pp={pp}, microbatches={m}, virtual={v} must be >= 1")
  if v > 1 and m % pp:
    raise ValueError(f"schedule: microbatches={m} must be a multiple of pp={pp} with "
                     f"virtual stages ({v})")
  b0 = m * v + pp - 1 if name == "gpipe" else v * pp - 1
  i = np.arange(m)
  g, k = (i // pp, i % pp) if v > 1 else (np.zeros_like(i), i)
  # Times [M, v, pp].
  r = np.arange(v)[None, :, None]
  s = np.arange(pp)[None, None, :]
  base = (g * pp * v + k)[:, None, None]
  if v == 1:
    base = i[:, None, None]
  f = base + r * pp + s
  bt = b0 + base + (v - 1 - r) * pp + (pp - 1 - s)
  ticks = int(bt.max()) + 1
  tables = {key: np.zeros((ticks, pp), dtype) for key, dtype in
            (("f_valid", bool), ("f_micro", np.int32), ("f_round", np.int32),
             ("f_slot", np.int32), ("b_valid", bool), ("b_micro", np.int32),
             ("b_round", np.int32), ("b_slot", np.int32))}
  slots, stash = _stash_slots(f, bt)
  held = np.zeros((ticks, pp, stash), bool)  # [tick, stage, slot]: a unit holds the slot
  for (mi, ri, st), sl in np.ndenumerate(slots):
    held[f[mi, ri, st]:bt[mi, ri, st] + 1, st, sl] = True
  for mi in range(m):
    for ri in range(v):
      for st in range(pp):
        tf, tb = f[mi, ri, st], bt[mi, ri, st]
        for pre, t in (("f", tf), ("b", tb)):
          if tables[f"{pre}_valid"][t, st]:
            raise AssertionError(f"schedule {name}: two {pre} units at tick {t} stage {st}")
          tables[f"{pre}_valid"][t, st] = True
          tables[f"{pre}_micro"][t, st] = mi
          tables[f"{pre}_round"][t, st] = ri
          tables[f"{pre}_slot"][t, st] = slots[mi, ri, st]
  idle, full = ~tables["f_valid"], held.all(-1)
  tables["f_slot"][idle] = np.where(full, stash, held.argmin(-1))[idle]  # the first free slot
  scratch = int((idle & full).any())
  return Schedule(name, pp, v, m, stash_size=stash, slots=stash + scratch, **tables)


def _stash_slots(f: np.ndarray, bt: np.ndarray) -> tuple[np.ndarray, int]:
  """Stash slots [M, v, pp] of the units whose F and B run at ticks f and bt [M, v, pp]:
  per stage an interval colouring (a unit holds its slot from its F tick to its B tick), and
  the most slots any stage needs."""
  m, v, pp = f.shape
  slots = np.zeros((m, v, pp), np.int32)
  stash = 0
  for st in range(pp):
    # Interval colouring per stage: an item lives from its F tick to its B tick.
    items = sorted((int(f[mi, ri, st]), int(bt[mi, ri, st]), mi, ri)
                   for mi in range(m) for ri in range(v))
    free: list[int] = []
    busy: list[tuple[int, int]] = []  # (release tick, slot)
    n_slots = 0
    for start, end, mi, ri in items:
      for rel, sl in list(busy):
        if rel < start:
          busy.remove((rel, sl))
          free.append(sl)
      if free:
        sl = min(free)
        free.remove(sl)
      else:
        sl, n_slots = n_slots, n_slots + 1
      busy.append((end, sl))
      slots[mi, ri, st] = sl
    stash = max(stash, n_slots)
  return slots, stash
