"""The dry run: the training loop's own step compiled for a cluster that is not here.

`plan(config, target, n_devices)` builds the loop's steps (`esjax.train.step.for_config`) on
the target's devices (a deviceless XLA:GPU topology, or fake CPU devices), lowers and
compiles the train step with abstract inputs only (ShapeDtypeStructs with the layout's
shardings; no weight is allocated) and, for a GPU target, with the cluster's XLA flags
(`targets.xla_gpu_flags`, the list the launch scripts export), and reads from the executable:

- per-device bytes from `memory_analysis()`: arguments (master weights, optimizer state,
  batch), outputs, temporaries, their sum (arguments + outputs - aliased + temporaries: what
  the executable allocates) and the compiler's own peak; the peak is the larger. When XLA's
  rematerialization pass cannot get under its limit, its estimate is read from the log and
  shown beside them, not taken as the peak: it adds up the branches of a conditional where
  the allocation holds the largest (two branches of 30 GiB each beside a 50 GiB loop carry:
  110 GiB estimated, 80 allocated; tests/plan_test.py), and the pipeline's units are
  conditionals;
- collectives per step and mesh axis (`esjax.plan.report`), each axis mapped to its link
  (NVLink inside a node, InfiniBand across nodes);
- matmul FLOPs per model part (`esjax.plan.matmuls`): what the program runs, beside the
  model's FLOPs (the ledger, `esjax.train.flops`); a part whose program runs more than
  `WASTE` times the model's is flagged.

The step time is predicted from the target's roofline (`esjax.plan.targets`): the compiled
FLOPs at the measured bf16 matmul rate, stretched by the pipeline bubble, plus each
collective's bytes at its link's bandwidth and its fixed latency (no overlap assumed;
`predicted_step_s_overlapped` assumes perfect overlap of compute and bytes), plus the
optimizer's pass over its state at HBM bandwidth. MFU is the model's FLOPs over that time at
the datasheet peak (the convention); HFU the compiled FLOPs over it.

Attention that would run on cuDNN cannot be compiled deviceless (jax checks cuDNN's version
and the GPU on a real device): the step is compiled with the chunked kernel (flash attention
too: memory linear in the sequence) and core attention is priced as cuDNN runs it, forward
plus a backward that recomputes the scores (7/6 of the model's core attention FLOPs, plus a
forward where the step recomputes layers, `Work.attention_recompute`); the output says so. The deviceless compile does
no autotuning (default GEMM tiles).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esjax.models import attention, mlp, moe, transformer
from esjax.plan import analytic, matmuls, report, targets as targets_lib
from esjax.routing import expert_parallel
from esjax.train import step as step_lib

# Model parts by the named scopes the model's code emits (see each module's SCOPE_*).
PARTS = {attention.SCOPE_PROJ: "attn_proj", attention.SCOPE_CORE: "core_attn",
         mlp.SCOPE: "mlp", expert_parallel.SCOPE_EXPERTS: "experts",
         expert_parallel.SCOPE_ROUTER: "router", transformer.SCOPE_LOGITS: "logits"}
WASTE = 1.5  # compiled / model FLOPs above which a part is flagged
# cuDNN flash attention in FLOPs of the model's causal core attention (forward 2 matmuls,
# backward 5: the scores again, dV, dP, dQ, dK; the ledger counts 2 + 4).
CUDNN_ATTENTION = 7 / 6
_REMAT_LOG = re.compile(r"Can't reduce memory use below \S+ \((\d+) bytes\) by "
                        r"rematerialization; only reduced to \S+ \((\d+) bytes\)")


def devices_for(target: targets_lib.Target, n: int) -> list[Any]:
  """`n` devices of the target: a deviceless GPU topology (hosts of `devices_per_node`), or
  this process's (fake) CPU devices."""
  if target.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(f"--devices={n}: this process has {len(devices)} CPU devices (the "
                       "planner sets XLA_FLAGS for fake devices before jax starts)")
    return devices[:n]
  per = min(n, target.devices_per_node)
  if n % per:
    raise ValueError(f"--devices={n} is not a multiple of {per} GPUs per node")
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    with open(target.spec_file, encoding="utf-8") as f:
      spec = f.read()
    topo = topologies.get_topology_desc(platform="cuda", target_config=spec,
                                        topology=f"1x{n // per}x{per}")
  except Exception as e:  # the CUDA plugin is missing or did not start
    raise RuntimeError(
        f"--target={target.name}: no deviceless CUDA compiler ({type(e).__name__}: {e}); "
        "pip install -r requirements-plan.txt, or use --target=cpu") from None
  return list(topo.devices)


