"""Communication report: compile one train step (without running it) and list its collectives.

  python -m esjax.parallel.report --config=esjax/configs/tiny.py --devices=8 \\
      --config.parallel.dp=2 --config.parallel.tp=4 --config.parallel.ep=8

For every collective in the compiled HLO (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute) the report finds the mesh axes its device groups span and the bytes it
moves, multiplied by the trip count of the loops around it (microbatches, pipeline steps),
and sums them per (op, mesh axes). Bytes are per device and per step under a ring model:
all-reduce 2(n-1)/n * size, all-gather and all-to-all (n-1)/n * result, reduce-scatter
(n-1) * result, collective-permute the buffer for a device that sends to another one. Mesh
axes are the folded base axes (`dp_edp`, `tp_ep`, ...): each is named after its attention
and its MoE role, which is what shows where a folded layout saves traffic.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Iterable

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*?) ("
                    + "|".join(COLLECTIVES) + r")(-start)?\((.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Collective:
  op: str
  axes: tuple[str, ...]
  count: float
  bytes: float  # per device, per step


def _shape_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _SHAPE.findall(text):
    size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    out.append(size * _DTYPE_BYTES.get(dtype, 1))
  return out


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


def _wire_bytes(op: str, sizes: list[int], n: int, start: bool) -> float:
  if start and op in ("all-gather", "collective-permute") and len(sizes) > 1:
    sizes = sizes[1:2]  # async tuple (operand, result, ...): the result
  size = float(sum(sizes))
  if n <= 1:
    return 0.0
  if op == "all-reduce":
    return 2 * (n - 1) / n * size
  if op == "reduce-scatter":
    return (n - 1) * size
  if op == "collective-permute":
    return size
  return (n - 1) / n * size  # all-gather, all-to-all


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  comps: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{") and "=" not in line[:3]:
      name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      current = name.lstrip("%")
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None and line.startswith("  "):
      comps[current].append(line)
  return comps, entry


def _multiplicities(comps: dict[str, list[str]], entry: str) -> dict[str, float]:
  """How many times each computation runs per call of the entry (loop trip counts)."""
  mult: dict[str, float] = collections.defaultdict(float)

  def visit(name: str, times: float, depth: int = 0):
    if depth > 64 or name not in comps:
      return
    mult[name] += times
    for line in comps[name]:
      trip = _TRIP.search(line)
      for kind, callee in _CALLS.findall(line):
        if kind == "to_apply":
          continue
        visit(callee, times * (int(trip.group(1)) if (trip and kind == "body") else 1),
              depth + 1)
      for branches in _BRANCHES.findall(line):
        for callee in re.findall(r"%?([\w.\-]+)", branches):
          visit(callee, times, depth + 1)

  visit(entry, 1.0)
  return mult


def collectives(hlo: str, mesh_shape: tuple[int, ...], axis_names: tuple[str, ...]
                ) -> list[Collective]:
  """Collectives of compiled HLO text, summed per (op, mesh axes), largest bytes first."""
  n_devices = math.prod(mesh_shape)
  comps, entry = _computations(hlo)
  mult = _multiplicities(comps, entry)
  total: dict[tuple[str, tuple[str, ...]], Collective] = {}
  for name, lines in comps.items():
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
      moved = _wire_bytes(op, _shape_bytes(shape_text), n, bool(start))
      if op == "collective-permute":  # share of devices that send
        moved *= len(groups) / n_devices
      key = (op, axes)
      c = total.setdefault(key, Collective(op, axes, 0.0, 0.0))
      c.count += times
      c.bytes += times * moved
  return sorted(total.values(), key=lambda c: -c.bytes)


def train_step_for(config: Any) -> dict[str, Any]:
  """The training loop's jitted train step for an esjax config, with what running it needs:
  `step`, abstract `state` and `batch` (with shardings), `layout`, `model_cfg`, `tx`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from esjax.configs import common  # pylint: disable=g-import-not-at-top
  from esjax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from esjax.train import optimizer, partition  # pylint: disable=g-import-not-at-top
  from esjax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top

  model_cfg = common.model_config(config)
  tc = config.train
  layout = partition.make_layout(config.parallel, model_cfg)
  if hasattr(layout, "fm"):
    mesh_lib.check_model(layout.layout, model_cfg, seq_len=tc.seq_len, batch=tc.batch_size)
  tx, schedule = optimizer.make_optimizer(config.optim, tc.steps)
  graphdef, abstract_params = state_lib.abstract_model(model_cfg)
  with layout.context():
    shapes = state_lib.abstract_train_state(model_cfg, tx)
    shardings = layout.state_shardings(shapes, abstract_params)
    state = state_lib.abstract_train_state(model_cfg, tx, shardings)
    batch_sh = layout.batch_sharding()
    batch = {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.int32, sharding=batch_sh)
             for k in ("inputs", "targets")}
    kwargs = {} if shardings is None else dict(in_shardings=(shardings, batch_sh),
                                                out_shardings=(shardings, None))
    step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule), donate_argnums=0,
                   **kwargs)
  return dict(step=step, state=state, batch=batch, layout=layout, model_cfg=model_cfg,
              shardings=shardings, tx=tx)


def lower_train_step(config: Any):
  """(compiled train step of the training loop, its Layout) for an esjax config."""
  parts = train_step_for(config)
  with parts["layout"].context():
    compiled = parts["step"].lower(parts["state"], parts["batch"]).compile()
  return compiled, parts["layout"]


def report(compiled: Any, layout: Any) -> list[Collective]:
  fm = getattr(layout, "fm", None)
  if fm is None:
    return []
  return collectives(compiled.as_text(), tuple(fm.mesh.devices.shape), fm.mesh.axis_names)


def format_table(rows: Iterable[Collective], title: str = "") -> str:
  rows = list(rows)
  lines = [title] if title else []
  lines.append(f"{'collective':<20}{'mesh axes':<34}{'count':>8}{'MiB/step':>12}")
  for c in rows:
    axes = ",".join(c.axes) or "-"
    lines.append(f"{c.op:<20}{axes:<34}{c.count:>8.0f}{c.bytes / 2**20:>12.3f}")
  lines.append(f"{'total':<62}{sum(c.bytes for c in rows) / 2**20:>12.3f}")
  return "\n".join(lines)


def _set_fake_devices(n: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str]) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  del app
  cfg_flag = config_flags.DEFINE_config_file("config", None, "esjax config file.",
                                             lock_config=True)
  devices = flags.DEFINE_integer("devices", 0, "Fake CPU devices to compile for (0: real).")
  as_json = flags.DEFINE_bool("json", False, "One JSON object per collective instead.")
  flags.FLAGS(argv)
  if devices.value:
    _set_fake_devices(devices.value)
  config = cfg_flag.value
  compiled, layout = lower_train_step(config)
  rows = report(compiled, layout)
  title = f"layout {getattr(layout, 'layout', 'single device')}; mesh " + (
      ", ".join(f"{a}={s}" for a, s in layout.fm.mesh.shape.items())
      if hasattr(layout, "fm") else "-")
  if as_json.value:
    for c in rows:
      print(json.dumps(dataclasses.asdict(c)))
  else:
    print(format_table(rows, title))


if __name__ == "__main__":
  try:
    main(sys.argv)
  except ValueError as e:
    sys.exit(f"esjax.parallel.report: error: {e}")
