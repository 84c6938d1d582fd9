"""Where XLA:GPU overlaps a gradient reduce-scatter with compute: small programs compiled
deviceless for H100s with the cluster's XLA flags (`esjax/plan/gpu_specs/xla_gpu_flags.txt`),
read from the schedule of their optimized HLO. Four places a data-parallel gradient
reduction could go:

- `between_loops`: after one while loop (the ticks that finish a gradient) and before another
  (the ticks left), with the second loop's gradient reduced after it: a pipeline that reduces
  each round's gradients once its last backward has run, and the last round's at the end;
- `between_loops_alone`: the same without the reduction at the end;
- `in_branch`: inside a conditional branch, beside a loop of that branch (a backward unit
  whose pullback runs while it reduces what an earlier unit finished);
- `in_loop_body`: in each iteration of a loop over layers, the reduce-scatter of that
  iteration's gradient (Megatron's per-bucket overlap inside the last backward).

Prints one JSON line per place: the reduce-scatters found and how many have compute (a
fusion, custom call, while or conditional) scheduled between their start and their done.

    python -m benchmarks.grad_overlap        # needs the CUDA plugin (requirements-plan.txt)
"""

from __future__ import annotations

import json
import re

from esjax import jax_start

jax_start.import_jax()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from esjax.plan import dryrun, targets  # noqa: E402

N, DEVICES, STEPS = 2048, 16, 8
_COMPUTE = ("fusion", "custom-call", "while", "conditional", "dot", "convolution")
_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\((.*)$")


def _layer(h, w):
  return jnp.tanh(h @ w)


def _grad(h):
  return h.T @ h


def _varying(x):
  return lax.pcast(x, ("dp",), to="varying")


def _reduce(g):
  return lax.psum_scatter(g, "dp", tiled=True)


def _ticks(w, h):
  """A loop that finishes a gradient: STEPS layers, their gradients added up."""
  def tick(c, _):
    h, g = c
    h = _layer(h, w)
    return (h, g + _grad(h)), None

  return lax.scan(tick, (h, _varying(jnp.zeros((N, N)))), None, length=STEPS)[0]


def _layers(w, h):
  """A loop of STEPS layers, no gradient."""
  return lax.scan(lambda h, _: (_layer(h, w), None), h, None, length=STEPS)[0]


def between_loops(w, x):
  h, g = _ticks(w, x)
  done = _reduce(g)
  h, g2 = _ticks(w, h)
  return done, _reduce(g2), h


def between_loops_alone(w, x):
  h, g = _ticks(w, x)
  done = _reduce(g)
  return done, done, _layers(w, h)


def in_branch(w, x):
  def unit(g, h):
    return _reduce(g), _layers(w, h)

  def idle(g, h):
    return _varying(jnp.zeros((N // DEVICES, N))), h

  done, h = lax.cond(lax.axis_index("dp") < DEVICES, unit, idle, _grad(_layer(x, w)), x)
  return done, done, h


def in_loop_body(w, x):
  def layer(h, _):
    h = _layer(h, w)
    return h, _reduce(_grad(h))

  h, done = lax.scan(layer, x, None, length=STEPS)
  return done[0], done[-1], h


def overlaps(hlo: str) -> tuple[int, int]:
  """(reduce-scatters, those with compute scheduled between start and done), over every
  computation of a scheduled module (its instruction order is the schedule)."""
  found = overlapped = 0
  for body in re.split(r"\n(?=\S)", hlo):
    open_starts: dict[str, int] = {}
    for line in body.splitlines():
      m = _OP.match(line)
      if not m:
        continue
      name, op, args = m.groups()
      if op == "reduce-scatter-start":
        open_starts[name] = 0
      elif op == "reduce-scatter-done":
        start = re.match(r"%(\S+?)[),]", args)
        if start and start.group(1) in open_starts:
          found += 1
          overlapped += open_starts.pop(start.group(1)) > 0
      elif op in _COMPUTE:
        for k in open_starts:
          open_starts[k] += 1
  return found, overlapped


def main() -> None:
  devices = np.array(dryrun.devices_for(targets.get("h100"), DEVICES))
  mesh = Mesh(devices, ("dp",))
  flags = targets.xla_gpu_flags()
  w = jax.ShapeDtypeStruct((N, N), jnp.float32)
  x = jax.ShapeDtypeStruct((DEVICES * 256, N), jnp.float32)
  for fn in (between_loops, between_loops_alone, in_branch, in_loop_body):
    step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("dp")),
                                 out_specs=(P("dp"), P("dp"), P("dp"))))
    hlo = step.lower(w, x).compile(compiler_options=flags).as_text()
    found, overlapped = overlaps(hlo)
    print(json.dumps({"place": fn.__name__, "reduce_scatters": found,
                      "overlapped_with_compute": overlapped}))


if __name__ == "__main__":
  main()
