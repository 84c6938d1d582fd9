"""The parallel plan: a static, hashable description of how one step maps onto devices.

A `ParallelPlan` holds the resolved `Layout`, the folded device mesh (`mesh.device_mesh`), the
mesh axes behind every parallel role (tp, cp, dp of the attention view; ep, etp, edp of the MoE
view; pp) and the platform the step is compiled for. Modules receive it at construction
(`Block(cfg, layer, rngs, plan)` in the step, `Transformer(cfg, rngs, plan=plan)`), so a
different layout is a different graphdef and a different trace: nothing ambient changes what
a traced function computes.

The train step runs the model inside one `shard_map` over the whole mesh (see
`esjax/parallel/README.md`): every module sees its local shards and communicates with the
explicit collectives of `esjax.sharding.collectives`, which are the identity when a role has no mesh axis. A plan
without a mesh (`ParallelPlan.single()`) is the model on one device, outside any shard_map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from esjax.sharding.layout import BaseAxis, Layout, base_axes, device_mesh

Axes = tuple[str, ...]
ROLES = ("pp", "dp", "cp", "tp", "edp", "ep", "etp")
PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
  """Layout + mesh + platform. Hashable; the model and the step are built from it."""

  layout: Layout
  mesh: Mesh | None
  base: tuple[BaseAxis, ...]
  platform: str = "cpu"

  @classmethod
  def single(cls, platform: str | None = None) -> "ParallelPlan":
    """One device, no mesh: the plan of a model used outside the parallel step."""
    return cls(Layout(dp=1).resolve(1), None, (), platform or _default_platform())

  def axes(self, role: str) -> Axes:
    """Mesh axes of a role (slowest first); () when the role has size 1."""
    if role == "pp":
      return ("pp",) if self.layout.pp > 1 else ()
    if role in ("dp", "cp", "tp"):
      return tuple(b.name for b in self.base if b.attn == role)
    if role in ("edp", "ep", "etp"):
      return tuple(b.name for b in self.base if b.moe == role)
    raise ValueError(f"unknown parallel role {role!r}; expected one of {ROLES}")

  def size(self, axes: Sequence[str]) -> int:
    sizes = {"pp": self.layout.pp, **{b.name: b.size for b in self.base}}
    return math.prod(sizes[a] for a in axes)

  pp = property(lambda self: self.axes("pp"))
  dp = property(lambda self: self.axes("dp"))
  cp = property(lambda self: self.axes("cp"))
  tp = property(lambda self: self.axes("tp"))
  ep = property(lambda self: self.axes("ep"))
  etp = property(lambda self: self.axes("etp"))
  edp = property(lambda self: self.axes("edp"))

  @property
  def gpu_arch(self) -> str | None:
    """The compute capability of the plan's GPUs ("9.0": Hopper; a deviceless topology's
    too), None off a GPU or where the devices do not say."""
    return self._gpu_attribute("compute_capability")

  @property
  def gpu_sms(self) -> int | None:
    """The streaming multiprocessors of one of the plan's GPUs (132 on an H100 SXM, 114 on
    an H100 PCIe; a deviceless topology's too), None off a GPU or where it does not say."""
    return self._gpu_attribute("core_count")

  def _gpu_attribute(self, name: str) -> Any:
    if self.platform != "gpu":
      return None
    device = self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]
    return getattr(device, name, None)

  @property
  def stage_axes(self) -> Axes:
    """Every base axis: within a pipeline stage each device holds its own tokens."""
    return tuple(b.name for b in self.base)

  @property
  def all_axes(self) -> Axes:
    return (*self.pp, *self.stage_axes)

  @property
  def seq_axes(self) -> Axes:
    """Axes sharding the residual stream's sequence: cp, then tp (sequence parallelism)."""
    return self.cp + self.tp

  @property
  def native_collectives(self) -> bool:
    """Whether the target runs ragged collectives and grouped matmuls natively."""
    return self.platform in ("gpu", "tpu")

  @property
  def ep_dispatch(self) -> str:
    """The EP exchange: `ragged_all_to_all` where native, the padded all_to_all elsewhere."""
    impl = self.layout.ep_dispatch
    if impl == "auto":
      return "ragged" if self.native_collectives else "padded"
    return impl

  def view(self, roles: tuple[str, ...]) -> np.ndarray:
    """Device ids arranged as (pp, *roles), e.g. ("dp", "cp", "tp") (the attention view) or
    ("edp", "ep", "etp") (the MoE view): Megatron's rank groups are its slices."""
    ids = np.vectorize(lambda d: d.id)(self.mesh.devices)
    order, shape = [0], [self.layout.pp]
    for role in roles:
      members = [i + 1 for i, b in enumerate(self.base) if role in (b.attn, b.moe)]
      order += members
      shape.append(math.prod(self.base[i - 1].size for i in members))
    return ids.transpose(order).reshape(shape)

  def __str__(self) -> str:
    return f"{self.layout} on {self.layout.n_devices} {self.platform}"


def make_plan(layout: Layout, devices: Sequence[Any] | None = None) -> ParallelPlan:
  """The plan of `layout` over `devices` (default: every device of this job; a single-process
  job whose layout names fewer, every size given, uses the first that many). Devices may be
  those of a deviceless topology (`jax.experimental.topologies`): the platform follows them."""
  if devices is None:
    devices = jax.devices()
    if layout.dp and jax.process_count() == 1:
      wanted = layout.pp * layout.dp * layout.cp * layout.tp
      devices = devices[:wanted] if wanted < len(devices) else devices
  devices = list(devices)
  layout = layout.resolve(len(devices))
  platform = devices[0].platform
  platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
  if platform not in PLATFORMS:
    raise ValueError(f"devices of platform {platform!r}; expected one of {PLATFORMS}")
  return ParallelPlan(layout, device_mesh(layout, devices), base_axes(layout), platform)


def _default_platform() -> str:
  p = jax.default_backend()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p
