"""Where the text comes from: the default corpus, or the user's files, directories and globs,
and how each input format yields documents.

A source spec is a comma-separated list. Each entry is `stdlib` (the default corpus), a file,
a directory (every non-hidden file below it, recursively) or a glob (`**` allowed). Files are
read in sorted path order, so the same inputs always give the same token stream.

Formats, by file name: `.jsonl` / `.ndjson` (optionally `.gz`): one document per line, the
JSON object's text field; `.parquet`: one document per row of the text column; a directory
that `datasets.Dataset.save_to_disk` wrote (its `state.json` lists Arrow files): one document
per row; anything else is UTF-8 text (undecodable bytes replaced), one document per file.

`pieces(files, piece_bytes)` cuts the inputs into units of work of about `piece_bytes`:
a JSONL file at line boundaries, a Parquet file at row groups, an Arrow file whole, text
files whole. Reading a piece is `documents(piece, text_field)`. Both are deterministic.

The default corpus is real text present on every Python install without a download: the
top-level `.py` modules of the running interpreter's standard library (code, comments and
docstrings; about 4.7 MB on CPython 3.11), in sorted order. It is identical on machines
with the same Python version.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import json
import os
import sysconfig
import zlib
from typing import Iterator, NamedTuple

DEFAULT_CORPUS = "stdlib"
HF_STATE = "state.json"


def stdlib_files() -> list[str]:
  """The default corpus: the standard library's top-level modules, sorted."""
  root = sysconfig.get_paths()["stdlib"]
  return sorted(glob.glob(os.path.join(root, "*.py")))


def is_hf_dataset(path: str) -> bool:
  """A directory written by `datasets.Dataset.save_to_disk`."""
  return os.path.isfile(os.path.join(path, HF_STATE)) and os.path.isfile(
      os.path.join(path, "dataset_info.json"))


def _expand(entry: str) -> list[str]:
  if entry == DEFAULT_CORPUS:
    return stdlib_files()
  path = os.path.expanduser(entry)
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    if is_hf_dataset(path):
      return [path]
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
      splits = sorted(d for d in os.listdir(path) if is_hf_dataset(os.path.join(path, d)))
      raise ValueError(f"data source {entry!r} is a saved DatasetDict: name one split's "
                       f"directory, one of {[os.path.join(entry, s) for s in splits]}")
    found = []
    for root, dirs, files in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(found)
  if glob.has_magic(path):
    matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if matches:
      return matches
  raise FileNotFoundError(f"data.source: {entry!r} is not a file, a directory or a glob that "
                          "matches any file")


def resolve_files(source: str) -> list[str]:
  """The files (and saved Hugging Face datasets) of a source spec, in reading order
  (duplicates read once)."""
  entries = [e.strip() for e in source.split(",") if e.strip()]
  if not entries:
    raise ValueError(f"data.source={source!r}: expected '{DEFAULT_CORPUS}' or paths / globs")
  files, seen = [], set()
  for entry in entries:
    for f in _expand(entry):
      if f not in seen:
        seen.add(f)
        files.append(f)
  for f in files:
    if os.path.isfile(f) and kind(f) == "text" and not f.endswith(".gz"):
      check_text(f)
  return files


def check_text(path: str, probe: int = 1 << 16) -> None:
  """Raises a one-line ValueError when the first `probe` bytes of a plain-text input are not
  UTF-8 text, so that a binary file listed by mistake is refused before anything is read;
  `documents` checks the whole file as it reads it."""
  with open(path, "rb") as f:
    head = f.read(probe)
  utf8_text(head, path, complete=len(head) < probe)


def utf8_text(data: bytes, path: str, complete: bool = True) -> str:
  """`data`, a text input's bytes (all of them, or its first ones: `complete=False`),
  decoded; a one-line ValueError naming the file and the offset when they are not UTF-8 text
  (a NUL byte, or an invalid sequence: a binary file would train as replacement
  characters). A character cut at the end of an incomplete head is not an error."""
  nul = data.find(b"\x00")
  if nul >= 0:
    raise ValueError(f"data.source: {path} is not text (NUL byte at offset {nul}); list only "
                     "UTF-8 text files")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    if complete or e.start < len(data) - 3:
      raise ValueError(f"data.source: {path} is not UTF-8 text (invalid byte at offset "
                       f"{e.start}); list only UTF-8 text files") from None
    return data[:e.start].decode("utf-8")


def _hf_arrow_files(path: str) -> list[str]:
  with open(os.path.join(path, HF_STATE), encoding="utf-8") as f:
    return [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]


def input_bytes(path: str) -> int:
  if os.path.isdir(path):
    return sum(os.path.getsize(f) for f in _hf_arrow_files(path))
  return os.path.getsize(path)


def cap_files(files: list[str], max_bytes: int) -> list[str]:
  """The leading files whose total size stays within `max_bytes` (0: all; whole files only,
  the first always)."""
  kept, total = [], 0
  for i, path in enumerate(files):
    size = input_bytes(path)
    if max_bytes and i and total + size > max_bytes:
      break
    total += size
    kept.append(path)
  return kept