def link_of(devices: np.ndarray, axis_names: tuple[str, ...], axes: tuple[str, ...],
            per_node: int) -> str:
  """'nvlink' when every group of devices varying only `axes` sits in one node, else 'ib'."""
  if not axes:
    return "none"
  node = np.vectorize(lambda d: getattr(d, "process_index", 0))(devices)
  if np.all(node == node.flat[0]):  # one process: fake devices, nodes of `per_node` ids
    node = np.vectorize(lambda d: d.id // per_node)(devices)
  moved = [axis_names.index(a) for a in axes]
  rest = [i for i in range(devices.ndim) if i not in moved]
  groups = node.transpose(rest + moved).reshape(-1, math.prod(devices.shape[i] for i in moved))
  return "nvlink" if np.all(groups == groups[:, :1]) else "ib"


@dataclasses.dataclass
class Result:
  """What the dry run found; `to_json()` is the planner's JSON line."""

  layout: str
  target: str
  devices: int
  memory: dict[str, float]
  fits: bool
  collectives: list[dict[str, Any]]
  analytic_bytes: dict[str, float]
  prediction: dict[str, float]
  compile_s: dict[str, float]
  flops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  xla_flags: dict[str, Any] = dataclasses.field(default_factory=dict)
  hlo: str = dataclasses.field(default="", repr=False)  # the optimized HLO (not in the JSON)

  @property
  def waste(self) -> dict[str, float]:
    """Parts whose compiled FLOPs exceed WASTE x the model's: part -> ratio."""
    return {r["part"]: r["ratio"] for r in self.flops
            if r["ratio"] is not None and r["ratio"] > WASTE}

  def to_json(self) -> dict[str, Any]:
    memory = {k: v if math.isfinite(v) else None for k, v in self.memory.items()}
    return {
        "layout": self.layout, "target": self.target, "devices": self.devices,
        "peak_bytes_per_device": self.memory["peak"], "fits": self.fits,
        "memory": memory,
        "collective_bytes_per_step": sum(c["bytes"] for c in self.collectives),
        "analytic_min_bytes_per_step": sum(self.analytic_bytes.values()),
        "collectives": self.collectives, "analytic_bytes": self.analytic_bytes,
        "flops": self.flops, "waste": self.waste, "notes": self.notes,
        "xla_flags": self.xla_flags, **self.prediction, "compile_s": self.compile_s,
    }


def abstract_batch(steps: step_lib.Steps, batch: int, seq: int) -> dict[str, Any]:
  """The loop's batch (`inputs`, `targets` int32 [B, S]) as ShapeDtypeStructs."""
  return {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=steps.batch_sharding)
          for k in ("inputs", "targets")}


