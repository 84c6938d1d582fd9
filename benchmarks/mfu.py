"""Model FLOPs utilisation of the real train step against the matmul peak of this machine.

    python -m benchmarks.mfu                        # tiny dense, tiny MoE 8x top-2, ~100M MoE
    python -m benchmarks.mfu --configs moe100m --repeats 5
    python -m benchmarks.mfu --dtype bfloat16 --configs gpu-mixtral   # on an H100/H200

For each config: model FLOPs per token from the compute ledger (`esjax.train.flops`),
tokens/s of the project's own jitted train step (`esjax.train.step.make_train_step`, AdamW
with clipping as `esjax.train.optimizer` builds it, train state donated), and MFU against the
matmul peak measured in the same run (a large matmul under jit, in the compute dtype). The
peak and the steps are timed in interleaved rounds (the CPU is shared and noisy) and medians
are compared (`mfu`); `mfu_of_fastest` compares the fastest step with the fastest peak
chain, which load can only slow down. Peak bytes of the step come from the compiled
executable's `memory_analysis()`.
`page_faults_per_step` and `system_s_per_step` (this process's, over the timed steps) show
what mapping the step's temporaries costs: XLA:CPU maps them afresh each step, and with 4
KiB pages that is a fault per page touched; run with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(glibc >= 2.35, transparent huge pages in `madvise` mode) to map them in huge pages.
Prints one JSON line per config, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esjax.configs import common
from esjax.models import count_params, moe
from esjax.models.config import ModelConfig
from esjax.models.presets import get_preset
from esjax.parallel.pipeline import Engine
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan
from esjax.train import flops, optimizer, state as state_lib, step as step_lib

# name -> (model config, batch size, sequence length).
CONFIGS: dict[str, tuple[ModelConfig, int, int]] = {
    # esjax/configs/tiny.py:dense and tiny.py:moe (the CPU defaults).
    "tiny-dense": (get_preset("tiny-llama", max_seq_len=128), 16, 128),
    # tiny-dense with d_ff = top_k * d_ff_expert: the same active FLOPs as tiny-moe.
    "tiny-dense-eq": (get_preset("tiny-llama", max_seq_len=128, d_ff=256), 16, 128),
    "tiny-moe": (get_preset("tiny-mixtral", max_seq_len=128, moe_impl="auto"), 16, 128),
    # ~100M-parameter Mixtral-like MoE (8 experts, top-2; ~30M active), byte vocabulary.
    "moe100m": (ModelConfig(
        vocab_size=256, d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=2048,
        max_seq_len=256, n_experts=8, top_k=2, aux_loss_coef=0.01, moe_impl="auto"), 4, 256),
    # What fills one H100/H200: Mixtral-like MoE at sequence 4096 (~3.7B total, ~1.1B
    # active), full remat. Use with --dtype bfloat16 on a GPU.
    "gpu-mixtral": (ModelConfig(
        vocab_size=32000, d_model=2048, n_layers=8, n_heads=16, n_kv_heads=8, d_ff=7168,
        max_seq_len=4096, n_experts=8, top_k=2, aux_loss_coef=0.02, moe_impl="auto",
        remat="full"), 4, 4096),
}
DEFAULT_CONFIGS = "tiny-dense,tiny-dense-eq,tiny-moe,moe100m"


def matmul_peak_fn(n: int, dtype: str):
  """(fn, args, flops): a jitted n x n x n matmul chain (4 matmuls, so dispatch is noise)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype) / np.sqrt(n)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype) / np.sqrt(n)

  @jax.jit
  def fn(a, b):
    for _ in range(4):
      a = a @ b
    return a

  jax.block_until_ready(fn(a, b))
  return fn, (a, b), 4 * 2.0 * n ** 3


def one_device_plan():
  return make_plan(Layout(dp=1), jax.devices()[:1])


def build_step(cfg: ModelConfig, batch_size: int, seq_len: int, seed: int = 0,
               positions: bool = False):
  """The training loop's step on one device, jitted as the loop does (state donated):
  (compiled step, state, batch). The optimizer is the experiment default
  (`common.base_config().optim`). `positions`: the batch carries them (0 .. S-1), as data
  with packed documents would, so the model masks attention by them; without (the loop's
  batches), the model knows they are plain."""
  tx, schedule = optimizer.make_optimizer(common.base_config().optim, total_steps=1000)
  engine = Engine.build(cfg, one_device_plan())
  steps = step_lib.build(engine, tx, schedule)
  state = state_lib.create_train_state(engine, tx, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  if positions:
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                         (batch_size, seq_len)).copy()
  batch = jax.device_put(batch, steps.batch_sharding)
  compiled = steps.train.lower(state, batch).compile()
  return compiled, state, batch


