"""How much a bounded EP buffer drops: trains a config with expert parallelism at several
`model.ep_buffer_factor`s (and 0, the exact bound) on fake CPU devices and reads the
per-step `ep_overflow_fraction` from each run's metrics.jsonl, early steps (the router before
it is balanced) and late ones apart, with each run's final loss.

    python -m benchmarks.ep_overflow                      # tiny MoE, ep=8, 200 steps
    python -m benchmarks.ep_overflow --config esjax/configs/tiny.py:qwen2 --factors 1.25,2

Prints one JSON line per factor, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def run(config: str, factor: float, steps: int, ep: int, workdir: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={ep}")
  cmd = [sys.executable, "-m", "esjax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.parallel.dp={ep}", f"--config.parallel.ep={ep}",
         f"--config.model.ep_buffer_factor={factor}", f"--config.train.steps={steps}",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         f"--config.checkpoint.every={steps}"]
  subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  overflow = np.array([r.get("ep_overflow_fraction", 0.0) for r in rows])
  by_layer = [r["ep_overflow_by_layer"] for r in rows if "ep_overflow_by_layer" in r]
  early = max(1, len(rows) // 10)
  return {"factor": factor, "steps": len(rows), "overflow_mean": float(overflow.mean()),
          "overflow_first_10pct": float(overflow[:early].mean()),
          "overflow_last_half": float(overflow[len(rows) // 2:].mean()),
          "overflow_max_step": float(overflow.max()),
          "worst_layer_max": float(np.max(by_layer)) if by_layer else 0.0,
          "steps_with_overflow": int((overflow > 0).sum()), "final_loss": rows[-1]["loss"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="esjax/configs/tiny.py:moe")
  ap.add_argument("--factors", default="0,1,1.25,1.5,2")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--ep", type=int, default=8)
  args = ap.parse_args(argv)
  rows = []
  for factor in (float(f) for f in args.factors.split(",")):
    with tempfile.TemporaryDirectory() as workdir:
      rows.append(run(args.config, factor, args.steps, args.ep, workdir))
    print(json.dumps(rows[-1]), flush=True)
  print(json.dumps({"summary": "ep_overflow", "config": args.config, "ep": args.ep,
                    "steps": args.steps,
                    "overflow_mean_by_factor": {r["factor"]: r["overflow_mean"] for r in rows}}))


if __name__ == "__main__":
  main()
