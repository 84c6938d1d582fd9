"""Reading and writing Hugging Face safetensors folders with numpy (bf16 via ml_dtypes).

A folder holds `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {name:
file}}). Files carry metadata {"format": "pt"}, which transformers requires.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_METADATA = {"format": "pt"}


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
  """Lazy read-only mapping name -> numpy array over a folder's safetensors files.

  Only the tensor asked for is read (safetensors memory-maps the files). Use as a context
  manager, or call `close()`, to release the files.
  """

  def __init__(self, folder: str | os.PathLike):
    folder = Path(folder)
    if (folder / INDEX).is_file():
      weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
      missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
      if missing:
        raise FileNotFoundError(f"{folder / INDEX} names shards that do not exist: {missing}")
      self._file_of = dict(weight_map)
    elif (folder / SINGLE).is_file():
      with safetensors.safe_open(folder / SINGLE, framework="numpy") as f:
        self._file_of = {name: SINGLE for name in f.keys()}
    else:
      found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
      raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {folder} (it holds {found}); "
                              "esjax reads safetensors only")
    self._folder = folder
    self._handles: dict[str, object] = {}

  def __getitem__(self, name: str) -> np.ndarray:
    file = self._file_of[name]
    if file not in self._handles:
      self._handles[file] = safetensors.safe_open(self._folder / file, framework="numpy")
    return self._handles[file].get_tensor(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._file_of)

  def __len__(self) -> int:
    return len(self._file_of)

  def close(self):
    self._handles.clear()

  def __enter__(self) -> "SafetensorsCheckpoint":
    return self

  def __exit__(self, *exc):
    self.close()


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], folder: str | os.PathLike,
                      max_shard_bytes: int) -> list[str]:
  """Writes `tensors` (streamed) into `folder`; returns the file names written.

  One `model.safetensors` when everything fits in `max_shard_bytes`, otherwise shards of at
  most that size (a single larger tensor gets a shard of its own) plus the index.
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0")
  folder = Path(folder)
  parts: list[str] = []
  weight_map: dict[str, int] = {}
  shard: dict[str, np.ndarray] = {}
  shard_bytes = total = 0

  def flush():
    nonlocal shard, shard_bytes
    parts.append(f"part-{len(parts):05d}.safetensors")
    safetensors.numpy.save_file(shard, folder / parts[-1], metadata=_METADATA)
    shard, shard_bytes = {}, 0

  for name, array in tensors:
    if name in weight_map:
      raise ValueError(f"tensor {name!r} written twice")
    if shard and shard_bytes + array.nbytes > max_shard_bytes:
      flush()
    shard[name] = np.ascontiguousarray(array)
    weight_map[name] = len(parts)
    shard_bytes += array.nbytes
    total += array.nbytes
  if shard or not parts:
    flush()
  if len(parts) == 1:
    os.replace(folder / parts[0], folder / SINGLE)
    return [SINGLE]
  names = [f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors" for k in range(len(parts))]
  for part, name in zip(parts, names):
    os.replace(folder / part, folder / name)
  index = {"metadata": {"total_size": total},
           "weight_map": {t: names[k] for t, k in sorted(weight_map.items())}}
  (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
  return names + [INDEX]
