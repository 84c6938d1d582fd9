"""Reads a checkpoint item into a layout other than the one it was saved in, each device
reading only its own shard of each layer from the checkpoint's files.

A checkpoint (`esjax.train.checkpoint`) holds the layers one array per layer (`layers.{i}`)
or stacked by pipeline stage (leaves [pp, v, R, ...] as the writing run's `StageFormat`: a
multi-process run with a stage per host, or the earlier format). A run stacked another way
needs, on each device, pieces of several layers that are no block of any one saved array,
so orbax (which reads one block of each array per device) would need every layer read in
full on device and stacked there. Here each target array is built device by device
(`build`): for its block of stacked positions a device reads, per layer, that layer's saved
array (or position in a saved stack) sliced to its shard of the trailing dimensions,
straight from the item's tensorstore arrays (orbax writes each leaf as a zarr array in an
OCDBT database, named by its tree path joined with "."), stacks the pieces on the host and
puts the block on the device before the next is read: the host holds one block at a time.
The target is a stacked tree (`stages`) or the model's own tree (`layers.{i}`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import tensorstore as ts

from esjax.parallel import stages


def _name(key: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  raise TypeError(f"unexpected tree key {key!r}")


class _Arrays:
  """The item's saved arrays by name, opened once."""

  def __init__(self, item_dir: str):
    self._base = {"driver": "ocdbt", "base": f"file://{item_dir.rstrip('/')}/"}
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    self._open: dict[str, ts.TensorStore] = {}

  def __getitem__(self, name: str) -> ts.TensorStore:
    if name not in self._open:
      errors = []
      for driver in ("zarr", "zarr3"):
        try:
          self._open[name] = ts.open({"driver": driver, "kvstore": {**self._base, "path": name}},
                                     open=True, read=True, context=self._context).result()
          break
        except ValueError as e:
          errors.append(str(e).splitlines()[0])
      else:
        raise ValueError(f"checkpoint array {name!r} could not be opened ({'; '.join(errors)})")
    return self._open[name]


def read(item_dir: str, saved: stages.StageFormat | None, target: Any,
         fmt: stages.StageFormat | None = None) -> Any:
  """The item at `item_dir` (stacked as `saved`, or one array per layer when None) as
  `target` (abstract arrays with shardings: stacked as `fmt`, or the model's own tree)."""
  arrays = _Arrays(item_dir)
  where = None if saved is None else {
      int(saved.layer_index()[idx]): idx for idx in np.ndindex(saved.layer_index().shape)}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  out = []
  for path, leaf in leaves:
    names = [_name(k) for k in path]
    if stages.STAGES in names:
      i = names.index(stages.STAGES)
      index = fmt.layer_index()[int(names[i + 1])]
      read_block = _stacked_reader(arrays, names[:i], names[i + 2:], index, where)
    elif stages.LAYERS in names and names.index(stages.LAYERS) + 1 < len(names):
      i = names.index(stages.LAYERS)
      read_block = _layer_reader(arrays, names[:i], names[i + 2:], int(names[i + 1]), where)
    else:
      store = arrays[".".join(names)]
      read_block = lambda idx, store=store: store[idx].read().result()  # noqa: E731
    out.append(build(leaf, read_block))
  return jax.tree_util.tree_unflatten(treedef, out)


def build(leaf: jax.ShapeDtypeStruct, read_block) -> jax.Array:
  """`leaf`'s array from `read_block(index)`: each local device's block read once per
  distinct index (replicas share it) and put on the device before the next is read, so the
  host holds one block at a time (make_array_from_callback holds every local block until
  it builds the array)."""
  by_index: dict[str, list[Any]] = {}
  for device, idx in leaf.sharding.addressable_devices_indices_map(leaf.shape).items():
    by_index.setdefault(repr(idx), [idx]).append(device)
  pieces = []
  for idx, *devices in by_index.values():
    block = np.asarray(read_block(idx), leaf.dtype)
    pieces += [jax.device_put(block, d) for d in devices]
    jax.block_until_ready(pieces[-len(devices):])
    del block
  return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, pieces,
                                                  dtype=leaf.dtype)


def _source(prefix, inner, layer, where) -> tuple[str, tuple[int, ...]]:
  """(saved array name, position in it) of canonical `layer`'s leaf `inner`."""
  if where is None:
    return ".".join([*prefix, stages.LAYERS, str(layer), *inner]), ()
  p, s, r, j = where[layer]
  return ".".join([*prefix, stages.STAGES, str(p), *inner]), (s, r, j)


def _stacked_reader(arrays, prefix, inner, index, where):
  """Reads the block `idx` of a stacked target leaf whose positions hold layers `index`."""

  def read_block(idx):
    block = [range(*idx[d].indices(index.shape[d])) for d in range(3)]
    futures = []
    for pos in np.ndindex(*map(len, block)):
      layer = int(index[tuple(b[k] for b, k in zip(block, pos))])
      name, at = _source(prefix, inner, layer, where)
      futures.append(arrays[name][at + tuple(idx[3:])].read())
    pieces = [f.result() for f in futures]
    return np.stack(pieces).reshape(tuple(map(len, block)) + pieces[0].shape)

  return read_block


def _layer_reader(arrays, prefix, inner, layer: int, where):
  """Reads the block `idx` of one layer's leaf in the model's own tree."""
  name, at = _source(prefix, inner, layer, where)
  return lambda idx: arrays[name][at + tuple(idx)].read().result()
