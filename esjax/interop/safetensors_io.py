"""Hugging Face safetensors folders, read through memory maps and written as a stream.

A folder holds `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {name:
file}}). A safetensors file is an 8-byte little-endian header length, a JSON header {name:
{"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {"format": "pt"}} (which
transformers requires), then the tensors' bytes.

Reading parses only the headers; each tensor is a read-only `np.memmap`, so a slice of it
reads only its bytes (file-backed pages, released when the map is dropped). Writing lays out
every file from the tensors' shapes first, then streams each tensor's bytes in order: host
memory holds one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_METADATA = {"format": "pt"}
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where a tensor's bytes are: `file`, from byte `offset` (absolute), `nbytes` long."""
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int
  nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
  """The tensors of one safetensors file, from its header; ValueError for a damaged file."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n <= size - 8:
      raise ValueError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
    try:
      header = json.loads(f.read(n))
      entries = [(name, info["dtype"], tuple(int(x) for x in info["shape"]),
                  *(int(x) for x in info["data_offsets"]))
                 for name, info in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{path}: not a safetensors file (its {n}-byte header does not parse: "
                       f"{type(e).__name__}: {str(e)[:80]})") from None
  out = {}
  for name, dtype, shape, begin, end in entries:
    if dtype not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, expected one of "
                       f"{sorted(_DTYPES)}")
    if 8 + n + end > size:
      raise ValueError(f"{path}: tensor {name!r} ends at byte {8 + n + end} of a {size}-byte "
                       "file (truncated?)")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
      raise ValueError(f"{path}: tensor {name!r} spans bytes {begin}..{end}, but its shape "
                       f"{list(shape)} of {dtype} takes {nbytes}")
    out[name] = TensorInfo(path.name, np.dtype(_DTYPES[dtype]), shape, 8 + n + begin,
                           end - begin)
  return out


class SafetensorsFolder(Mapping[str, np.ndarray]):
  """Read-only mapping name -> `np.memmap` over a folder's safetensors files.

  Nothing is read until an array is sliced; `infos` has every tensor's dtype, shape and
  place from the headers alone.
  """

  def __init__(self, folder: str | os.PathLike):
    folder = Path(folder)
    if (folder / INDEX).is_file():
      weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not (folder / f).is_file()]
      if missing:
        raise FileNotFoundError(f"{folder / INDEX} names shards that do not exist: {missing}")
    elif (folder / SINGLE).is_file():
      files = [SINGLE]
    else:
      found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
      raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {folder} (it holds {found}); "
                              "esjax reads safetensors only")
    self.folder = folder
    self.infos: dict[str, TensorInfo] = {}
    for file in files:
      self.infos.update(read_header(folder / file))

  def __getitem__(self, name: str) -> np.ndarray:
    info = self.infos[name]
    if info.nbytes == 0:  # mmap cannot map 0 bytes
      return np.zeros(info.shape, info.dtype)
    return np.memmap(self.folder / info.file, info.dtype, "r", info.offset, info.shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self.infos)

  def __len__(self) -> int:
    return len(self.infos)

  # A context manager, like the files it stands for (the maps close when dropped).
  def __enter__(self) -> "SafetensorsFolder":
    return self

  def __exit__(self, *exc):
    return None


def _header_bytes(entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]]) -> bytes:
  header = {"__metadata__": _METADATA}
  for name, (dtype, shape, begin, end) in entries.items():
    header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [begin, end]}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
  return struct.pack("<Q", len(raw)) + raw


def shard_plan(specs: Iterable[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int
               ) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """`specs` (name, shape, dtype) cut, in order, into files of at most `max_shard_bytes`
  (a single larger tensor gets a file of its own)."""
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0")
  files: list[list] = [[]]
  size = 0
  for name, shape, dtype in specs:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append((name, tuple(shape), np.dtype(dtype)))
    size += nbytes
  return files


def file_names(n_files: int) -> list[str]:
  if n_files == 1:
    return [SINGLE]
  return [f"model-{k + 1:05d}-of-{n_files:05d}.safetensors" for k in range(n_files)]


def write_safetensors(specs: list[tuple[str, tuple[int, ...], np.dtype]],
                      arrays: Iterable[np.ndarray] | None, folder: str | os.PathLike,
                      max_shard_bytes: int, write: bool = True) -> list[str]:
  """Streams `arrays` (one per spec, in order) into safetensors files in `folder`; returns
  the names written (the index too when there is more than one file).

  `write=False` consumes `arrays` without writing (the processes of a multi-process export
  other than process 0 still take part in gathering each tensor). `arrays=None` writes the
  headers and sizes the files, whose tensors then read as zeros (sparse files on most file
  systems): a checkpoint's shape without its data, for memory plans. Files are mode 0644.
  """
  folder = Path(folder)
  plan = shard_plan(specs, max_shard_bytes)
  names = file_names(len(plan))
  arrays = None if arrays is None else iter(arrays)
  weight_map, total = {}, 0
  for name, tensors in zip(names, plan):
    entries, offset = {}, 0
    for t, shape, dtype in tensors:
      if t in weight_map:
        raise ValueError(f"tensor {t!r} written twice")
      nbytes = int(np.prod(shape)) * dtype.itemsize
      entries[t] = (dtype, shape, offset, offset + nbytes)
      weight_map[t] = name
      offset += nbytes
    total += offset
    out = open(folder / name, "wb") if write else None
    try:
      if out:
        out.write(_header_bytes(entries))
      if arrays is None:
        if out:
          out.truncate(out.tell() + offset)
        continue
      for t, shape, dtype in tensors:
        array = next(arrays)
        if array.shape != shape or array.dtype != dtype:
          raise AssertionError(f"tensor {t!r}: got {array.shape} {array.dtype}, planned "
                               f"{shape} {dtype}")
        if out:
          out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    finally:
      if out:
        out.close()
        os.chmod(folder / name, 0o644)
  if len(names) == 1:
    return names
  if write:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    os.chmod(folder / INDEX, 0o644)
  return names + [INDEX]