def plan(config: Any, target: targets_lib.Target, n_devices: int,
         xla_flags: dict[str, Any] | None = None) -> Result:
  """Compiles `config`'s train step for `n_devices` of `target` and reads it (see above).
  `xla_flags`: compile options (default: the cluster's for a GPU target, none for cpu)."""
  devices = devices_for(target, n_devices)
  notes = []
  cudnn = target.platform == "gpu" and config.model.get("attention_impl") in (None, "auto",
                                                                               "cudnn")
  if cudnn:
    config = copy.deepcopy(config)
    config.model.attention_impl = "chunked"
  if xla_flags is None:
    xla_flags = targets_lib.xla_gpu_flags() if target.platform == "gpu" else {}
  t0 = time.perf_counter()
  run = step_lib.for_config(config, devices)
  steps, engine = run.steps, run.steps.engine
  tc = config.train
  lowered = steps.train.lower(steps.abstract_state, abstract_batch(steps, tc.batch_size,
                                                                    tc.seq_len))
  t1 = time.perf_counter()
  with _compiler_log() as log:
    compiled = lowered.compile(compiler_options=xla_flags or None)
  t2 = time.perf_counter()
  memory = _memory(compiled.memory_analysis(), log[0], target)
  text = compiled.as_text()
  mesh = run.plan.mesh
  rows = report.collectives(text, tuple(mesh.devices.shape), mesh.axis_names,
                            engine.branch_weights())
  work = analytic.Work(run.model_cfg, run.plan.layout, tc.batch_size, tc.seq_len)
  collectives = []
  for c in rows:
    link = (link_of(mesh.devices, mesh.axis_names, c.axes, target.devices_per_node)
            if target.platform == "gpu" else "host")
    expected = c.bytes * (_routed_share(work) if c.bound else 1.0)
    collectives.append({"op": c.op, "axes": list(c.axes), "link": link, "count": c.count,
                        "bytes": expected, "buffer_bytes": c.bytes, "data_dependent": c.bound})
  counted = matmuls.count(text, PARTS, engine.branch_weights(mean=True))
  flops = flop_table(work, counted, cudnn)
  if cudnn:
    notes.append("core_attn: cuDNN flash attention, priced analytically (not compilable "
                 "deviceless); the step was compiled with the chunked kernel")
  if counted.unpriced:
    notes.append("custom calls with no declared cost (their FLOPs are not counted): "
                 + ", ".join(f"{k} x{v:g}" for k, v in sorted(counted.unpriced.items())))
  if counted.unknown_loops:
    notes.append(f"{len(counted.unknown_loops)} loops without a known trip count counted once")
  if "remat_reached" in memory:
    notes.append(f"XLA's rematerialization pass estimated {memory['remat_reached'] / 2**30:.2f}"
                 f" GiB against its limit of {memory['remat_limit'] / 2**30:.2f} GiB (it adds "
                 "up the branches of conditionals); the peak is the allocation")
  experts = next((r for r in flops if r["part"] == "experts" and r["ratio"]), None)
  if (experts and experts["ratio"] > WASTE
      and moe.moe_impl(run.model_cfg, run.plan) == "ragged"):
    fix = ("moe_impl=auto runs it here because the grouped-matmul kernels do not apply "
           "(they need a bf16 or f16 model with expert widths in whole tiles)"
           if run.model_cfg.moe_impl == "auto" else
           "--config.model.moe_impl=auto (or gmm) runs the routed rows only")
    notes.append(f"experts: lax.ragged_dot runs {experts['ratio']:.2f}x the model's expert "
                 f"FLOPs (XLA multiplies whole EP buffers, against every local expert); {fix}")
  compiled_total = sum(r["compiled"] for r in flops)
  prediction = predict(work, target, collectives, memory["arguments"], compiled_total)
  return Result(layout=str(run.plan.layout), target=target.name, devices=n_devices,
                memory=memory, fits=memory["peak"] <= target.usable_bytes,
                collectives=collectives, analytic_bytes=work.minimum_bytes(),
                prediction=prediction, compile_s={"lower": t1 - t0, "compile": t2 - t1},
                flops=flops, notes=notes, xla_flags=dict(xla_flags), hlo=text)


@contextlib.contextmanager
def _compiler_log():
  """Collects what is written to file descriptor 2 (XLA's C++ log) inside the block into
  `log[0]`, and writes it on to stderr afterwards."""
  sys.stderr.flush()
  saved = os.dup(2)
  log = [""]
  with tempfile.TemporaryFile() as f:
    os.dup2(f.fileno(), 2)
    try:
      yield log
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      f.seek(0)
      log[0] = f.read().decode(errors="replace")
      sys.stderr.write(log[0])


