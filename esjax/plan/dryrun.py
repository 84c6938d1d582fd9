"""The dry run: the training loop's own step compiled for a cluster that is not here.

`plan(config, target, n_devices)` builds the loop's steps (`esjax.train.step.for_config`) on
the target's devices (a deviceless XLA:GPU topology, or fake CPU devices), lowers and
compiles the train step with abstract inputs only (ShapeDtypeStructs with the layout's
shardings; no weight is allocated), and reads from the executable:

- per-device bytes from `memory_analysis()`: arguments (master weights, optimizer state,
  batch), outputs, temporaries, and the peak (arguments + outputs - aliased + temporaries),
  against the target's usable memory;
- collectives per step and mesh axis (`esjax.plan.report`), each axis mapped to its link
  (NVLink inside a node, InfiniBand across nodes);

and predicts the step time from the target's roofline (`esjax.plan.targets`): the FLOPs the
devices execute (the model's, plus recompute) at the measured bf16 matmul rate, stretched by
the pipeline bubble, plus the collectives at their link's bandwidth (no overlap assumed;
`predicted_step_s_overlapped` assumes perfect overlap), plus the optimizer's pass over its
state at HBM bandwidth; MFU is the model's FLOPs over that time at the datasheet peak.
Caveats:
the deviceless compile does no autotuning (default GEMM tiles), `cost_analysis()` is not
available (FLOPs come from the ledger), and a program that does not fit still compiles.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esjax.plan import analytic, report, targets as targets_lib
from esjax.train import step as step_lib


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

  def to_json(self) -> dict[str, Any]:
    return {
        "layout": self.layout, "target": self.target, "devices": self.devices,
        "peak_bytes_per_device": self.memory["peak"], "fits": self.fits,
        "memory": self.memory,
        "collective_bytes_per_step": sum(c["bytes"] for c in self.collectives),
        "analytic_min_bytes_per_step": sum(self.analytic_bytes.values()),
        "collectives": self.collectives, "analytic_bytes": self.analytic_bytes,
        **self.prediction, "compile_s": self.compile_s,
    }


def abstract_batch(steps: step_lib.Steps, batch: int, seq: int) -> dict[str, Any]:
  """The loop's batch (`inputs`, `targets` int32 [B, S]) as ShapeDtypeStructs."""
  return {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=steps.batch_sharding)
          for k in ("inputs", "targets")}


def plan(config: Any, target: targets_lib.Target, n_devices: int) -> Result:
  """Compiles `config`'s train step for `n_devices` of `target` and reads it (see above).

  On a GPU target, attention that would run on cuDNN is compiled as the chunked kernel
  instead: jax checks cuDNN's version and the GPU's compute capability on a real device
  (both are flash attention: memory linear in the sequence, the same FLOPs)."""
  devices = devices_for(target, n_devices)
  if target.platform == "gpu" and config.model.get("attention_impl") in (None, "auto",
                                                                          "cudnn"):
    config = copy.deepcopy(config)
    config.model.attention_impl = "chunked"
  t0 = time.perf_counter()
  run = step_lib.for_config(config, devices)
  steps, engine = run.steps, run.steps.engine
  tc = config.train
  lowered = steps.train.lower(steps.abstract_state, abstract_batch(steps, tc.batch_size,
                                                                    tc.seq_len))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  memory = {
      "arguments": float(mem.argument_size_in_bytes),
      "outputs": float(mem.output_size_in_bytes),
      "aliased": float(mem.alias_size_in_bytes),
      "temporaries": float(mem.temp_size_in_bytes),
  }
  memory["peak"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                    + memory["temporaries"])
  memory["usable"] = float(target.usable_bytes)
  mesh = run.plan.mesh
  rows = report.collectives(compiled.as_text(), tuple(mesh.devices.shape), mesh.axis_names,
                            engine.branch_weights())
  work = analytic.Work(run.model_cfg, run.plan.layout, tc.batch_size, tc.seq_len)
  collectives = []
  for c in rows:
    link = link_of(mesh.devices, mesh.axis_names, c.axes, target.devices_per_node)
    expected = c.bytes * (_routed_share(work) if c.bound else 1.0)
    collectives.append({"op": c.op, "axes": list(c.axes), "link": link, "count": c.count,
                        "bytes": expected, "buffer_bytes": c.bytes, "data_dependent": c.bound})
  prediction = predict(work, target, collectives, memory["arguments"])
  return Result(layout=str(run.plan.layout), target=target.name, devices=n_devices,
                memory=memory, fits=memory["peak"] <= target.usable_bytes,
                collectives=collectives, analytic_bytes=work.minimum_bytes(),
                prediction=prediction, compile_s={"lower": t1 - t0, "compile": t2 - t1})


def predict(work: analytic.Work, target: targets_lib.Target,
            collectives: list[dict[str, Any]], state_bytes: float) -> dict[str, float]:
  """Step time and MFU from the target's roofline (see the module docstring)."""
  if not target.peak_flops:
    return {"predicted_step_s": None, "predicted_mfu": None, "bubble": work.bubble}
  n = work.layout.n_devices
  compute = work.hardware_flops / n / target.matmul_flops / (1 - work.bubble)
  bw = {"nvlink": target.intra_node_bytes_per_s, "ib": target.inter_node_bytes_per_s}
  comm = 0.0
  for c in collectives:  # ragged all-to-alls: the routed share of their buffers
    comm += c["bytes"] / bw.get(c["link"], float("inf"))
  optimizer = 3 * state_bytes / target.hbm_bytes_per_s  # read and write the state, once
  step = compute + comm + optimizer
  return {
      "predicted_step_s": step,
      "predicted_step_s_overlapped": max(compute, comm) + optimizer,
      "predicted_mfu": work.model_flops / (n * target.peak_flops * step),
      "compute_s": compute, "comm_s": comm, "optimizer_s": optimizer,
      "bubble": work.bubble, "model_flops_per_step": work.model_flops,
      "hardware_flops_per_step": work.hardware_flops,
  }


def _routed_share(work: analytic.Work) -> float:
  """Routed rows / buffer rows of the ragged EP exchange with balanced routing: a source's
  buffer block for one EP rank holds T * min(k, E/ep) rows, of which T * k / ep are used."""
  cfg, ep = work.cfg, work.layout.ep
  if not cfg.is_moe or ep == 1:
    return 1.0
  return cfg.top_k / (ep * min(cfg.top_k, cfg.n_experts // ep))
