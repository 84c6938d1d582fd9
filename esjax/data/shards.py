"""A prepared corpus on disk: token shards, their document index, and the manifest.

    DIR/manifest.json      written last (atomically): a directory that has one is complete
    DIR/shard_00000.bin    token ids, document after document, each ending with eos_id;
                           little-endian uint16 when the vocabulary has <= 65536 ids, else uint32
    DIR/shard_00000.idx    int64 [documents + 1]: where each document starts, then the end
    DIR/shard_00000.json   the shard's record, written once its .bin and .idx are complete
    DIR/plan.json          what `esjax.data.prepare` was asked to do (for resuming)

A shard record holds `name`, `tokens`, `documents`, `bin_bytes`, `idx_bytes`, `idx_crc32`
and `block_crc32`: the CRC-32 of every `block_bytes` (1 MiB) block of the .bin. The
manifest holds `format`, `tokenizer` (`spec`, `fingerprint`, `vocab_size`, `eos_id`),
`dtype`, `tokens`, `documents`, `text_field`, `sources` (inputs and their sizes),
`block_bytes` and `shards` (the records, in corpus order).

Reading (`Corpus`) is by positioned reads (`os.preadv`) straight into the batch buffer:
random access through the kernel's page cache, like a memory map, but without mapping the
touched pages into the process (a map's resident size grows to the whole corpus within an
epoch of random windows). It never trusts a byte it has not checked, without reading the
whole corpus at start: opening checks every shard's file sizes against the manifest (a
`stat` each, and one listing: `check_manifest`), an index is checked (CRC) whenever it is
read, and a token block (CRC, and its ids below the manifest's vocabulary) the first time a
read touches it. A truncated or corrupt shard, or a manifest that disagrees with the files,
is a one-line ValueError naming the file, raised before any of its tokens reach a batch.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import numpy as np

FORMAT = "esjax.tokens/1"
MANIFEST = "manifest.json"
BLOCK_BYTES = 1 << 20
DTYPES = ("<u2", "<u4")  # what `token_dtype` gives


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int) -> str:
  return f"shard_{index:05d}"


def write_json(path: str, obj: Any) -> None:
  """Atomically: a reader sees the old file or the new one, never a part."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def is_prepared(directory: str) -> bool:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return False
  try:
    return read_json(path).get("format") == FORMAT
  except (ValueError, AttributeError):
    return False


class ShardWriter:
  """Writes one shard under temporary names; `finish()` renames it into place and returns
  its record (after which the shard counts as done)."""

  def __init__(self, directory: str, index: int, dtype: np.dtype):
    self.directory, self.name, self.dtype = directory, shard_name(index), np.dtype(dtype)
    self._path = os.path.join(directory, self.name)
    self._bin = open(f"{self._path}.bin.tmp", "wb")
    self._ends = [np.zeros(1, np.int64)]
    self._tokens = 0
    self._crcs: list[int] = []
    self._crc, self._fill = 0, 0

  def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
    """Appends documents: `tokens` concatenated (each with its eos), `doc_lengths` theirs."""
    if int(np.sum(doc_lengths)) != len(tokens):
      raise ValueError("ShardWriter.add: document lengths do not add up to the tokens")
    self._write(np.ascontiguousarray(tokens, self.dtype).tobytes())
    self._ends.append(self._tokens + np.cumsum(doc_lengths, dtype=np.int64))
    self._tokens += len(tokens)

  def _write(self, data: bytes) -> None:
    self._bin.write(data)
    view = memoryview(data)
    while len(view):
      n = min(BLOCK_BYTES - self._fill, len(view))
      self._crc = zlib.crc32(view[:n], self._crc)
      self._fill += n
      view = view[n:]
      if self._fill == BLOCK_BYTES:
        self._crcs.append(self._crc)
        self._crc, self._fill = 0, 0

  def finish(self, **extra: Any) -> dict[str, Any]:
    """Completes the shard; `extra` entries join its record."""
    if self._fill:
      self._crcs.append(self._crc)
    self._bin.flush()
    os.fsync(self._bin.fileno())
    self._bin.close()
    idx = np.concatenate(self._ends).astype("<i8").tobytes()
    with open(f"{self._path}.idx.tmp", "wb") as f:
      f.write(idx)
      f.flush()
      os.fsync(f.fileno())
    record = {"name": self.name, "tokens": self._tokens, "documents": len(idx) // 8 - 1,
              "bin_bytes": self._tokens * self.dtype.itemsize, "idx_bytes": len(idx),
              "idx_crc32": zlib.crc32(idx), "block_crc32": self._crcs, **extra}
    os.replace(f"{self._path}.bin.tmp", f"{self._path}.bin")
    os.replace(f"{self._path}.idx.tmp", f"{self._path}.idx")
    write_json(f"{self._path}.json", record)
    return record