def _memory(mem: Any, log: str, target: targets_lib.Target) -> dict[str, float]:
  """Per-device bytes (see the module docstring); `remat_limit` and `remat_reached` only where
  the compiler's rematerialization pass said it could not get under its limit."""
  memory = {
      "arguments": float(mem.argument_size_in_bytes),
      "outputs": float(mem.output_size_in_bytes),
      "aliased": float(mem.alias_size_in_bytes),
      "temporaries": float(mem.temp_size_in_bytes),
  }
  memory["buffers"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                       + memory["temporaries"])
  memory["compiler_peak"] = float(mem.peak_memory_in_bytes)
  remat = _REMAT_LOG.findall(log)
  if remat:
    memory["remat_limit"] = float(min(int(limit) for limit, _ in remat))
    memory["remat_reached"] = float(max(int(got) for _, got in remat))
  memory["peak"] = max(memory["buffers"], memory["compiler_peak"])
  memory["usable"] = float(target.usable_bytes)
  return memory


def flop_table(work: analytic.Work, counted: matmuls.Count, cudnn: bool
               ) -> list[dict[str, Any]]:
  """Rows part | model FLOPs (the ledger, per step) | compiled FLOPs (per device x devices)
  | ratio; core attention priced as cuDNN runs it when `cudnn`."""
  n = work.layout.n_devices
  model = work.model_parts()
  compiled = {k: v * n for k, v in counted.by_part.items()}
  if cudnn:
    compiled["core_attn"] = model["core_attn"] * (CUDNN_ATTENTION
                                                  + work.attention_recompute * 2 / 6)
  rows = []
  for part in (*PARTS.values(), matmuls.OTHER):
    m, c = model.get(part, 0.0), compiled.get(part, 0.0)
    if m or c:
      rows.append({"part": part, "model": m, "compiled": c, "ratio": c / m if m else None})
  return rows


def predict(work: analytic.Work, target: targets_lib.Target,
            collectives: list[dict[str, Any]], state_bytes: float,
            compiled_flops: float) -> dict[str, float]:
  """Step time, MFU and HFU from the target's roofline (see the module docstring);
  `compiled_flops`: the matmul FLOPs of the step summed over the devices."""
  if not target.peak_flops:
    return {"predicted_step_s": None, "predicted_mfu": None, "bubble": work.bubble,
            "model_flops_per_step": work.model_flops, "compiled_flops_per_step": compiled_flops}
  n = work.layout.n_devices
  compute = compiled_flops / n / target.matmul_flops / (1 - work.bubble)
  bw = {"nvlink": target.intra_node_bytes_per_s, "ib": target.inter_node_bytes_per_s}
  comm = latency = 0.0
  for c in collectives:  # ragged all-to-alls: the routed share of their buffers
    comm += c["bytes"] / bw.get(c["link"], float("inf"))
    latency += c["count"] * target.link_latency_s(c["link"])
  optimizer = 3 * state_bytes / target.hbm_bytes_per_s  # read and write the state, once
  step = compute + comm + latency + optimizer
  return {
      "predicted_step_s": step,
      "predicted_step_s_overlapped": max(compute, comm) + latency + optimizer,
      "predicted_mfu": work.model_flops / (n * target.peak_flops * step),
      "predicted_hfu": compiled_flops / (n * target.peak_flops * step),
      "compute_s": compute, "comm_s": comm, "latency_s": latency, "optimizer_s": optimizer,
      "bubble": work.bubble, "model_flops_per_step": work.model_flops,
      "compiled_flops_per_step": compiled_flops,
      "ledger_hardware_flops_per_step": work.hardware_flops,
  }


def _routed_share(work: analytic.Work) -> float:
  """Routed rows / buffer rows of the ragged EP exchange with balanced routing: a source's
  buffer block for one EP rank holds T * min(k, E/ep) rows (or ep_buffer_factor x T k / ep,
  if fewer), of which T * k / ep are used."""
  cfg, ep = work.cfg, work.layout.ep
  if not cfg.is_moe or ep == 1:
    return 1.0
  worst = cfg.top_k / (ep * min(cfg.top_k, cfg.n_experts // ep))
  return max(worst, 1 / cfg.ep_buffer_factor) if cfg.ep_buffer_factor else worst
