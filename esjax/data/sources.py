"""Where the text comes from: the default corpus, or the user's files, directories and globs.

`data.source` is a comma-separated list. Each entry is `stdlib` (the default corpus), a file,
a directory (every non-hidden file below it, recursively) or a glob (`**` allowed). Files are
read in sorted path order, so the same inputs always give the same token stream.

The default corpus is real text present on every Python install without a download: the
top-level `.py` modules of the running interpreter's standard library (code, comments and
docstrings; about 4.7 MB on CPython 3.11), in sorted order. It is identical on machines
with the same Python version.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from typing import Iterator

DEFAULT_CORPUS = "stdlib"


def stdlib_files() -> list[str]:
  """The default corpus: the standard library's top-level modules, sorted."""
  root = sysconfig.get_paths()["stdlib"]
  return sorted(glob.glob(os.path.join(root, "*.py")))


def _expand(entry: str) -> list[str]:
  if entry == DEFAULT_CORPUS:
    return stdlib_files()
  path = os.path.expanduser(entry)
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
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
  """The files of a `data.source` spec, in reading order (duplicates read once)."""
  entries = [e.strip() for e in source.split(",") if e.strip()]
  if not entries:
    raise ValueError(f"data.source={source!r}: expected '{DEFAULT_CORPUS}' or paths / globs")
  files, seen = [], set()
  for entry in entries:
    for f in _expand(entry):
      if f not in seen:
        seen.add(f)
        files.append(f)
  return files


def read_documents(files: list[str], max_bytes: int = 0) -> Iterator[str]:
  """Yields each file's text (UTF-8, undecodable bytes replaced), whole files only, stopping
  before the total would exceed `max_bytes` (0: no cap; the first file is always read)."""
  total = 0
  for i, path in enumerate(files):
    size = os.path.getsize(path)
    if max_bytes and i and total + size > max_bytes:
      return
    total += size
    with open(path, "rb") as f:
      yield f.read().decode("utf-8", errors="replace")