def memory_stats(compiled: Any) -> dict[str, int]:
  """Bytes of a compiled step from XLA's buffer assignment. `peak_bytes`: live arguments +
  outputs not aliased to (donated) arguments + temporaries; `xla_peak_bytes`: what the
  backend reports as its peak (on XLA:CPU it leaves the temporaries out)."""
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  return {"peak_bytes": int(peak), "xla_peak_bytes": int(m.peak_memory_in_bytes),
          "argument_bytes": int(m.argument_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes),
          "alias_bytes": int(m.alias_size_in_bytes)}


def run(names: list[str], repeats: int, dtype: str | None, matmul_n: int,
        moe_impl: str | None = None) -> list[dict]:
  peak_dtype = dtype or "float32"
  peak_fn, peak_args, peak_flops = matmul_peak_fn(matmul_n, peak_dtype)
  runs: dict[str, dict[str, Any]] = {}
  for name in names:
    cfg, batch_size, seq_len = CONFIGS[name]
    if dtype:
      cfg = cfg.replace(dtype=dtype)
    if moe_impl and cfg.is_moe:
      cfg = cfg.replace(moe_impl=moe_impl)
    compiled, state, batch = build_step(cfg, batch_size, seq_len)
    state, metrics = compiled(state, batch)  # warm up (first-run allocations)
    jax.block_until_ready(metrics["loss"])
    runs[name] = dict(cfg=cfg, batch_size=batch_size, seq_len=seq_len, compiled=compiled,
                      state=state, batch=batch, times=[], faults=0, system_s=0.0,
                      mem=memory_stats(compiled))

  peak_times = []
  for _ in range(repeats):  # interleaved rounds: load changes hit the peak and steps alike
    t0 = time.perf_counter()
    jax.block_until_ready(peak_fn(*peak_args))
    peak_times.append(time.perf_counter() - t0)
    for r in runs.values():
      u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      r["state"], metrics = r["compiled"](r["state"], r["batch"])
      jax.block_until_ready(metrics["loss"])
      r["times"].append(time.perf_counter() - t0)
      u1 = resource.getrusage(resource.RUSAGE_SELF)
      r["faults"] += u1.ru_minflt + u1.ru_majflt - u0.ru_minflt - u0.ru_majflt
      r["system_s"] += u1.ru_stime - u0.ru_stime
  peak = peak_flops / float(np.median(peak_times))
  best_peak = peak_flops / min(peak_times)

  out = []
  for name, r in runs.items():
    cfg, seq_len = r["cfg"], r["seq_len"]
    tokens = r["batch_size"] * seq_len
    step_s = float(np.median(r["times"]))
    fpt = flops.flops_per_token(cfg, seq_len)
    tps = tokens / step_s
    params = count_params(cfg)
    out.append({
        "config": name, "backend": jax.default_backend(), "dtype": cfg.dtype,
        "moe_impl": moe.moe_impl(cfg, one_device_plan()) if cfg.is_moe else None,
        "n_experts": cfg.n_experts, "top_k": cfg.top_k if cfg.is_moe else None,
        "batch_size": r["batch_size"], "seq_len": seq_len, "remat": cfg.remat,
        "total_params": params["total"], "active_params": params["active"],
        "flops_per_token": fpt, "step_ms": round(1e3 * step_s, 2),
        "min_step_ms": round(1e3 * min(r["times"]), 2), "tokens_per_s": round(tps, 1),
        "model_gflops_per_s": round(fpt * tps / 1e9, 3),
        "peak_gflops_per_s": round(peak / 1e9, 3), "mfu": round(fpt * tps / peak, 4),
        "mfu_of_fastest": round(fpt * tokens / min(r["times"]) / best_peak, 4),
        "page_faults_per_step": round(r["faults"] / repeats),
        "system_s_per_step": round(r["system_s"] / repeats, 3), **r["mem"],
    })
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                  help=f"comma-separated, of {sorted(CONFIGS)}")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--dtype", default=None, help="compute dtype override (bfloat16 on GPU)")
  ap.add_argument("--moe-impl", default=None,
                  help="moe_impl override of the MoE configs (e.g. ragged, against auto)")
  ap.add_argument("--matmul_n", type=int, default=0,
                  help="peak matmul size (0: 2048 on CPU, 8192 elsewhere)")
  args = ap.parse_args(argv)
  names = args.configs.split(",")
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    raise SystemExit(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
  matmul_n = args.matmul_n or (2048 if jax.default_backend() == "cpu" else 8192)
  rows = run(names, args.repeats, args.dtype, matmul_n, args.moe_impl)
  for row in rows:
    print(json.dumps(row))
  summary = {"summary": "mfu", "backend": jax.default_backend(),
             "device": jax.devices()[0].device_kind, "repeats": args.repeats,
             "matmul_n": matmul_n, "peak_gflops_per_s": rows[0]["peak_gflops_per_s"]}
  by_name = {r["config"]: r for r in rows}
  if "tiny-moe" in by_name and "tiny-dense-eq" in by_name:  # same active FLOPs
    summary["tiny_moe_step_over_dense_eq"] = round(
        by_name["tiny-moe"]["step_ms"] / by_name["tiny-dense-eq"]["step_ms"], 3)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