class Piece(NamedTuple):
  """A unit of input: `kind` ('text', 'jsonl', 'parquet', 'arrow') of `path`, items
  [lo, hi) (bytes of a JSONL file, row groups of a Parquet file; whole file otherwise), its
  size in bytes (for progress) and the file's modification time (a changed file is another
  input)."""
  kind: str
  path: str
  lo: int
  hi: int
  nbytes: int
  mtime_ns: int


def _mtime(path: str) -> int:
  return os.stat(path).st_mtime_ns


def kind(path: str) -> str:
  name = path[:-3] if path.endswith(".gz") else path
  if name.endswith((".jsonl", ".ndjson")):
    return "jsonl"
  if path.endswith(".parquet"):
    return "parquet"
  return "text"


def _jsonl_pieces(path: str, piece_bytes: int) -> list[Piece]:
  size = os.path.getsize(path)
  if path.endswith(".gz"):
    return [Piece("jsonl", path, 0, size, size, _mtime(path))]
  cuts = [0]
  with open(path, "rb") as f:
    while cuts[-1] + piece_bytes < size:
      f.seek(cuts[-1] + piece_bytes)
      f.readline()  # to the start of the next line
      cuts.append(min(f.tell(), size))
  cuts.append(size)
  return [Piece("jsonl", path, a, b, b - a, _mtime(path))
          for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def arrow(module: str, path: str):
  """`pyarrow` or one of its modules, an optional dependency (Parquet inputs, saved Hugging
  Face datasets): a one-line ValueError naming `path` and the install when it is missing."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ValueError(f"data.source: {path} needs pyarrow, which is not installed: "
                     "pip install -r requirements-optional.txt") from None


def _parquet_pieces(path: str, piece_bytes: int) -> list[Piece]:
  pq = arrow("pyarrow.parquet", path)
  meta = pq.ParquetFile(path).metadata
  sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
  out, lo, acc = [], 0, 0
  for g, s in enumerate(sizes):
    acc += s
    if acc >= piece_bytes or g == len(sizes) - 1:
      out.append(Piece("parquet", path, lo, g + 1, acc, _mtime(path)))
      lo, acc = g + 1, 0
  return out


def pieces(files: list[str], piece_bytes: int) -> list[Piece]:
  """The inputs as units of about `piece_bytes` (see the module docstring)."""
  out = []
  for path in files:
    if os.path.isdir(path):
      out += [Piece("arrow", f, 0, 1, os.path.getsize(f), _mtime(f))
              for f in _hf_arrow_files(path)]
    elif kind(path) == "jsonl":
      out += _jsonl_pieces(path, piece_bytes)
    elif kind(path) == "parquet":
      out += _parquet_pieces(path, piece_bytes)
    else:
      size = os.path.getsize(path)
      out.append(Piece("text", path, 0, size, size, _mtime(path)))
  return out


def _field(record: dict, field: str, where: str) -> str:
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: expected a JSON object with a string field {field!r}, got "
                     f"{keys}")
  return record[field]


def _check_column(names: list[str], field: str, where: str) -> None:
  if field not in names:
    raise ValueError(f"{where}: no text column {field!r} (columns: {names})")


def _column(table, field: str, where: str) -> list[str]:
  _check_column(table.column_names, field, where)
  return [t for t in table.column(field).to_pylist() if t is not None]


def documents(piece: Piece, text_field: str = "text") -> Iterator[str]:
  """The documents of one input piece, in order."""
  if piece.kind == "text":
    with open(piece.path, "rb") as f:
      yield utf8_text(f.read(), piece.path)
  elif piece.kind == "jsonl":
    opener = gzip.open if piece.path.endswith(".gz") else open
    try:
      with opener(piece.path, "rb") as f:
        f.seek(piece.lo)
        data = f.read() if piece.path.endswith(".gz") else f.read(piece.hi - piece.lo)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
      raise ValueError(f"{piece.path}: not a complete gzip file, truncated or corrupt "
                       f"({type(e).__name__}: {e})") from None
    offset = piece.lo
    for line in data.splitlines(keepends=True):
      if line.strip():
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{piece.path} (byte {offset}): not a JSON line: {e}") from None
        yield _field(record, text_field, f"{piece.path} (byte {offset})")
      offset += len(line)
  elif piece.kind == "parquet":
    parquet = arrow("pyarrow.parquet", piece.path).ParquetFile(piece.path)
    _check_column(parquet.schema_arrow.names, text_field, piece.path)
    table = parquet.read_row_groups(range(piece.lo, piece.hi), columns=[text_field])
    yield from _column(table, text_field, piece.path)
  elif piece.kind == "arrow":
    pa = arrow("pyarrow", piece.path)
    with pa.memory_map(piece.path) as f:
      table = pa.ipc.open_stream(f).read_all()
    yield from _column(table, text_field, piece.path)
  else:
    raise ValueError(f"unknown input piece kind {piece.kind!r}")
