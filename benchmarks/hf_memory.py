"""Host memory of Hugging Face import, export and upcycling starts (anonymous vs file-backed).

    python -m benchmarks.hf_memory                       # every stage, a 1 GB bf16 Llama
    python -m benchmarks.hf_memory --stages=plan8b       # the 8B plan only (no data read)
    python -m benchmarks.hf_memory --gb=0.05 --stages=import,export   # a quick look

Stages, each in a fresh process so its peak is its own (JSON line each, then a summary):
  import   `interop.read_params` of the folder onto one device;
  export   `interop.save_pretrained_params` of those parameters (the peak after the read);
  upcycle  `checkpoint.init_from=<folder>` into 8 experts top-2 on 8 fake CPU devices (the
           loop's path: layout, shardings, `init_from.load`), with `host_plan`'s prediction
           for the read of the source;
  plan8b   `host_plan` of an 8B Llama-3.1 folder (headers only: sparse files, no data) read
           for the same upcycling start on 8 devices.

The model is random bf16 weights written as an HF folder under --dir (deleted afterwards
unless --keep). Memory is RssAnon / RssFile from /proc/self/status, sampled every
millisecond by a thread and after every shard read and tensor written; `peak_anon_bytes`
is the largest anonymous RSS of the process, `over_baseline` the part above the process
before the stage (python, jax, esjax). The target (issue 18): peak anonymous memory <=
1.3 x the largest safetensors file + 0.2 GiB. On the CPU backend the devices' buffers are
host memory too, so the import's peak holds the model itself; on an accelerator the host
keeps only the transient part (`host_plan`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from esjax import interop
from esjax.configs import common
from esjax.interop import hf_config, hf_params, load, safetensors_io
from esjax.models import presets
from esjax.models.config import ModelConfig, count_params
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan
from esjax.train import init_from

GIB = 2**30
STAGES = ("import", "export", "upcycle", "plan8b")


class Peak:
  """Largest RssAnon / RssFile seen, sampled by a thread and by explicit `sample()` calls."""

  def __init__(self, interval: float = 1e-3):
    self.anon = self.file = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

  @staticmethod
  def now() -> tuple[int, int]:
    fields = {}
    with open("/proc/self/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
          fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"]

  def sample(self):
    anon, file = self.now()
    self.anon, self.file = max(self.anon, anon), max(self.file, file)

  def _run(self, interval):
    while not self._stop.is_set():
      self.sample()
      time.sleep(interval)

  def __enter__(self) -> "Peak":
    self.sample()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.sample()


def model_config(gb: float):
  """A Llama (vocab 32000, d_model 2048, GQA 16/8, d_ff 5632) with ~gb GB of bf16 weights."""
  cfg = ModelConfig(vocab_size=32000, d_model=2048, n_layers=1, n_heads=16, n_kv_heads=8,
                    d_ff=5632, rope_theta=500_000.0, max_seq_len=4096, dtype="bfloat16",
                    param_dtype="bfloat16")
  per_layer = count_params(cfg.replace(n_layers=2))["total"] - count_params(cfg)["total"]
  base = count_params(cfg)["total"] - per_layer
  return cfg.replace(n_layers=max(1, round((gb * 1e9 / 2 - base) / per_layer)))


def write_model(folder: Path, cfg, max_shard_bytes: int, data: bool = True):
  """An HF folder of `cfg` with random N(0, 0.02) bf16 weights (norms 1), streamed; with
  data=False only headers (sparse files that read as zeros)."""
  folder.mkdir(parents=True, exist_ok=True)
  specs = hf_params.tensor_specs(cfg)

  def arrays():
    rng = np.random.default_rng(0)
    for name, shape, _ in specs:
      if name.endswith("norm.weight"):
        yield np.ones(shape, ml_dtypes.bfloat16)
      else:
        yield (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

  safetensors_io.write_safetensors(specs, arrays() if data else None, folder, max_shard_bytes)
  (folder / "config.json").write_text(json.dumps(hf_config.config_to_hf(cfg)))


def _largest_file(folder: Path) -> int:
  return max(p.stat().st_size for p in folder.glob("*.safetensors"))


def _watch_reads(peak: Peak):
  """Samples after every shard read and every exported tensor (besides the thread)."""
  read_slice, iter_tensors = hf_params.read_slice, hf_params.iter_hf_tensors

  def read_and_sample(*args, **kw):
    out = read_slice(*args, **kw)
    peak.sample()
    return out

  def iter_and_sample(*args, **kw):
    for item in iter_tensors(*args, **kw):
      peak.sample()
      yield item
      peak.sample()

  hf_params.read_slice, hf_params.iter_hf_tensors = read_and_sample, iter_and_sample


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _row(stage, peak, base_anon, folder, **extra):
  row = {"stage": stage, "peak_anon_bytes": peak.anon, "peak_file_bytes": peak.file,
         "baseline_anon_bytes": base_anon, "over_baseline_anon_bytes": peak.anon - base_anon}
  if stage in ("import", "export"):  # the target is theirs
    largest = _largest_file(folder)
    target = 1.3 * largest + 0.2 * GIB
    row.update(largest_file_bytes=largest, target_bytes=int(target),
               meets_target=peak.anon <= target)
  return {**row, **extra}


def run_import(folder: Path) -> dict:
  jax.devices()
  base_anon, _ = Peak.now()
  with Peak() as peak:
    _watch_reads(peak)
    t0 = time.perf_counter()
    _, params = interop.read_params(folder)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
  return _row("import", peak, base_anon, folder, params_bytes=_nbytes(params),
              seconds=round(seconds, 1))


def run_export(folder: Path) -> dict:
  cfg, params = interop.read_params(folder)
  jax.block_until_ready(params)
  base_anon, _ = Peak.now()
  out = folder.parent / "export"
  with Peak() as peak:
    _watch_reads(peak)
    t0 = time.perf_counter()
    interop.save_pretrained_params(cfg, params, out)
    seconds = time.perf_counter() - t0
  src, dst = safetensors_io.SafetensorsFolder(folder), safetensors_io.SafetensorsFolder(out)
  same = sorted(src) == sorted(dst) and all(np.array_equal(src[n], dst[n]) for n in src)
  shutil.rmtree(out)
  return _row("export", peak, base_anon, folder, params_bytes=_nbytes(params),
              seconds=round(seconds, 1), same_tensors=bool(same))


def _upcycle_setup(cfg, folder: Path):
  """(config, MoE model config) of the upcycling start: 8 experts top-2, dp=8, ep=8, fsdp."""
  config = common.base_config()
  config.checkpoint.init_from = str(folder)
  config.parallel.update(dp=8, ep=8, etp=1, fsdp=True)
  return config, cfg.replace(n_experts=8, top_k=2)


def _run_plan(config):
  return make_plan(Layout.from_config(config.parallel))


def _plan(config, moe_cfg, folder: Path) -> dict:
  """host_plan of the read that init_from.load does for this run (its source placement)."""
  del moe_cfg
  plan = _run_plan(config)
  return interop.host_plan(folder, lambda src: init_from.source_shardings(src, plan))


def run_upcycle(folder: Path) -> dict:
  config, moe_cfg = _upcycle_setup(load.read_config(folder), folder)
  plan = _plan(config, moe_cfg, folder)
  run_plan = _run_plan(config)
  read = {}
  read_params = load.read_params

  def read_and_record(*args, **kw):  # the peak of the read alone, and what it holds
    out = read_params(*args, **kw)
    jax.block_until_ready(out[1])
    peak.sample()
    read.update(peak_anon=peak.anon, source_bytes=_nbytes(out[1]))
    return out

  init_from.hf_load.read_params = read_and_record
  base_anon, _ = Peak.now()
  with Peak() as peak:
    _watch_reads(peak)
    t0 = time.perf_counter()
    params = init_from.load(config, moe_cfg, run_plan)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
  # What the read held besides the source itself (on CPU the devices' buffers are host memory).
  read_transient = read["peak_anon"] - base_anon - read["source_bytes"]
  return _row("upcycle", peak, base_anon, folder, devices=jax.device_count(),
              seconds=round(seconds, 1), moe_params_bytes=_nbytes(params),
              source_bytes=read["source_bytes"], read_peak_anon_bytes=read["peak_anon"],
              read_transient_anon_bytes=read_transient,
              plan_peak_anon_bytes=plan["peak_anon_bytes"],
              plan_peak_host_bytes=plan["peak_host_bytes"],
              read_transient_over_plan=round(read_transient / plan["peak_anon_bytes"], 3))


def run_plan8b(folder: Path) -> dict:
  """host_plan of Llama-3.1-8B (bf16, 5 GB files) into the upcycling start on 8 devices."""
  cfg = presets.get_preset(
      "llama3-8b", dtype="bfloat16", param_dtype="bfloat16", max_seq_len=131072,
      rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_len=8192)
  write_model(folder, cfg, 5 * 10**9, data=False)
  config, moe_cfg = _upcycle_setup(cfg, folder)
  plan = _plan(config, moe_cfg, folder)
  return {"stage": "plan8b", "devices": jax.device_count(), **plan,
          "fits_24_gib_host": plan["peak_host_bytes"] < 24 * GIB}


def _child(stage: str, folder: Path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if stage in ("upcycle", "plan8b"):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
  out = subprocess.run([sys.executable, "-m", "benchmarks.hf_memory", f"--stage={stage}",
                        f"--dir={folder}"], env=env, capture_output=True, text=True,
                       check=False)
  if out.returncode:
    raise SystemExit(f"stage {stage} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--gb", type=float, default=1.0, help="size of the bf16 model")
  ap.add_argument("--dir", default="/tmp/esjax_hf_memory")
  ap.add_argument("--stages", default=",".join(STAGES))
  ap.add_argument("--keep", action="store_true", help="keep the generated model")
  ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage, print JSON
  args = ap.parse_args(argv)
  root = Path(args.dir)
  if args.stage:
    run = {"import": run_import, "export": run_export, "upcycle": run_upcycle,
           "plan8b": run_plan8b}[args.stage]
    print(json.dumps(run(root / ("llama8b" if args.stage == "plan8b" else "model"))))
    return
  stages = args.stages.split(",")
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise SystemExit(f"--stages: unknown {unknown}; expected some of {list(STAGES)}")
  try:
    if set(stages) - {"plan8b"}:
      write_model(root / "model", model_config(args.gb), 5 * 10**9)
    rows = [_child(stage, root) for stage in stages]
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  for row in rows:
    print(json.dumps(row))
  print(json.dumps({"summary": True, "all_meet_target": all(
      r.get("meets_target", True) for r in rows), "stages": [r["stage"] for r in rows]}))


if __name__ == "__main__":
  main()
