"""Forward + backward of one layer's attention per kernel and sequence length: time and bytes.

    python -m benchmarks.attention --impl xla,chunked --seq 1024,2048
    python -m benchmarks.attention --impl cudnn,xla --seq 4096,8192 --dtype bfloat16  # GPU
    python -m benchmarks.attention --impl xla,chunked --seq 2048 --step tiny-moe

Times the jitted gradient of sum(attend(q, k, v) * w) in q, k, v (`esjax.kernels.attention.
ops.attend`, plain positions 0..S-1) for each (impl, seq), in interleaved rounds (the CPU is
shared and noisy), and reads the compiled temporaries from `memory_analysis()`. The default
shape is the gpu-mixtral layer: batch 1, 16 heads, 8 KV heads, head_dim 128. Prints one JSON
line per point; with two impls, a summary with each seq's median ratio to the first impl.
`--step CONFIG`: instead, the whole train step of a `benchmarks.mfu` config (batch --batch)
with `attention_impl` set to each impl; its batches carry their positions unless the impl
says +plain (the training loop's batches carry none: the model then knows they are plain).

    python -m benchmarks.attention --impl xla,xla+plain --seq 256 --batch 4 --heads 8 \
        --kv-heads 8 --head-dim 64 --repeats 15          # the ~100M MoE's layer
    python -m benchmarks.attention --impl xla,xla+plain --seq 256 --batch 4 --step moe100m
`layer_memory` (the Attention module's forward + backward, compile only) serves
`benchmarks.memory --attn-seqs`.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import mfu
from esjax.kernels.attention import ops
from esjax.models.attention import Attention
from esjax.models.config import ModelConfig


def kernel_step(impl: str, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int,
                dtype: str, sliding_window: int = 0, plain_positions: bool | None = None):
  """(compiled grad of sum(attend * w) in q, k, v; its arguments)."""
  keys = jax.random.split(jax.random.key(seq), 4)
  q, w = (jax.random.normal(kk, (batch, seq, heads, head_dim), dtype) for kk in keys[:2])
  k, v = (jax.random.normal(kk, (batch, seq, kv_heads, head_dim), dtype) for kk in keys[2:])
  pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  attend = functools.partial(ops.attend, impl=impl, sliding_window=sliding_window,
                             plain_positions=plain_positions)

  def loss(q, k, v, w, pos):
    return jnp.sum(attend(q, k, v, pos, pos).astype(jnp.float32) * w.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, (0, 1, 2)))
  args = (q, k, v, w, pos)
  return grad.lower(*args).compile(), args


def layer_config(heads: int = 16, kv_heads: int = 8, head_dim: int = 128, d_model: int = 2048,
                 **kw) -> ModelConfig:
  return ModelConfig(d_model=d_model, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                     **kw)


def layer_memory(cfg: ModelConfig, batch: int, seq: int) -> dict[str, int]:
  """`mfu.memory_stats` of the Attention module's forward + backward (gradients of the
  parameters and of x [batch, seq, d_model]), compiled on the default backend, not run."""
  model = nnx.eval_shape(lambda: Attention(cfg, nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  x = jax.ShapeDtypeStruct((batch, seq, cfg.d_model), cfg.dtype)
  pos = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def loss(params, x, pos):
    return jnp.sum(nnx.merge(graphdef, params)(x, pos).astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(params, x, pos).compile()
  return mfu.memory_stats(compiled)


def split_impl(entry: str) -> tuple[str, bool]:
  """"xla+plain" -> ("xla", True): the kernel told that the positions are plain."""
  impl, _, tag = entry.partition("+")
  if impl not in ops.IMPLS or tag not in ("", "plain"):
    raise SystemExit(f"--impl: unknown {entry!r}; known: {ops.IMPLS}, each optionally +plain")
  return impl, tag == "plain"


def run(impls: list[str], seqs: list[int], repeats: int, **shape) -> list[dict]:
  points = {}
  for entry in impls:
    impl, plain = split_impl(entry)
    kw = {**shape, "plain_positions": True if plain else shape.get("plain_positions")}
    for seq in seqs:
      compiled, args = kernel_step(impl, seq=seq, **kw)
      jax.block_until_ready(compiled(*args))  # warm up
      points[entry, seq] = dict(compiled=compiled, args=args, times=[], kw=kw, impl=impl,
                                mem=mfu.memory_stats(compiled))
  for _ in range(repeats):  # interleaved rounds
    for p in points.values():
      t0 = time.perf_counter()
      jax.block_until_ready(p["compiled"](*p["args"]))
      p["times"].append(time.perf_counter() - t0)
  return [{"impl": entry, "resolved": ops.resolve(p["impl"], *p["args"][:3]), "seq": seq,
           "backend": jax.default_backend(), **p["kw"],
           "fwd_bwd_ms": round(1e3 * float(np.median(p["times"])), 3),
           "min_ms": round(1e3 * min(p["times"]), 3),
           "temp_bytes": p["mem"]["temp_bytes"]} for (entry, seq), p in points.items()]


def run_steps(name: str, impls: list[str], seqs: list[int], repeats: int, batch: int
              ) -> list[dict]:
  """Median train-step time of `mfu.CONFIGS[name]` per (impl, seq), interleaved."""
  points = {}
  for impl in impls:
    for seq in seqs:
      kernel, plain = split_impl(impl)
      cfg = mfu.CONFIGS[name][0]
      cfg = cfg.replace(attention_impl=kernel, max_seq_len=max(cfg.max_seq_len, seq))
      compiled, state, data = mfu.build_step(cfg, batch, seq, positions=not plain)
      state, metrics = compiled(state, data)  # warm up
      jax.block_until_ready(metrics["loss"])
      points[impl, seq] = dict(compiled=compiled, state=state, data=data, times=[],
                               mem=mfu.memory_stats(compiled))
  for _ in range(repeats):
    for p in points.values():
      t0 = time.perf_counter()
      p["state"], metrics = p["compiled"](p["state"], p["data"])
      jax.block_until_ready(metrics["loss"])
      p["times"].append(time.perf_counter() - t0)
  return [{"step": name, "impl": impl, "seq": seq, "batch": batch,
           "backend": jax.default_backend(),
           "step_ms": round(1e3 * float(np.median(p["times"])), 3),
           "min_ms": round(1e3 * min(p["times"]), 3),
           "temp_bytes": p["mem"]["temp_bytes"]} for (impl, seq), p in points.items()]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--impl", default="xla,chunked",
                  help=f"comma-separated, of {ops.IMPLS}; +plain (e.g. xla+plain): the kernel "
                       "is told the positions are plain (xla: the causal block split)")
  ap.add_argument("--seq", default="1024,2048")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--sliding-window", type=int, default=0)
  ap.add_argument("--plain-positions", action="store_true",
                  help="tell every kernel the positions are plain (cuDNN: no runtime check)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--step", default="", help=f"time the train step of one of {sorted(mfu.CONFIGS)}")
  args = ap.parse_args(argv)
  impls = args.impl.split(",")
  for entry in impls:
    split_impl(entry)
  if args.step and args.step not in mfu.CONFIGS:
    raise SystemExit(f"--step={args.step!r}; known: {sorted(mfu.CONFIGS)}")
  seqs = [int(s) for s in args.seq.split(",")]
  if args.step:
    rows = run_steps(args.step, impls, seqs, args.repeats, args.batch)
  else:
    rows = run(impls, seqs, args.repeats, batch=args.batch, heads=args.heads,
               kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
               sliding_window=args.sliding_window,
               plain_positions=True if args.plain_positions else None)
  for row in rows:
    print(json.dumps(row), flush=True)
  if len(impls) == 2:
    ms = {(r["impl"], r["seq"]): r.get("step_ms", r.get("fwd_bwd_ms")) for r in rows}
    first, second = impls
    print(json.dumps({"summary": f"{second}_over_{first}", "device": jax.devices()[0].device_kind,
                      **{str(s): round(ms[second, s] / ms[first, s], 3)
                         for s in sorted({r["seq"] for r in rows})}}))


if __name__ == "__main__":
  main()
