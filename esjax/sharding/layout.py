"""Parallel layouts and the folded device mesh (MoE Parallel Folding).

A `Layout` names five sizes for attention layers (pp, dp, cp, tp) and three for expert layers
(ep, etp, and the derived edp) over the same devices. As in Megatron's RankGenerator (fastest
axis last), the attention view is `devices.reshape(pp, dp, cp, tp)` and the MoE view
`devices.reshape(pp, edp, ep, etp)`; per pipeline stage tp*cp*dp == etp*ep*edp.

JAX cannot mix two meshes in one jit, so `make_mesh` builds one base mesh whose axes are the
common refinement of both factorisations: the cumulative sizes {tp, tp*cp, N} and
{etp, etp*ep, N} of a stage (N = devices / pp) must form a divisibility chain, and every base
axis is named after the attention and the MoE role it plays (`dp_edp`, `tp_ep`, `tp_etp`, ...).
An attention or MoE axis is then a tuple of base axes, and both layouts are PartitionSpecs over
one mesh. Layouts that do not nest (tp=3 with etp=2) are rejected with the sizes named.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from jax.sharding import AxisType, Mesh

ATTN_AXES = ("pp", "dp", "cp", "tp")
MOE_AXES = ("pp", "edp", "ep", "etp")
CP_IMPLS = ("allgather", "ring")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
EP_DISPATCH = ("auto", "padded", "ragged")


class LayoutError(ValueError):
  """A parallel layout that does not fit the devices or the model."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """Parallel sizes and how the step uses them (the `parallel` config section).

  `dp=0` fills the devices the other sizes leave; `etp=0` means etp = tp (Megatron's default).
  """

  dp: int = 0
  tp: int = 1
  cp: int = 1
  pp: int = 1
  ep: int = 1
  etp: int = 0
  fsdp: bool = False  # ZeRO-3: parameters sharded over the data axes, gathered per use
  distributed_optimizer: bool = False  # ZeRO-1: master weights and moments sharded over them
  microbatches: int = 1
  schedule: str = "1f1b"  # pipeline schedule (pp > 1): gpipe, 1f1b, interleaved
  virtual_stages: int = 1  # model chunks per pipeline stage (interleaved / circular)
  cp_impl: str = "allgather"  # context-parallel attention: all-gather KV, or a ring
  cp_load_balance: bool = True  # causal load balancing: chunk i pairs with chunk 2cp-1-i
  ep_dispatch: str = "auto"  # EP exchange: padded all_to_all, ragged_all_to_all, auto

  @classmethod
  def from_config(cls, c: Mapping[str, Any] | Any) -> "Layout":
    """From a dict or ConfigDict with any of the field names (unknown keys are an error)."""
    d = dict(c.items()) if hasattr(c, "items") else dict(vars(c))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise LayoutError(f"parallel: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**d)

  def resolve(self, n_devices: int) -> "Layout":
    """Fills dp and etp, and checks the sizes against `n_devices` (see `check_devices`)."""
    for name in ("tp", "cp", "pp", "ep", "microbatches", "virtual_stages"):
      if getattr(self, name) < 1:
        raise LayoutError(f"parallel.{name}={getattr(self, name)} must be >= 1")
    if self.dp < 0 or self.etp < 0:
      raise LayoutError(f"parallel.dp={self.dp}, etp={self.etp} must be >= 0 (0: derived)")
    for name, allowed in (("cp_impl", CP_IMPLS), ("schedule", SCHEDULES),
                          ("ep_dispatch", EP_DISPATCH)):
      if getattr(self, name) not in allowed:
        raise LayoutError(f"parallel.{name}={getattr(self, name)!r}, expected one of {allowed}")
    if self.schedule == "interleaved" and self.virtual_stages < 2:
      raise LayoutError(f"parallel.schedule='interleaved' needs parallel.virtual_stages >= 2, "
                        f"got {self.virtual_stages}")
    if self.schedule == "1f1b" and self.virtual_stages > 1:
      raise LayoutError(f"parallel.virtual_stages={self.virtual_stages} with schedule='1f1b': "
                        "use schedule='interleaved' (or 'gpipe') for virtual stages")
    if self.fsdp and self.distributed_optimizer:
      raise LayoutError("parallel.fsdp and parallel.distributed_optimizer: fsdp already shards "
                        "the optimizer state; set one of them")
    dp = self.dp
    if dp == 0:
      model = self.pp * self.cp * self.tp
      if n_devices % model:
        raise LayoutError(f"{n_devices} devices are not divisible by pp*cp*tp = "
                          f"{self.pp}*{self.cp}*{self.tp} = {model}")
      dp = n_devices // model
    out = dataclasses.replace(self, dp=dp, etp=self.etp or self.tp)
    out.check_devices(n_devices)
    return out

  def check_devices(self, n_devices: int) -> None:
    pp, dp, cp, tp, ep, etp = self.pp, self.dp, self.cp, self.tp, self.ep, self.etp
    if pp * dp * cp * tp != n_devices:
      raise LayoutError(f"pp*dp*cp*tp = {pp}*{dp}*{cp}*{tp} = {pp * dp * cp * tp} != "
                        f"{n_devices} devices")
    stage = n_devices // pp
    if stage % (ep * etp):
      raise LayoutError(f"tp*cp*dp = {tp}*{cp}*{dp} = {stage} devices per stage are not "
                        f"divisible by etp*ep = {etp}*{ep} = {etp * ep}, so no edp makes "
                        f"etp*ep*edp == tp*cp*dp")
    _base_axes(self)  # raises when the two factorisations do not nest

  @property
  def edp(self) -> int:
    return (self.dp * self.cp * self.tp) // (self.ep * self.etp)

  @property
  def stage_size(self) -> int:
    return self.dp * self.cp * self.tp

  @property
  def n_devices(self) -> int:
    return self.pp * self.stage_size

  def sizes(self) -> dict[str, int]:
    return dict(pp=self.pp, dp=self.dp, cp=self.cp, tp=self.tp, edp=self.edp, ep=self.ep,
                etp=self.etp)

  def __str__(self) -> str:
    s = self.sizes()
    extra = "-fsdp" if self.fsdp else "-zero1" if self.distributed_optimizer else ""
    sched = ""
    if self.pp > 1:
      sched = f"|{self.schedule}" + (f"-v{self.virtual_stages}" if self.virtual_stages > 1
                                     else "")
    return (f"pp{s['pp']}-dp{s['dp']}-cp{s['cp']}-tp{s['tp']}|edp{s['edp']}-ep{s['ep']}-"
            f"etp{s['etp']}{extra}|mb{self.microbatches}{sched}")


def check_model(layout: Layout, cfg, seq_len: int | None = None,
                batch: int | None = None) -> None:
  """Checks that a resolved `layout` fits model config `cfg` (and a batch shape if given)."""
  tp, cp, pp, ep, etp = layout.tp, layout.cp, layout.pp, layout.ep, layout.etp

  def need(ok: bool, msg: str):
    if not ok:
      raise LayoutError(f"layout {layout}: {msg}")

  need(cfg.n_heads % tp == 0, f"n_heads={cfg.n_heads} is not divisible by tp={tp}")
  need(cfg.n_kv_heads % tp == 0 or tp % cfg.n_kv_heads == 0,
       f"n_kv_heads={cfg.n_kv_heads} and tp={tp}: one must divide the other "
       f"(kv heads are sharded when tp divides them, replicated when they divide tp)")
  need(cfg.padded_vocab % tp == 0,
       f"vocab_size={cfg.vocab_size} padded to {cfg.padded_vocab} (vocab_multiple="
       f"{cfg.vocab_multiple}) is not divisible by tp={tp}")
  need(cfg.qk_norm != "full" or cfg.n_kv_heads % tp == 0,
       f"qk_norm='full' normalises over all kv heads, so tp={tp} must divide "
       f"n_kv_heads={cfg.n_kv_heads}")
  need(cfg.d_ff % tp == 0, f"d_ff={cfg.d_ff} is not divisible by tp={tp}")
  chunks = pp * layout.virtual_stages
  need(cfg.n_layers % chunks == 0,
       f"n_layers={cfg.n_layers} is not divisible by pp*virtual_stages = {pp}*"
       f"{layout.virtual_stages}")
  per = cfg.n_layers // chunks
  kinds = [tuple(cfg.is_moe_layer(c * per + j) for j in range(per)) for c in range(chunks)]
  need(all(k == kinds[0] for k in kinds),
       f"pipeline chunks must hold the same layer kinds; MoE pattern per chunk {kinds}")
  if pp > 1 and layout.virtual_stages > 1:
    need(layout.microbatches % pp == 0,
         f"virtual_stages={layout.virtual_stages} needs microbatches={layout.microbatches} "
         f"to be a multiple of pp={pp}")
  if cfg.is_moe:
    need(cfg.n_experts % ep == 0, f"n_experts={cfg.n_experts} is not divisible by ep={ep}")
    need(cfg.effective_d_ff_expert % etp == 0,
         f"d_ff_expert={cfg.effective_d_ff_expert} is not divisible by etp={etp}")
    if cfg.n_shared_experts:
      shared = cfg.n_shared_experts * cfg.effective_d_ff_shared
      need(shared % tp == 0, f"shared expert width {shared} is not divisible by tp={tp}")
  if layout.fsdp:
    data = layout.dp * cp
    need(cfg.d_model % data == 0,
         f"fsdp: d_model={cfg.d_model} is not divisible by dp*cp={layout.dp}*{cp}")
    if cfg.is_moe:
      need(cfg.d_model % layout.edp == 0,
           f"fsdp: d_model={cfg.d_model} is not divisible by edp={layout.edp}")
  if seq_len is not None:
    chunks = 2 * cp if (cp > 1 and layout.cp_load_balance) else cp
    need(seq_len % (chunks * tp) == 0,
         f"sequence length {seq_len} is not divisible by {'2*' if chunks != cp else ''}cp*tp"
         f" = {chunks * tp} (context parallel chunks x sequence-parallel shards)")
  if batch is not None:
    mb = layout.microbatches
    need(batch % (layout.dp * mb) == 0,
         f"batch {batch} is not divisible by dp*microbatches = {layout.dp}*{mb}")


@dataclasses.dataclass(frozen=True)
class BaseAxis:
  name: str
  size: int
  attn: str  # the attention axis (dp, cp or tp) this base axis is part of
  moe: str  # the MoE axis (edp, ep or etp) this base axis is part of


def _base_axes(layout: Layout) -> list[BaseAxis]:
  """The common refinement of (dp, cp, tp) and (edp, ep, etp), slowest axis first."""
  tp, cp, n = layout.tp, layout.cp, layout.stage_size
  etp, ep = layout.etp, layout.ep
  # Cumulative size -> the axis (of size > 1) that ends there, fastest axis first.
  attn = {c: a for c, a, size in ((tp, "tp", tp), (tp * cp, "cp", cp), (n, "dp", layout.dp))
          if size > 1}
  moe = {c: a for c, a, size in ((etp, "etp", etp), (etp * ep, "ep", ep),
                                 (n, "edp", layout.edp)) if size > 1}
  chain = sorted({1, *attn, *moe})
  for lo, hi in zip(chain, chain[1:]):
    if hi % lo:
      raise LayoutError(
          f"layout {layout}: attention (dp={layout.dp}, cp={cp}, tp={tp}) and MoE "
          f"(edp={layout.edp}, ep={ep}, etp={etp}) do not nest: cumulative sizes "
          f"{sorted(set(attn))} and {sorted(set(moe))} do not form a divisibility chain "
          f"({lo} does not divide {hi}), so no single mesh can hold both views")
  axes = []
  for lo, hi in zip(chain, chain[1:]):
    a = next(attn[c] for c in sorted(attn) if c >= hi)
    m = next(moe[c] for c in sorted(moe) if c >= hi)
    axes.append(BaseAxis(f"{a}_{m}", hi // lo, a, m))
  return axes[::-1]


def base_axes(layout: Layout) -> tuple[BaseAxis, ...]:
  """The mesh axes (after `pp`) of a resolved layout, slowest first."""
  return tuple(_base_axes(layout))


def device_mesh(layout: Layout, devices) -> Mesh:
  """The folded mesh of a resolved `layout` over `devices` (any device objects: local,
  multi-process, or a deviceless topology's), axes `pp` then the base axes."""
  devices = np.asarray(devices).reshape(-1)
  layout.check_devices(len(devices))
  base = base_axes(layout)
  names = ("pp",) + tuple(b.name for b in base)
  shape = (layout.pp,) + tuple(b.size for b in base)
  return Mesh(devices.reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))
