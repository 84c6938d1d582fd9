"""esjax against MaxText: the same tiny dropless Mixtral trained by each, tokens/s compared.

Run through `benchmarks/vs_maxtext.sh` (which installs MaxText); directly:

    python -m benchmarks.vs_maxtext --maxtext_python /tmp/maxtext_venv/bin/python

Both trainers run their own training loop on synthetic / default data, one CPU device,
float32, with the same shapes (layers, d_model, heads, kv heads, head_dim, experts, top-k,
MLP width, sequence, batch, vocab), dropless routing (MaxText: `sparse_matmul=true
megablox=false capacity_factor=-1`, i.e. `ragged_dot`; esjax: `capacity_factor=0` with
`moe_impl=auto`, the blocked grouped matmul on CPU) and a 0.01 load-balancing loss. MaxText
uses its fastest remat policy (`minimal_with_context`, it has no "none"); esjax `remat=none`.
Steady state: MaxText's per-step `Tokens/s/device` from step `--skip` on; esjax's
`tokens_per_s` records in metrics.jsonl after the first (which the loop already measures
from the end of step 1, i.e. after compilation). The two trainers alternate for `--rounds`
rounds (the CPU is shared); the ratio is of the medians over all rounds. Prints one JSON line
per run and, per config (`--layers 2,4` by default: the README's two), a summary line with
`ratio` = esjax tokens/s / MaxText tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

_MAXTEXT_STEP = re.compile(r"completed step: (\d+), seconds: ([\d.]+), .*Tokens/s/device: ([\d.]+)")


def maxtext_cmd(a: argparse.Namespace, out_dir: str) -> list[str]:
  return [
      a.maxtext_python, "-m", "maxtext.trainers.pre_train.train",
      "run_name=esjax_vs_maxtext", f"base_output_directory={out_dir}",
      "hardware=cpu", "skip_jax_distributed_system=true",
      "model_name=mixtral-8x7b", "override_model_config=true",
      f"base_emb_dim={a.d_model}", f"base_num_query_heads={a.heads}",
      f"base_num_kv_heads={a.kv_heads}", f"head_dim={a.head_dim}",
      f"base_mlp_dim={a.mlp}", f"base_moe_mlp_dim={a.mlp}",
      f"base_num_decoder_layers={a.layers}", f"vocab_size={a.vocab}",
      f"num_experts={a.experts}", f"num_experts_per_tok={a.top_k}",
      "sparse_matmul=true", "megablox=false", "capacity_factor=-1",
      f"per_device_batch_size={a.batch}", f"max_target_length={a.seq}",
      "dataset_type=synthetic", f"steps={a.steps}", "enable_checkpointing=false",
      "attention=dot_product", "dtype=float32", "weight_dtype=float32",
      "remat_policy=minimal_with_context", "enable_goodput_recording=false",
      "monitor_goodput=false", "load_balance_loss_weight=0.01",
  ]


def esjax_cmd(a: argparse.Namespace, workdir: str) -> list[str]:
  model = dict(preset="tiny-mixtral", d_model=a.d_model, n_heads=a.heads,
               n_kv_heads=a.kv_heads, head_dim=a.head_dim, d_ff=a.mlp, n_layers=a.layers,
               vocab_size=a.vocab, n_experts=a.experts, top_k=a.top_k, max_seq_len=a.seq,
               capacity_factor=0.0, aux_loss_coef=0.01, z_loss_coef=0.0, moe_impl="auto",
               remat="none", dtype="float32")
  if a.block:  # else esjax's default moe_block_size
    model["moe_block_size"] = a.block
  return [
      sys.executable, "-m", "esjax.main", f"--config=esjax/configs/tiny.py:moe,steps={a.steps}",
      f"--workdir={workdir}", *[f"--config.model.{k}={v}" for k, v in model.items()],
      f"--config.train.batch_size={a.batch}", f"--config.train.seq_len={a.seq}",
      f"--config.train.log_every={a.log_every}", "--config.train.eval_every=0",
      "--config.checkpoint.every=0", "--config.checkpoint.async_save=false",
  ]


def run_maxtext(a: argparse.Namespace) -> dict:
  with tempfile.TemporaryDirectory() as out_dir:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    p = subprocess.run(maxtext_cmd(a, out_dir), env=env, capture_output=True, text=True,
                       check=False)
  log = p.stdout + p.stderr
  steps = [(int(s), float(sec), float(tps)) for s, sec, tps in _MAXTEXT_STEP.findall(log)]
  if p.returncode or not steps:
    raise SystemExit(f"MaxText failed (rc={p.returncode}); log tail:\n{log[-3000:]}")
  steady = [tps for s, _, tps in steps if s >= a.skip]
  return {"trainer": "maxtext", "tokens_per_s": float(np.median(steady)),
          "steps_timed": len(steady), "wall_s": round(time.perf_counter() - t0, 1)}


def run_esjax(a: argparse.Namespace) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    p = subprocess.run(esjax_cmd(a, workdir), capture_output=True, text=True, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(workdir, "metrics.jsonl")
    records = []
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
  if p.returncode or not records:
    raise SystemExit(f"esjax failed (rc={p.returncode}); log tail:\n{(p.stdout + p.stderr)[-3000:]}")
  steady = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
  if not steady:
    raise SystemExit(f"esjax: too few steps for a steady-state rate ({len(records)} records)")
  return {"trainer": "esjax", "tokens_per_s": float(np.median(steady)),
          "records_timed": len(steady), "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--maxtext_python", required=True, help="python of the MaxText venv")
  ap.add_argument("--layers", default="2,4",
                  help="decoder depths, comma-separated: one comparison each")
  for name, default in (("d_model", 256), ("heads", 4), ("kv_heads", 2),
                        ("head_dim", 64), ("mlp", 512), ("experts", 8), ("top_k", 2),
                        ("seq", 256), ("batch", 8), ("vocab", 256), ("steps", 30),
                        ("skip", 3), ("log_every", 5), ("block", 0), ("rounds", 2)):
    ap.add_argument(f"--{name}", type=int, default=default)
  a = ap.parse_args(argv)
  for layers in (int(n) for n in a.layers.split(",")):
    compare(argparse.Namespace(**{**vars(a), "layers": layers}))


def compare(a: argparse.Namespace) -> None:
  """Interleaved rounds of both trainers on one config; a summary line with the ratio."""
  runs = {"esjax": [], "maxtext": []}
  for _ in range(a.rounds):  # alternate: load changes hit both trainers alike
    for name, fn in (("maxtext", run_maxtext), ("esjax", run_esjax)):
      r = fn(a)
      runs[name].append(r["tokens_per_s"])
      print(json.dumps({**r, "layers": a.layers}), flush=True)
  med = {k: float(np.median(v)) for k, v in runs.items()}
  shapes = {k: getattr(a, k) for k in ("layers", "d_model", "heads", "kv_heads", "head_dim",
                                         "mlp", "experts", "top_k", "seq", "batch", "vocab")}
  print(json.dumps({"summary": "vs_maxtext", **shapes, "dtype": "float32", "dropless": True,
                    "rounds": a.rounds, "esjax_tokens_per_s": round(med["esjax"], 1),
                    "maxtext_tokens_per_s": round(med["maxtext"], 1),
                    "ratio": round(med["esjax"] / med["maxtext"], 3)}), flush=True)


if __name__ == "__main__":
  main()
