"""Pipeline schedule tables: every unit once, dependencies respected, stash never clobbered,
bubble and stash sizes as the formulas say (checked by replaying the tables)."""

import numpy as np
import pytest

from esjax.parallel.schedule import make_schedule

CASES = [("gpipe", 1, 4, 1), ("1f1b", 1, 3, 1), ("1f1b", 2, 4, 1), ("1f1b", 4, 8, 1),
         ("1f1b", 4, 3, 1), ("gpipe", 4, 8, 1), ("gpipe", 2, 4, 2), ("interleaved", 2, 4, 2),
         ("interleaved", 4, 8, 3), ("interleaved", 2, 2, 4)]


def replay(s):
  """Simulates the lock-step loop: returns per (micro, chunk) the F and B ticks, checking
  data flow through the ring buffers and the stash as the engine runs them."""
  pp, v, m = s.pp, s.virtual, s.microbatches
  fwd_in = [None] * pp  # what arrived for F at each stage
  bwd_in = [None] * pp
  stash = [dict() for _ in range(pp)]
  seen_f, seen_b = {}, {}
  for t in range(s.ticks):
    out_f, out_b = [None] * pp, [None] * pp
    for st in range(pp):
      if s.f_valid[t, st]:
        i, r = int(s.f_micro[t, st]), int(s.f_round[t, st])
        q = r * pp + st  # chunk index
        if q > 0:
          assert fwd_in[st] == (i, q - 1), (t, st, fwd_in[st], (i, q - 1))
        stash[st][int(s.f_slot[t, st])] = (i, q)
        out_f[st] = (i, q)
        seen_f[(i, q)] = t
      if s.b_valid[t, st]:
        i, r = int(s.b_micro[t, st]), int(s.b_round[t, st])
        q = r * pp + st
        assert stash[st][int(s.b_slot[t, st])] == (i, q), (t, st)
        if q < pp * v - 1:
          assert bwd_in[st] == (i, q + 1), (t, st, bwd_in[st], (i, q + 1))
        out_b[st] = (i, q)
        seen_b[(i, q)] = t
    fwd_in = [out_f[(st - 1) % pp] for st in range(pp)]
    bwd_in = [out_b[(st + 1) % pp] for st in range(pp)]
  return seen_f, seen_b


@pytest.mark.parametrize("name,pp,m,v", CASES)
def test_schedule_replays(name, pp, m, v):
  s = make_schedule(name, pp, m, v)
  seen_f, seen_b = replay(s)
  chunks = pp * v
  want = {(i, q) for i in range(m) for q in range(chunks)}
  assert set(seen_f) == want and set(seen_b) == want
  assert all(seen_f[u] <= seen_b[u] for u in want)
  # Busy F ticks per stage: M*v, over M*v + pp - 1 ticks of forward work.
  assert s.f_valid.sum() == m * chunks and s.b_valid.sum() == m * chunks
  assert s.bubble == pytest.approx((pp - 1) / (m * v + pp - 1))
  if name == "gpipe":
    assert s.stash_size == m * v
  else:
    assert s.stash_size <= 2 * v * pp - 1
    last = max(seen_f.values())
    assert last == m * v + pp - 2  # forward work ends when GPipe's would


def test_1f1b_stash_is_independent_of_microbatches():
  sizes = {m: make_schedule("1f1b", 4, m).stash_size for m in (4, 16, 64)}
  assert sizes == {4: 4, 16: 7, 64: 7}  # min(M, 2pp - 1): O(pp), not O(M)


def test_bad_schedules():
  with pytest.raises(ValueError, match="multiple of pp=4"):
    make_schedule("interleaved", 4, 6, 2)
  with pytest.raises(ValueError, match="schedule='zb'"):
    make_schedule("zb", 2, 2)


@pytest.mark.parametrize("name,pp,m,v", CASES)
def test_idle_forward_ticks_write_a_slot_no_unit_holds(name, pp, m, v):
  """The loop writes the stash at every tick, idle ones too (zeros): at a slot no unit
  holds then, so only a schedule with a stage whose slots are all held at an idle tick
  needs a scratch slot beyond its most in flight."""
  s = make_schedule(name, pp, m, v)
  held = np.zeros((s.ticks, pp, s.slots), bool)
  for t in range(s.ticks):
    for st in range(pp):
      if s.f_valid[t, st]:
        b = next(tb for tb in range(t, s.ticks) if s.b_valid[tb, st]
                 and (s.b_micro[tb, st], s.b_round[tb, st]) == (s.f_micro[t, st],
                                                                s.f_round[t, st]))
        held[t:b + 1, st, s.f_slot[t, st]] = True
  idle = ~s.f_valid
  assert not held[idle.nonzero() + (s.f_slot[idle],)].any()
  full = held[..., :s.stash_size].all(-1)
  assert s.slots == s.stash_size + int((idle & full).any())
  assert s.f_slot.max() < s.slots


def test_1f1b_with_more_microbatches_than_its_stash_needs_no_scratch_slot():
  """Once M > 2pp - 1 a stage has a free slot at every idle tick (warm-up: none held yet;
  cool-down: one is freed per tick): the GPU presets' 1F1B allocates 7 slots at pp4, not 8."""
  assert [(s.stash_size, s.slots) for s in (make_schedule("1f1b", 4, m) for m in (8, 128))
          ] == [(7, 7), (7, 7)]
  gpipe = make_schedule("gpipe", 4, 8)
  assert (gpipe.stash_size, gpipe.slots) == (8, 9)  # full during its cool-down
