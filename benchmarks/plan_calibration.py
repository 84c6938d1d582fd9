"""The planner's roofline against a measured step: plans the single-GPU config that
`benchmarks.mfu` times (deviceless, for the GPU `nvidia-smi` names) and prints measured /
predicted step time, so the first GPU lent calibrates the prediction.

    python -m benchmarks.mfu --dtype bfloat16 --configs gpu-mixtral > mfu.jsonl   # on the GPU
    python -m benchmarks.plan_calibration --measured mfu.jsonl [--target h100]

`benchmarks/gpu_check.sh` runs both. Prints one JSON line: the plan's compiled FLOPs, its
predicted step and MFU, the measured step and MFU, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess


def gpu_target() -> str:
  """'h200' when nvidia-smi names an H200, else 'h100'."""
  try:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return "h100"
  return "h200" if "H200" in name else "h100"


def config_for(name: str):
  """The experiment config of `benchmarks.mfu`'s config `name` in bfloat16 on one device."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from benchmarks import mfu  # pylint: disable=g-import-not-at-top
  from esjax.configs import common  # pylint: disable=g-import-not-at-top
  cfg, batch, seq = mfu.CONFIGS[name]
  c = common.base_config()
  c.model = common.model_section(**{f.name: getattr(cfg, f.name)
                                    for f in dataclasses.fields(cfg)})
  c.model.dtype = "bfloat16"
  c.train.batch_size, c.train.seq_len = batch, seq
  return c


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--measured", required=True, help="benchmarks.mfu's JSON lines")
  ap.add_argument("--config", default="gpu-mixtral")
  ap.add_argument("--target", default="", help="h100 or h200 (default: by nvidia-smi)")
  args = ap.parse_args(argv)
  with open(args.measured, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.startswith("{")]
  measured = next((r for r in rows if r.get("config") == args.config), None)
  if measured is None:
    raise SystemExit(f"--measured={args.measured}: no row for config {args.config!r}")
  os.environ["JAX_PLATFORMS"] = "cpu"  # the deviceless compiler, beside the CPU platform
  from esjax.plan import dryrun, targets  # pylint: disable=g-import-not-at-top
  target = targets.get(args.target or gpu_target())
  plan = dryrun.plan(config_for(args.config), target, 1).to_json()
  step = measured["step_ms"] / 1e3
  print(json.dumps({
      "benchmark": "plan_calibration", "config": args.config, "target": target.name,
      "compiled_flops_per_step": plan["compiled_flops_per_step"],
      "model_flops_per_step": plan["model_flops_per_step"], "waste": plan["waste"],
      "predicted_step_s": plan["predicted_step_s"], "measured_step_s": step,
      "measured_over_predicted": step / plan["predicted_step_s"],
      "predicted_mfu": plan["predicted_mfu"], "measured_mfu": measured["mfu"],
      "measured_peak_gflops_per_s": measured["peak_gflops_per_s"],
      "predicted_peak_bytes": plan["peak_bytes_per_device"],
      "measured_peak_bytes": measured["peak_bytes"], "notes": plan["notes"]}))


if __name__ == "__main__":
  main()
