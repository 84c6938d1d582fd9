"""The train state's stacked layers -> one array per layer, on the devices that hold them.

A checkpoint stores the model's logical tree (`layers.{i}`, any layout can read it), while the
train state stacks the layers by pipeline stage (`esjax.parallel.stages`): leaf [pp, v, R, ...]
split over the mesh. Converting with `stages.unstack` under jit would gather every layer onto
every stage; `split` stays on the devices that hold the data: layer (s, r, j) of a stacked
leaf becomes an array on the sub-mesh of the devices that hold it (the mesh with the axes
that split dims 0-2 fixed at its block), sharded over the rest like the stacked leaf's
trailing dims; each device slices its own shard, and no data crosses devices or hosts.
Trees are walked wherever a dict holds the `stages` key, so an optimizer state's moments
convert with the parameters. Reading back into any layout: `esjax.train.shard_reader`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esjax.parallel import stages


def _entries(spec: P, ndim: int) -> list[tuple[str, ...]]:
  out = []
  for e in tuple(spec) + (None,) * (ndim - len(spec)):
    out.append(() if e is None else (e,) if isinstance(e, str) else tuple(e))
  return out


def layer_sharding(sharding: NamedSharding, shape: tuple[int, ...], pos: tuple[int, ...]
                   ) -> NamedSharding:
  """Where stacked position `pos` (dims 0-2) of an array of `shape` placed by `sharding`
  lives: the sub-mesh whose coordinates on the axes splitting dims 0-2 select `pos`'s block,
  split over the trailing dims as the stacked array is."""
  if not isinstance(sharding, NamedSharding):  # e.g. a state built on one device
    if not sharding.is_fully_replicated:
      raise ValueError(f"cannot place the layers of an array sharded by {sharding}: expected a "
                       "NamedSharding or a replicated array")
    devices = np.asarray(sorted(sharding.device_set, key=lambda d: d.id))
    return NamedSharding(Mesh(devices, ("replica",)), P())
  mesh, entries = sharding.mesh, _entries(sharding.spec, len(shape))
  fixed: dict[str, int] = {}
  for dim in range(len(pos)):
    axes = entries[dim]
    block = pos[dim] // (shape[dim] // math.prod(mesh.shape[a] for a in axes))
    for a in reversed(axes):  # the first axis is the major one
      fixed[a], block = block % mesh.shape[a], block // mesh.shape[a]
  names = tuple(a for a in mesh.axis_names if a not in fixed)
  devices = mesh.devices[tuple(fixed.get(a, slice(None)) for a in mesh.axis_names)]
  types = tuple(t for a, t in zip(mesh.axis_names, mesh.axis_types) if a not in fixed)
  sub = Mesh(np.asarray(devices).reshape([mesh.shape[a] for a in names]), names,
             axis_types=types)
  return NamedSharding(sub, P(*(e or None for e in entries[len(pos):])))


def _start(index: tuple[slice, ...], dim: int) -> int:
  return index[dim].start or 0


def _split_leaf(x: jax.Array) -> np.ndarray:
  """Stacked leaf -> [pp, v, R] (object) of each layer's array on the devices that hold it."""
  shards = {s.device: s for s in x.addressable_shards}
  out = np.empty(x.shape[:3], object)
  for pos in np.ndindex(x.shape[:3]):
    sharding = layer_sharding(x.sharding, x.shape, pos)
    pieces = []
    for device in sharding.addressable_devices:
      shard = shards[device]
      local = tuple(p - _start(shard.index, d) for d, p in enumerate(pos))
      pieces.append(shard.data[local])
    out[pos] = jax.make_array_from_single_device_arrays(x.shape[3:], sharding, pieces,
                                                        dtype=x.dtype)
  return out


def map_stacked(fn: Callable[[dict[str, Any]], Any], tree: Any) -> Any:
  """`tree` with every dict that holds the `stages` key replaced by `fn(dict)` (the
  parameters, and the optimizer moments shaped like them)."""
  if isinstance(tree, dict):
    if stages.STAGES in tree:
      return fn(tree)
    return {k: map_stacked(fn, v) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple (optax states)
    return type(tree)(*(map_stacked(fn, v) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(map_stacked(fn, v) for v in tree)
  return tree


def has_process_local_layers(params: dict[str, Any]) -> bool:
  """Whether, in a run of several processes, some layer of the stacked `params` lies on the
  devices of one process only (each pipeline stage on its own host, say; the same answer on
  every process): orbax writes only arrays that span processes, so such a state is saved
  stacked."""
  if jax.process_count() == 1:
    return False
  return any(len({d.process_index for d in
                  layer_sharding(x.sharding, x.shape, pos).device_set}) == 1
             for x in jax.tree.leaves(params[stages.STAGES]) for pos in np.ndindex(x.shape[:3]))


def split(tree: Any, fmt: stages.StageFormat) -> Any:
  """The state's stacked dicts -> the model's own trees (layers keyed "0", "1", ... as
  checkpoints store them) of arrays on the devices that hold them: `stages.unstack` of the
  per-position arrays `_split_leaf` makes."""

  def one(stacked):
    slots = {p: stages.map_dicts(_split_leaf, t) for p, t in stacked[stages.STAGES].items()}
    return str_layers(stages.unstack({**stacked, stages.STAGES: slots}, fmt))

  return map_stacked(one, tree)


def str_layers(tree: dict[str, Any]) -> dict[str, Any]:
  """The model's tree with its layers keyed "0", "1", ... as checkpoints store them."""
  if stages.LAYERS not in tree:
    return tree
  return {**tree, stages.LAYERS: {str(i): v for i, v in tree[stages.LAYERS].items()}}


def int_layers(tree: dict[str, Any]) -> dict[str, Any]:
  """`str_layers` undone: the layers keyed 0, 1, ... in order."""
  if stages.LAYERS not in tree:
    return tree
  layers = {int(i): v for i, v in tree[stages.LAYERS].items()}
  return {**tree, stages.LAYERS: dict(sorted(layers.items()))}