def write_manifest(directory: str, header: dict[str, Any], records: list[dict[str, Any]]
                   ) -> dict[str, Any]:
  """Completes a prepared directory: `header` (`tokenizer`, `dtype`, `text_field`,
  `sources`) plus the totals and the shard `records` in corpus order."""
  manifest = {"format": FORMAT, **header,
              "tokens": sum(r["tokens"] for r in records),
              "documents": sum(r["documents"] for r in records),
              "block_bytes": BLOCK_BYTES, "shards": records}
  write_json(os.path.join(directory, MANIFEST), manifest)
  return manifest


def shard_is_done(directory: str, name: str, inputs: str) -> dict[str, Any] | None:
  """The record of a finished shard made from `inputs` (a digest) whose files have the
  recorded sizes, else None."""
  path = os.path.join(directory, name)
  try:
    record = read_json(f"{path}.json")
    if (record.get("inputs") == inputs and os.path.getsize(f"{path}.bin") == record["bin_bytes"]
        and os.path.getsize(f"{path}.idx") == record["idx_bytes"]):
      return record
  except (OSError, ValueError, KeyError, TypeError):
    pass
  return None


def check_manifest(directory: str, manifest: dict[str, Any]) -> None:
  """Refuses, in one line naming the file and the field, a manifest that disagrees with the
  files beside it: a dtype not in DTYPES or too narrow for the vocabulary, a shard file whose
  size is not its recorded size, its tokens x dtype size or (documents + 1) x 8, a CRC list
  that does not cover the blocks, totals that are not the shards' sums, an unlisted shard."""
  path = os.path.join(directory, MANIFEST)

  def need(ok: bool, what: str) -> None:
    if not ok:
      raise ValueError(f"{what}; prepare {directory} again")

  try:
    dtype, vocab = manifest["dtype"], int(manifest["tokenizer"]["vocab_size"])
    need(dtype in DTYPES, f"{path}: dtype={dtype!r}, expected one of {DTYPES}")
    size = np.dtype(dtype).itemsize
    need(0 < vocab <= 1 << 8 * size,
         f"{path}: tokenizer.vocab_size={vocab} does not fit dtype={dtype!r}")
    block, shards = int(manifest["block_bytes"]), manifest["shards"]
    need(block > 0 and block % size == 0, f"{path}: block_bytes={block}")
    for s in shards:
      for ext, key, field, want in ((".bin", "bin_bytes", "tokens", s["tokens"] * size),
                                    (".idx", "idx_bytes", "documents", (s["documents"] + 1) * 8)):
        file = os.path.join(directory, s["name"] + ext)
        got = os.path.getsize(file) if os.path.exists(file) else None
        need(got == s[key], f"data shard {file} has {'no file' if got is None else got} bytes "
             f"but {MANIFEST} says {s[key]}: it is missing, truncated or was changed")
        need(got == want, f"data shard {file} has {got} bytes but {MANIFEST} says "
             f"{field}={s[field]} ({want} bytes)")
      n_blocks = -(-s["bin_bytes"] // block)
      need(len(s["block_crc32"]) == n_blocks, f"data shard {directory}/{s['name']}.bin has "
           f"{n_blocks} blocks but {MANIFEST} lists {len(s['block_crc32'])} block_crc32")
    for key in ("tokens", "documents"):
      total = sum(int(s[key]) for s in shards)
      need(manifest[key] == total, f"{path}: {key}={manifest[key]} but its shards hold {total}")
    listed = {s["name"] + ".bin" for s in shards}
    extra = sorted(f for f in os.listdir(directory)
                   if f.startswith("shard_") and f.endswith(".bin") and f not in listed)
    need(not extra, f"data shard {os.path.join(directory, extra[0]) if extra else ''} is not "
         f"listed in {MANIFEST}")
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: malformed ({type(e).__name__}: {e}); prepare {directory} again"
                     ) from None


