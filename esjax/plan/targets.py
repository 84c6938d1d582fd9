"""The machines a plan is made for: memory and the roofline that predicts a step's time.

Every number is per device, written once here, with its source. Bandwidths are one
direction (what a ring collective moves per device is limited by it).
"""

from __future__ import annotations

import dataclasses
import os

SPECS = os.path.join(os.path.dirname(__file__), "gpu_specs")


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str  # what the step is compiled for: "gpu" (deviceless, XLA:GPU) or "cpu"
  memory_bytes: float  # device memory
  memory_fraction: float  # share the run may use (XLA_PYTHON_CLIENT_MEM_FRACTION)
  peak_flops: float  # dense bf16 matmul FLOP/s (datasheet)
  matmul_flops: float  # what a large bf16 matmul achieves (measured): the compute ceiling
  hbm_bytes_per_s: float
  intra_node_bytes_per_s: float  # NVLink, per GPU and direction
  inter_node_bytes_per_s: float  # InfiniBand, per GPU and direction
  intra_node_latency_s: float  # one collective's fixed cost inside a node (NCCL's alpha)
  inter_node_latency_s: float  # ... across nodes
  devices_per_node: int
  spec_file: str | None  # XLA's GpuTargetConfigProto for the deviceless compile
  sources: tuple[str, ...]

  @property
  def usable_bytes(self) -> float:
    return self.memory_bytes * self.memory_fraction

  def link_latency_s(self, link: str) -> float:
    return {"nvlink": self.intra_node_latency_s, "ib": self.inter_node_latency_s}.get(link, 0.0)


def xla_gpu_flags() -> dict[str, str | bool]:
  """The cluster's XLA flags (gpu_specs/xla_gpu_flags.txt, also read by the launch scripts)
  as compile options: {"xla_gpu_enable_triton_gemm": False, ...}."""
  out = {}
  with open(os.path.join(SPECS, "xla_gpu_flags.txt"), encoding="utf-8") as f:
    for line in f:
      flag = line.split("#", 1)[0].strip()
      if flag:
        name, _, value = flag.removeprefix("--").partition("=")
        out[name] = {"true": True, "false": False}.get(value, value)
  return out


_FRACTION = 0.92  # launch/slurm/xla_gpu_flags.sh sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
_HOPPER_SOURCES = (
    "peak bf16 989.4 TFLOP/s dense: NVIDIA H100 Tensor Core GPU datasheet (SXM: 1,979 with "
    "sparsity)",
    "achieved bf16 matmul 788 TFLOP/s: an 8192^3 product on random data on an H200 of this "
    "workplace (device tool KINDS.md, 2026-10-28; the same Hopper die and clocks as H100 SXM)",
    "NVLink 4: 900 GB/s per GPU (both directions, 18 links): same datasheet; 450 GB/s one way",
    "InfiniBand NDR 400 Gb/s, one ConnectX-7 per GPU (DGX H100 user guide): 50 GB/s one way",
    "collective latency (rough): NCCL's own tuning model (src/graph/tuning.cc) gives a ring "
    "base latency of 6.6-8.4 us plus 0.5-3.4 us per NVLink hop; taken as 10 us per collective "
    "inside a node and 25 us across nodes (network hops)",
)

_HOPPER_LATENCY = dict(intra_node_latency_s=10e-6, inter_node_latency_s=25e-6)

TARGETS = {
    "h100": Target(
        "h100", "gpu", memory_bytes=84_978_434_048, memory_fraction=_FRACTION,
        peak_flops=989.4e12, matmul_flops=788e12, hbm_bytes_per_s=3.35e12,
        intra_node_bytes_per_s=450e9, inter_node_bytes_per_s=50e9, **_HOPPER_LATENCY,
        devices_per_node=8, spec_file=os.path.join(SPECS, "h100_sxm.txtpb"),
        sources=_HOPPER_SOURCES + (
            "80 GB HBM3 at 3.35 TB/s: H100 datasheet; device_memory_size from XLA's "
            "h100_sxm.txtpb",)),
    "h200": Target(
        "h200", "gpu", memory_bytes=141e9, memory_fraction=_FRACTION, peak_flops=989.4e12,
        matmul_flops=788e12, hbm_bytes_per_s=4.8e12, intra_node_bytes_per_s=450e9,
        inter_node_bytes_per_s=50e9, **_HOPPER_LATENCY, devices_per_node=8,
        spec_file=os.path.join(SPECS, "h200_sxm.txtpb"),
        sources=_HOPPER_SOURCES + ("141 GB HBM3e at 4.8 TB/s: NVIDIA H200 datasheet",)),
    # Fake CPU devices (the same program, upcast bf16 and CPU code paths): memory only.
    "cpu": Target("cpu", "cpu", memory_bytes=float("inf"), memory_fraction=1.0,
                  peak_flops=0.0, matmul_flops=0.0, hbm_bytes_per_s=0.0,
                  intra_node_bytes_per_s=0.0, inter_node_bytes_per_s=0.0,
                  intra_node_latency_s=0.0, inter_node_latency_s=0.0, devices_per_node=8, spec_file=None,
                  sources=("fake CPU devices: no roofline",)),
}


def get(name: str) -> Target:
  if name not in TARGETS:
    raise ValueError(f"--target={name!r}, expected one of {sorted(TARGETS)}")
  return TARGETS[name]
