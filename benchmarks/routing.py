"""Pallas routing kernel vs the XLA reference (`lax.top_k` path) and the memory floor.

    python -m benchmarks.routing                         # CPU: interpret mode, small T
    python -m benchmarks.routing --tokens 4096,16384,65536   # GPU/TPU default token counts
    python -m benchmarks.routing --shapes deepseek --dtype bfloat16

Shapes: Mixtral (8 experts, top-2, top-k then softmax), Qwen2-MoE (64, top-4, softmax then
top-k), DeepSeek-like (256, top-8, sigmoid, renormalised, scaling 2.5). Both paths produce
float32 weights [T, k], int32 indices [T, k] and per-expert counts [E] under one jit each;
they are timed in interleaved rounds and medians compared (the CPU is shared and noisy).

The floor is the bytes a router must move (logits read once; weights, indices and counts
written once) over the copy bandwidth measured in the same run (a jitted `x + 1` over a
large array). On a GPU `kernel_over_floor` is the figure to read; on the CPU the kernel runs
in the Pallas interpreter, so its time is only there for completeness.
One JSON line per (shape, tokens), then a summary line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from esjax.kernels.routing import ops, reference
from esjax.routing import router

# name -> (experts, top_k, route options)
SHAPES = {
    "mixtral": (8, 2, dict(order="topk_softmax", score_fn="softmax")),
    "qwen2-moe": (64, 4, dict(order="softmax_topk", score_fn="softmax")),
    "deepseek": (256, 8, dict(order="softmax_topk", score_fn="sigmoid", renormalize=True,
                              scaling=2.5)),
}


def _median_ms(fns: dict, args, rounds: int, inner: int) -> dict[str, float]:
  """Median over `rounds` of the mean time of `inner` calls, rounds interleaved across fns."""
  for fn in fns.values():  # compile + warm up
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(inner):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / inner * 1e3)
  return {name: float(np.median(t)) for name, t in times.items()}


def copy_bandwidth(n_bytes: int, rounds: int) -> float:
  """Bytes/s of a jitted elementwise x + 1 (reads and writes n_bytes each)."""
  x = jnp.zeros((n_bytes // 4,), jnp.float32)
  ms = _median_ms({"copy": jax.jit(lambda y: y + 1)}, (x,), rounds, 5)["copy"]
  return 2 * n_bytes / (ms / 1e3)


def floor_bytes(n_tokens: int, n_experts: int, top_k: int, itemsize: int) -> int:
  return n_tokens * n_experts * itemsize + n_tokens * top_k * (4 + 4) + n_experts * 4


def main(argv=None):
  on_cpu = jax.default_backend() == "cpu"
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--tokens", default="1024,4096" if on_cpu else "4096,16384,65536",
                 help="comma-separated token counts (CPU default small: interpret mode)")
  p.add_argument("--dtype", default="float32", help="router logits dtype")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--inner", type=int, default=3 if on_cpu else 20)
  a = p.parse_args(argv)
  dtype = jnp.dtype(a.dtype)

  bw = copy_bandwidth((64 if on_cpu else 1024) << 20, a.rounds)
  rows = []
  for name in a.shapes.split(","):
    n_experts, top_k, opts = SHAPES[name]
    kernel_fn = jax.jit(lambda x: ops.route_with_counts(x, top_k, **opts))

    def xla(x):
      r = reference.route(x, top_k, **opts)
      return r, router.expert_counts(r.indices, n_experts)
    xla_fn = jax.jit(xla)
    for n_tokens in [int(t) for t in a.tokens.split(",")]:
      x = jax.random.normal(jax.random.key(n_tokens), (n_tokens, n_experts), dtype)
      # Time what a dispatcher consumes: weights, indices, counts (probs are fused
      # into the balance loss by XLA, in both paths).
      fns = {"kernel": lambda y: (lambda r, c: (r.weights, r.indices, c))(*kernel_fn(y)),
             "xla": lambda y: (lambda r, c: (r.weights, r.indices, c))(*xla_fn(y))}
      got, want = kernel_fn(x), xla_fn(x)
      same = bool(np.array_equal(got[0].indices, want[0].indices)
                  and np.array_equal(got[1], want[1])
                  and np.allclose(got[0].weights, want[0].weights, rtol=1e-5, atol=1e-6))
      ms = _median_ms(fns, (x,), a.rounds, a.inner)
      n_bytes = floor_bytes(n_tokens, n_experts, top_k, dtype.itemsize)
      floor_ms = n_bytes / bw * 1e3
      row = {
          "shape": name, "tokens": n_tokens, "experts": n_experts, "top_k": top_k,
          "dtype": a.dtype, "backend": jax.default_backend(),
          "interpret": on_cpu, "same_as_reference": same,
          "kernel_ms": round(ms["kernel"], 4), "xla_ms": round(ms["xla"], 4),
          "kernel_over_xla": round(ms["kernel"] / ms["xla"], 3),
          "floor_bytes": n_bytes, "floor_ms": round(floor_ms, 5),
          "kernel_over_floor": round(ms["kernel"] / floor_ms, 2),
          "xla_over_floor": round(ms["xla"] / floor_ms, 2),
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(json.dumps({
      "summary": "routing", "device": str(jax.devices()[0].device_kind),
      "copy_bandwidth_gb_s": round(bw / 1e9, 2),
      "median_kernel_over_xla": float(np.median([r["kernel_over_xla"] for r in rows])),
      "all_same_as_reference": all(r["same_as_reference"] for r in rows),
  }), flush=True)


if __name__ == "__main__":
  main()
