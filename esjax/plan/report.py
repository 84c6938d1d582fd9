"""Communication report: the collectives of a compiled step, per (op, mesh axes).

For every collective in the compiled HLO (all-reduce, all-gather, reduce-scatter, all-to-all,
ragged-all-to-all, collective-permute) the report finds the mesh axes its device groups span
and the bytes it moves, multiplied by how many times it runs per step: the trip counts of the
loops around it, and for a conditional whose op name ends in a scope listed in
`branch_weights` (the pipeline engine's `lax.cond`s), the share of executions that take its
true branch. Bytes are per device and per step under a ring model: all-reduce 2(n-1)/n *
size, all-gather and all-to-all (n-1)/n * result, reduce-scatter (n-1) * result,
collective-permute the buffer for a device that sends to another one. A ragged all-to-all
moves a data-dependent number of rows: its bytes are the operand's (an upper bound) and the
row says so (`bound`). Mesh axes are the folded base axes (`dp_edp`, `tp_ep`, ...), each named
after its attention and its MoE role, which is what shows where a folded layout saves
traffic.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from esjax.plan import hlo as hlo_lib

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "ragged-all-to-all", "all-to-all",
               "collective-permute")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*?) ("
                    + "|".join(COLLECTIVES) + r")(-start)?\((.*)$")


@dataclasses.dataclass
class Collective:
  op: str
  axes: tuple[str, ...]
  count: float
  bytes: float  # per device, per step
  bound: bool = False  # bytes are an upper bound (ragged all-to-all)


def _iota(spec: str) -> np.ndarray:
  """`[a,b]<=[d1,d2]T(1,0)` -> device ids shaped [a, b]; `[d1,d2]T(1,0)` -> ids, flat."""
  m = re.match(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", spec)
  if m is None:
    raise ValueError(f"unrecognised iota device list {spec!r}")
  shape = [int(x) for x in m.group(1).split(",")]
  dims = [int(x) for x in m.group(2).split(",")] if m.group(2) else shape
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(3):
    ids = ids.transpose([int(x) for x in m.group(3).split(",")])
  return ids.reshape(shape) if m.group(2) else ids.reshape(-1)


def _groups(attrs: str, n_devices: int) -> list[list[int]]:
  """Device groups of a collective from its HLO attributes (every format XLA prints)."""
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
  if m:
    pairs = [tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)", m.group(0))]
    return [list(p) for p in pairs if p[0] != p[1]]
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((\[[\d,]+\](?:<=\[[\d,]+\])?"
                r"(?:T\([\d,]+\))?)\))? \{([^}]*)\}", attrs)
  if m:
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    ids = _iota(m.group(2)).reshape(-1) if m.group(2) else np.arange(math.prod(sizes))
    ids = ids.reshape(sizes)
    grouped = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(3))]
    rest = [i for i in range(len(names)) if i not in grouped]
    ids = ids.transpose(rest + grouped)
    return ids.reshape(-1, math.prod(sizes[i] for i in grouped) if grouped else 1).tolist()
  m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
  if m:
    return _iota(m.group(1)).tolist()
  m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
  if m and m.group(1):
    return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
  return [list(range(n_devices))]


def _span(groups: list[list[int]], mesh_shape: tuple[int, ...],
          axis_names: tuple[str, ...]) -> tuple[str, ...]:
  """The mesh axes along which the members of the groups differ."""
  varying = set()
  for g in groups:
    coords = np.array(np.unravel_index(np.asarray(g), mesh_shape)).T
    varying |= {i for i in range(len(mesh_shape)) if len(set(coords[:, i])) > 1}
  return tuple(axis_names[i] for i in sorted(varying))


def _moved_sizes(shape_text: str, start: bool) -> list[int]:
  """Bytes of the buffers a collective produces: an async `-start` op's shape is a tuple
  (operands, results, context...); its results are the second element."""
  if start:
    parts = hlo_lib.top_level(shape_text)
    if len(parts) >= 2:
      return hlo_lib.shape_bytes(parts[1])
  return hlo_lib.shape_bytes(shape_text)


def _wire_bytes(op: str, sizes: list[int], n: int) -> float:
  size = float(sum(sizes))
  if n <= 1:
    return 0.0
  if op == "all-reduce":
    return 2 * (n - 1) / n * size
  if op == "reduce-scatter":
    return (n - 1) * size
  if op == "collective-permute":
    return size
  return (n - 1) / n * size  # all-gather, all-to-all, ragged all-to-all


def collectives(hlo: str, mesh_shape: tuple[int, ...], axis_names: tuple[str, ...],
                branch_weights: dict[str, float] | None = None) -> list[Collective]:
  """Collectives of compiled HLO text, summed per (op, mesh axes), largest bytes first."""
  n_devices = math.prod(mesh_shape)
  module = hlo_lib.Module.parse(hlo)
  mult, _ = module.multiplicities(branch_weights)
  total: dict[tuple[str, tuple[str, ...]], Collective] = {}
  for name, lines in module.comps.items():
    times = mult.get(name, 0.0)
    if not times:
      continue
    for line in lines:
      m = _INSTR.match(line)
      if m is None:
        continue
      _, shape_text, op, start, attrs = m.groups()
      groups = _groups(attrs, n_devices)
      if not groups:
        continue
      axes = _span(groups, mesh_shape, axis_names)
      n = 2 if op == "collective-permute" else max(len(g) for g in groups)
      moved = _wire_bytes(op, _moved_sizes(shape_text, bool(start)), n)
      if op == "collective-permute":  # share of devices that send
        moved *= len(groups) / n_devices
      key = (op, axes)
      c = total.setdefault(key, Collective(op, axes, 0.0, 0.0, op == "ragged-all-to-all"))
      c.count += times
      c.bytes += times * moved
  return sorted(total.values(), key=lambda c: -c.bytes)
