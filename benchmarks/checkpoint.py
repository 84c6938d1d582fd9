"""Checkpoint save and restore across layouts: time and host memory, on fake CPU devices.

    python -m benchmarks.checkpoint                      # ~1.2 GB train state, 8 devices
    python -m benchmarks.checkpoint --stacked             # the multi-process stacked format
    python -m benchmarks.checkpoint --d-model 256 --layers 2 --vocab 1024 --rounds 1

Saves the same train state (a dense model, ~1.2 GB with Adam's moments) twice: laid out as
`--save` (default pp2 x tp2 x dp2) and as `--restore` (default dp4 x tp2 with ZeRO-1: no
pipeline, the layers stacked otherwise, the moments split otherwise). Then restores both
into the `--restore` layout, each restore in a fresh process, alternating: the first is a
layout change, the second the unchanged restore it is compared with. Per restore: seconds
(the `Checkpointer.restore` call until the state is on its devices) and the process's peak
resident memory above its resident memory just before the restore, minus the restored
state's bytes: on fake CPU devices the state itself lives in host memory, so what is left
is the restore's own overhead (orbax's read buffers, the relayout's per-layer arrays). The
largest single parameter's bytes are printed beside it, and the floor: the same measure for
building the state from host arrays block by block as the reader does, with no checkpoint
(JAX's own allocation). One JSON line per measurement and a summary line with the changed/unchanged
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

LAYOUTS = {  # name -> Layout kwargs
    "pp2-tp2-dp2": dict(pp=2, tp=2, dp=2, microbatches=2),
    "dp4-tp2-zero1": dict(dp=4, tp=2, distributed_optimizer=True),
    "dp8-fsdp": dict(dp=8, fsdp=True),
    "pp4-dp2": dict(pp=4, dp=2, microbatches=4),
}


def _setup(args, layout: str):
  """(config, engine, optimizer, abstract state) for `layout` (imports jax: a child only)."""
  import optax
  from esjax.models.presets import get_preset
  from esjax.parallel.pipeline import Engine
  from esjax.sharding.layout import Layout
  from esjax.sharding.plan import make_plan
  from esjax.train import state as state_lib
  cfg = get_preset("tiny-llama", vocab_size=args.vocab, d_model=args.d_model,
                   n_layers=args.layers, n_heads=8, n_kv_heads=8, d_ff=4 * args.d_model,
                   max_seq_len=128)
  engine = Engine.build(cfg, make_plan(Layout(**LAYOUTS[layout])))
  tx = optax.adamw(1e-3)
  return cfg, engine, tx, state_lib.abstract_train_state(engine, tx)


def _device_bytes(tree) -> int:
  """Bytes the arrays of `tree` take on this process's devices (each replica counted)."""
  import jax
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards)


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_save(args, layout: str) -> dict:
  import jax
  from esjax.train import checkpoint, relayout, state as state_lib
  cfg, engine, tx, _ = _setup(args, layout)
  state = state_lib.create_train_state(engine, tx, jax.random.key(0))
  state = state.replace(step=jax.numpy.asarray(1, jax.numpy.int32))
  jax.block_until_ready(state)
  ckpt = checkpoint.Checkpointer(os.path.join(args.dir, layout), keep=1, async_save=False)
  if args.stacked:  # the format a multi-process run with a stage per process writes
    relayout.has_process_local_layers = lambda params: True
  t0 = time.perf_counter()
  ckpt.save(state, {"position": 1}, cfg, engine.fmt)
  ckpt.close()
  return {"save_s": time.perf_counter() - t0, "layout": layout,
          "state_bytes": _device_bytes(state)}


def child_restore(args, saved_by: str) -> dict:
  import jax
  from esjax.train import checkpoint
  _, engine, _, target = _setup(args, args.restore)
  ckpt = checkpoint.Checkpointer(os.path.join(args.dir, saved_by), keep=1, async_save=False,
                                 read_only=True)
  before = _rss()
  t0 = time.perf_counter()
  state, _ = ckpt.restore(1, target, engine.fmt)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  ckpt.close()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  state_bytes = _device_bytes(state)
  largest = max(x.nbytes for x in jax.tree.leaves(state.params))
  return {"restore_s": seconds, "saved_by": saved_by, "restored_as": args.restore,
          "state_bytes": state_bytes,
          "overhead_bytes": max(0, peak - before - state_bytes),
          "largest_param_bytes": largest}


def child_floor(args) -> dict:
  """The same measure for building the target state from host arrays block by block as the
  reader does (`shard_reader.build`), with no checkpoint: the floor of JAX's own allocation
  (a restore's overhead above it is the checkpoint's)."""
  import jax
  import numpy as np
  from esjax.train import shard_reader
  _, _, _, target = _setup(args, args.restore)

  def ones(t):
    return lambda idx: np.ones([len(range(*s.indices(d))) for s, d in zip(idx, t.shape)])

  before = _rss()
  state = jax.tree.map(lambda t: shard_reader.build(t, ones(t)), target)
  jax.block_until_ready(state)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"floor": args.restore, "overhead_bytes": max(0, peak - before - _device_bytes(state))}


def _child(args, what: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  cmd = [sys.executable, "-m", "benchmarks.checkpoint", "--child", what, "--dir", args.dir,
         "--save", args.save, "--restore", args.restore, "--d-model", str(args.d_model),
         "--layers", str(args.layers), "--vocab", str(args.vocab)] + (
             ["--stacked"] if args.stacked else [])
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"benchmarks.checkpoint {what} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--save", default="pp2-tp2-dp2", choices=sorted(LAYOUTS))
  ap.add_argument("--restore", default="dp4-tp2-zero1", choices=sorted(LAYOUTS))
  ap.add_argument("--d-model", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=16384)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--stacked", action="store_true",
                  help="save stacked by stage (as a multi-process run with a stage per process "
                       "does): the unchanged restore is then orbax's own")
  ap.add_argument("--dir", default="")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    what, layout = args.child.split(":", 1)
    result = (child_floor(args) if what == "floor" else
              child_save(args, layout) if what == "save" else child_restore(args, layout))
    print(json.dumps(result))
    return
  with tempfile.TemporaryDirectory(prefix="esjax_ckpt_bench_") as tmp:
    args.dir = args.dir or tmp
    for layout in (args.save, args.restore):
      print(json.dumps(_child(args, f"save:{layout}")), flush=True)
    runs = {args.save: [], args.restore: []}
    floors = []
    for _ in range(args.rounds):
      floors.append(_child(args, "floor:-"))
      print(json.dumps(floors[-1]), flush=True)
      for layout in (args.save, args.restore):
        r = _child(args, f"restore:{layout}")
        runs[layout].append(r)
        print(json.dumps(r), flush=True)
  moved, same = runs[args.save], runs[args.restore]
  best = lambda rs, k: min(r[k] for r in rs)  # noqa: E731
  print(json.dumps({
      "summary": f"{args.save} -> {args.restore} vs {args.restore} -> {args.restore}",
      "format": "stacked" if args.stacked else "layers",
      "unchanged_restore_s": best(same, "restore_s"),
      "changed_restore_s": best(moved, "restore_s"),
      "time_ratio": best(moved, "restore_s") / best(same, "restore_s"),
      "unchanged_overhead_bytes": best(same, "overhead_bytes"),
      "changed_overhead_bytes": best(moved, "overhead_bytes"),
      "floor_overhead_bytes": min(f["overhead_bytes"] for f in floors),
      "largest_param_bytes": moved[0]["largest_param_bytes"],
      "state_bytes": moved[0]["state_bytes"]}), flush=True)


if __name__ == "__main__":
  main()
