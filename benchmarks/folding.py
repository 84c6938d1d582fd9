"""MoE Parallel Folding: collective bytes and step time of folded vs unfolded layouts.

    python -m benchmarks.folding                  # tiny MoE (tiny.py), 8 fake CPU devices
    python -m benchmarks.folding --layouts tp4-etp4,tp4-ep8 --steps 10

For each layout the project's own train step (`esjax.train.step.for_config`, the training
loop's step) is compiled once; its collectives are summed per (op, mesh axes) by
the comm report (bytes per device per step, ring model), and the same executable is run
`--steps` times on real arrays for the median step time. Pairs share the attention layout
and differ only in the MoE mapping: unfolded (what Megatron allowed before folding: etp = tp,
ep within dp) against folded (etp = 1, ep spanning tp x dp or dp x cp). On fake CPU devices
the time is the sum of 8 devices' work on the host's cores: the bytes are the figure that
carries to a GPU cluster. One JSON line per layout, then a summary of each pair.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# name -> (parallel overrides, the unfolded layout it is folded from or None).
LAYOUTS: dict[str, tuple[dict, str | None]] = {
    "dp8": (dict(dp=8), None),  # references: experts replicated / EP over DP
    "dp8-ep8": (dict(dp=8, ep=8), None),
    "tp4-etp4-ep2": (dict(dp=2, tp=4, etp=4, ep=2), None),
    "tp4-etp1-ep8": (dict(dp=2, tp=4, etp=1, ep=8), "tp4-etp4-ep2"),
    "tp2-etp2-ep4": (dict(dp=4, tp=2, etp=2, ep=4), None),
    "tp2-etp1-ep8": (dict(dp=4, tp=2, etp=1, ep=8), "tp2-etp2-ep4"),
    "cp2-ep4": (dict(dp=4, cp=2, ep=4), None),
    "cp2-ep8": (dict(dp=4, cp=2, ep=8), "cp2-ep4"),
}


def _use_fake_devices(n: int) -> None:
  """Before jax starts: n CPU devices (replacing a device count already in XLA_FLAGS)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def measure(name: str, config_arg: str, steps: int) -> dict:
  # After _use_fake_devices: jax must start with the fake devices.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from esjax.configs import tiny  # pylint: disable=g-import-not-at-top
  from esjax.plan import report  # pylint: disable=g-import-not-at-top
  from esjax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top

  config = tiny.get_config(config_arg)
  for key, value in LAYOUTS[name][0].items():
    config.parallel[key] = value
  run = step_lib.for_config(config)
  steps_, tc = run.steps, config.train
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, run.model_cfg.vocab_size, (tc.batch_size, tc.seq_len + 1))
  batch = jax.device_put({"inputs": tokens[:, :-1].astype(np.int32),
                          "targets": tokens[:, 1:].astype(np.int32)}, steps_.batch_sharding)
  state = state_lib.create_train_state(steps_.engine, run.tx, jax.random.key(0))
  compiled = steps_.train.lower(state, batch).compile()
  mesh = run.plan.mesh
  rows = report.collectives(compiled.as_text(), tuple(mesh.devices.shape), mesh.axis_names,
                            steps_.engine.branch_weights())
  times = []
  for _ in range(steps + 1):  # the first call warms up
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  step_ms = float(np.median(times[1:])) * 1e3
  by_op: dict[str, float] = {}
  for c in rows:
    by_op[c.op] = by_op.get(c.op, 0.0) + c.bytes / 2**20
  return {
      "layout": name, "folded_from": LAYOUTS[name][1], "mesh": str(run.plan.layout),
      "collective_mib_per_step": round(sum(c.bytes for c in rows) / 2**20, 4),
      "by_op_mib": {k: round(v, 4) for k, v in sorted(by_op.items())},
      "by_axes_mib": {f"{c.op}@{','.join(c.axes)}": round(c.bytes / 2**20, 4) for c in rows},
      "step_ms": round(step_ms, 2),
      "tokens_per_s": round(tc.batch_size * tc.seq_len / (step_ms / 1e3), 1),
      "loss": float(metrics["loss"]),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layouts", default=",".join(LAYOUTS))
  p.add_argument("--config", default="moe", help="tiny.py variant (moe, qwen2)")
  p.add_argument("--steps", type=int, default=5, help="timed steps per layout")
  p.add_argument("--devices", type=int, default=8)
  a = p.parse_args(argv)
  if "jax" not in sys.modules:
    _use_fake_devices(a.devices)
  names = a.layouts.split(",")
  unknown = [n for n in names if n not in LAYOUTS]
  if unknown:
    p.error(f"unknown layouts {unknown}; known: {list(LAYOUTS)}")
  rows = {}
  for name in names:
    rows[name] = measure(name, a.config, a.steps)
    print(json.dumps(rows[name]), flush=True)
  for name, row in rows.items():
    base = rows.get(row["folded_from"] or "")
    if base is not None:
      print(json.dumps({
          "summary": f"{name} vs {base['layout']}",
          "bytes_folded_over_unfolded": round(row["collective_mib_per_step"]
                                              / base["collective_mib_per_step"], 3),
          "time_folded_over_unfolded": round(row["step_ms"] / base["step_ms"], 3),
          "same_loss": abs(row["loss"] - base["loss"]) <= 1e-4 * abs(base["loss"]),
      }), flush=True)


if __name__ == "__main__":
  main()