class Corpus:
  """A prepared directory, opened for reading (see the module docstring for its checks)."""

  def __init__(self, directory: str, keep_alive: Any = None):
    self._files: dict[int, int] = {}  # shard -> open file descriptor
    self.directory = directory
    self.keep_alive = keep_alive  # e.g. the temporary directory holding this corpus
    path = os.path.join(directory, MANIFEST)
    if not is_prepared(directory):
      raise ValueError(f"{directory!r} is not a prepared corpus: no {MANIFEST} of format "
                       f"{FORMAT!r} (python -m esjax.data.prepare writes one)")
    self.manifest = read_json(path)
    check_manifest(directory, self.manifest)
    self.dtype = np.dtype(self.manifest["dtype"])
    self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
    self.block_bytes = int(self.manifest["block_bytes"])
    self.shards = self.manifest["shards"]
    self._checked = [np.zeros(len(s["block_crc32"]), bool) for s in self.shards]

  @property
  def n_tokens(self) -> int:
    return int(self.manifest["tokens"])

  def _corrupt(self, file: str, what: str, got: int, want: int) -> ValueError:
    return ValueError(f"data shard {file} is corrupt: {what} has CRC-32 {got:08x} but "
                      f"{MANIFEST} says {want:08x}; prepare {self.directory} again")

  def doc_offsets(self, s: int) -> np.ndarray:
    """Shard `s`'s document boundaries, int64 [documents + 1] (checked on every call)."""
    file = os.path.join(self.directory, self.shards[s]["name"] + ".idx")
    with open(file, "rb") as f:
      data = f.read()
    crc = zlib.crc32(data)
    if crc != self.shards[s]["idx_crc32"]:
      raise self._corrupt(file, "the document index", crc, self.shards[s]["idx_crc32"])
    return np.frombuffer(data, "<i8").astype(np.int64)

  def _file(self, s: int) -> int:
    if s not in self._files:
      self._files[s] = os.open(self._bin_path(s), os.O_RDONLY)
    return self._files[s]

  def _bin_path(self, s: int) -> str:
    return os.path.join(self.directory, self.shards[s]["name"] + ".bin")

  def _pread(self, s: int, out: np.ndarray, offset: int) -> None:
    if os.preadv(self._file(s), [out], offset) != out.nbytes:
      raise ValueError(f"data shard {self._bin_path(s)} ends before byte {offset + out.nbytes}"
                       f": it was truncated while in use; prepare {self.directory} again")

  def close(self) -> None:
    for fd in self._files.values():
      os.close(fd)
    self._files.clear()

  def __del__(self):
    self.close()

  def _check_blocks(self, s: int, blocks: np.ndarray) -> None:
    """Checks the blocks of shard `s` not checked before (each once per Corpus)."""
    checked = self._checked[s]
    todo = blocks[~checked[blocks]]
    for b in np.unique(todo).tolist():
      size = min(self.block_bytes, self.shards[s]["bin_bytes"] - b * self.block_bytes)
      data = np.empty(size, np.uint8)
      self._pread(s, data, b * self.block_bytes)
      crc, want = zlib.crc32(data), self.shards[s]["block_crc32"][b]
      if crc != want:
        raise self._corrupt(self._bin_path(s), f"block {b} (bytes from "
                            f"{b * self.block_bytes})", crc, want)
      top = int(data.view(self.dtype).max(initial=0))
      if top >= self.vocab_size:
        raise ValueError(f"data shard {self._bin_path(s)} holds token id {top} (block {b}) but "
                         f"{MANIFEST} says tokenizer.vocab_size={self.vocab_size}; prepare "
                         f"{self.directory} again")
      checked[b] = True

  def _blocks(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Every block that token ranges [starts, stops) touch."""
    size = self.dtype.itemsize
    first = starts * size // self.block_bytes
    last = (stops * size - 1) // self.block_bytes
    every = first[:, None] + np.arange(int((last - first).max(initial=0)) + 1)[None]
    return np.unique(every[every <= last[:, None]])

  def read(self, s: int, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of shard `s` (checked), in the corpus dtype."""
    out = np.empty(max(stop - start, 0), self.dtype)
    if len(out):
      self._check_blocks(s, self._blocks(np.array([start]), np.array([stop])))
      self._pread(s, out, start * self.dtype.itemsize)
    return out

  def read_rows(self, shards: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """int32 [n, length]: row i is tokens [starts[i], starts[i] + length) of shards[i]."""
    shards, starts = np.asarray(shards, np.int64), np.asarray(starts, np.int64)
    for s in np.unique(shards).tolist():
      if not self._checked[s].all():
        here = shards == s
        self._check_blocks(s, self._blocks(starts[here], starts[here] + length))
    rows = np.empty((len(starts), length), self.dtype)
    size = self.dtype.itemsize
    for i, (s, a) in enumerate(zip(shards.tolist(), starts.tolist())):
      self._pread(s, rows[i], a * size)
    return rows.astype(np.int32)
