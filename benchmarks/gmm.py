"""The grouped SwiGLU of one EP rank's experts, forward + backward, by moe_impl.

    python -m benchmarks.gmm                      # GPU (Hopper): the real expert shapes
    python -m benchmarks.gmm --shapes tiny        # CPU smoke run: the kernels interpreted

Shapes (one EP rank, bf16): Mixtral-8x7B at ep 8 (1 local expert, D 4096, F 14336, 4,096
routed rows: 2,048 tokens x top-2 on 64 GPUs), Qwen2-57B-A14B at ep 4 (16 local experts, D
3584, F 2560, 8,192 routed rows). The rows are split over the local experts at random around
the balanced share and sit in a buffer `--buffer` times their number (the tail: an EP
receive buffer's unused rows). Each implementation runs the rows through
`esjax.routing.grouped`'s contract under one jit (value and gradients of a weighted sum):

- gmm: the kernels of esjax.kernels.gmm (Mosaic GPU on Hopper, else Triton), whose work is
  the routed rows;
- ragged: lax.ragged_dot (what XLA:GPU expands to dense dots over the whole buffer);
- dense: one expert's SwiGLU over the routed rows, the same FLOPs as a perfect grouped GEMM
  (the reference: `gmm_over_dense` is the figure to read).

Medians of interleaved rounds; one JSON line per (shape, impl) with ms and the routed
FLOPs' TFLOP/s, the largest difference from ragged's output and gradients, then a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from esjax.kernels.gmm import interpret as interpret_lib, kernel, ops
from esjax.routing import expert_parallel, grouped

# name -> (local experts, d_model, d_ff, routed rows)
SHAPES = {
    "mixtral-8x7b": (1, 4096, 14336, 4096),
    "qwen2-57b-a14b": (16, 3584, 2560, 8192),
    "tiny": (3, 64, 128, 120),
}


def _group_sizes(rng, n_groups: int, rows: int) -> np.ndarray:
  share = rng.dirichlet(np.full(n_groups, 20.0))
  sizes = np.floor(share * rows).astype(np.int32)
  sizes[0] += rows - sizes.sum()
  return sizes


def _impls(opts: ops.Options):
  def dense(rows, gs, wg, wu, wd):  # plain einsums: one expert's weights, every row
    del gs
    return expert_parallel.swiglu_batched(rows[None], wg[:1], wu[:1], wd[:1])[0]

  return {"gmm": lambda *a: ops.swiglu_gmm(*a, opts), "ragged": grouped.swiglu_ragged,
          "dense": dense}


def run(shape: str, buffer: float, rounds: int, opts: ops.Options = ops.Options()):
  g, d, f, routed = SHAPES[shape]
  rng = np.random.default_rng(0)
  n = int(np.ceil(routed * buffer / opts.tiles.m) * opts.tiles.m)
  sizes = _group_sizes(rng, g, routed)
  rows = np.zeros((n, d), np.float32)
  rows[:routed] = rng.normal(size=(routed, d))
  x = jnp.asarray(rows, jnp.bfloat16)
  dense_x = x[:routed]
  ws = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.bfloat16)
        for s in ((g, d, f), (g, d, f), (g, f, d))]
  weight = jnp.asarray(rng.normal(size=(n, d)) * (np.arange(n) < routed)[:, None], jnp.float32)
  gs = jnp.asarray(sizes)

  def loss_grad(impl):
    def loss(x, *w):
      return jnp.sum(impl(x, gs, *w).astype(jnp.float32) * weight[:x.shape[0]])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

  fns = {name: loss_grad(impl) for name, impl in _impls(opts).items()}
  args = {name: (dense_x if name == "dense" else x, *ws) for name in fns}
  outs = {name: jax.block_until_ready(fn(*args[name])) for name, fn in fns.items()}
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - t0)
  flops = 3 * 2 * 3 * routed * d * f  # three matmuls, forward and twice backward
  ref = jax.tree.leaves(outs["ragged"])
  rows_out = []
  for name in fns:
    ms = float(np.median(times[name]) * 1e3)
    diff = None
    if name != "dense":
      diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                       / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-9))
                 for a, b in zip(jax.tree.leaves(outs[name]), ref))
    rows_out.append(dict(bench="gmm", shape=shape, impl=name, rows=n, routed_rows=routed,
                         groups=g, ms=ms, tflops=flops / (ms / 1e3) / 1e12,
                         max_rel_diff_vs_ragged=diff, kernels=opts.backend,
                         platform=jax.default_backend()))
  return rows_out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="mixtral-8x7b,qwen2-57b-a14b")
  p.add_argument("--buffer", type=float, default=1.25, help="buffer rows / routed rows")
  p.add_argument("--rounds", type=int, default=5)
  a = p.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"  # else the CPU smoke run: the kernels interpreted
  hopper = on_gpu and getattr(jax.devices()[0], "compute_capability", None) == "9.0"
  summary = {}
  for shape in a.shapes.split(","):
    with (contextlib.nullcontext() if on_gpu
          else interpret_lib.transposes_supported()) as interpret:
      opts = (ops.Options("mosaic" if hopper else "triton") if on_gpu else
              ops.Options(tiles=kernel.Tiles(m=64, k=64, n=64, stages=2), interpret=interpret))
      rows = run(shape, a.buffer, a.rounds, opts)
    for r in rows:
      print(json.dumps(r), flush=True)
    by = {r["impl"]: r["ms"] for r in rows}
    summary[shape] = dict(gmm_over_dense=by["gmm"] / by["dense"],
                          ragged_over_gmm=by["ragged"] / by["gmm"])
  print(json.dumps({"summary": "gmm", **summary}), flush=True)


if __name__ == "__main__":
  main()
