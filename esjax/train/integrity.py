"""Checksum manifests of checkpoint steps: what was saved, so that what is read back is known
to be the same.

Each process checksums the files it wrote: `write(step_dir, process)` records the size and
CRC-32 of the files `owner` gives to that process (orbax's `ocdbt.process_N/` and
`array_metadatas/process_N` are process N's; everything else, metadata, is process 0's) in
`esjax_manifest.json` (process 0) or `esjax_manifest.N.json`, once the step is complete
(orbax has renamed its directory into place). So the work and the reading are split like the
save, and a multi-terabyte checkpoint is not read through one process.

`problem(step_dir, process, count)` re-reads the manifests assigned to `process` of `count`
verifying ones (round-robin over the manifests, whatever the number of processes that wrote
them) and names the first file that is missing, resized or changed (None when all match);
the caller agrees the verdict across processes. The manifests are the step's seal: a step
without them, or without one of the writing processes' (each manifest records how many
processes wrote the step), was never sealed (a run killed between the save and its seal, or
a step of an esjax older than manifests) and is a problem like a damaged one.

CRC-32 reads at disk speed and catches flipped bytes, truncation and deletion; it is not a
defence against deliberate tampering.
"""

from __future__ import annotations

import json
import os
import re
import zlib

from esjax.data import shards

MANIFEST = "esjax_manifest.json"
_MANIFEST_OF = re.compile(r"esjax_manifest(?:\.(\d+))?\.json")
# A manifest, or one being written (`shards.write_json`'s temporary) by another process.
_NOT_CHECKSUMMED = re.compile(r"esjax_manifest(?:\.\d+)?\.json(?:\.tmp\d+)?")
_OWNED = re.compile(r"(?:^|/)(?:ocdbt\.process_|array_metadatas/process_)(\d+)(?:/|$)")
_CHUNK = 1 << 24


def manifest_name(process: int) -> str:
  return MANIFEST if process == 0 else f"esjax_manifest.{process}.json"


def owner(rel: str) -> int:
  """The process that writes file `rel` of a step (orbax's per-process directories)."""
  match = _OWNED.search(rel)
  return int(match.group(1)) if match else 0


def _crc(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if not _NOT_CHECKSUMMED.fullmatch(rel):
        out.append(rel)
  return sorted(out)


def manifests(step_dir: str) -> list[str]:
  """The manifest files of a step, in process order."""
  names = [n for n in os.listdir(step_dir) if _MANIFEST_OF.fullmatch(n)]
  return sorted(names, key=lambda n: int(_MANIFEST_OF.fullmatch(n).group(1) or 0))


def write(step_dir: str, process: int = 0, processes: int = 1) -> None:
  """Writes `process`'s manifest (of `processes` that wrote the step) of a complete step
  directory, atomically."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc(os.path.join(step_dir, rel))]
           for rel in _files(step_dir) if owner(rel) == process}
  shards.write_json(os.path.join(step_dir, manifest_name(process)),
                    {"format": 1, "process": process, "processes": processes, "files": files})


def problem(step_dir: str, process: int = 0, count: int = 1) -> str | None:
  """What is wrong with a step directory against the manifests this `process` of `count`
  checks (an unsealed step included), or None if every file they list matches."""
  if not os.path.isdir(step_dir):
    return "the step directory is missing"
  if not os.path.isdir(os.path.join(step_dir, "params")):
    return "it holds no params/ (an emptied or incomplete step)"
  names = manifests(step_dir)
  if not names:
    return "it was never sealed (no checksum manifest: the run stopped before sealing it)"
  for name in names[process::count]:
    try:
      with open(os.path.join(step_dir, name), encoding="utf-8") as f:
        manifest = json.load(f)
      files, writers = manifest["files"], int(manifest.get("processes", 1))
    except (OSError, ValueError, KeyError, TypeError) as e:
      return f"its manifest {name} is unreadable ({type(e).__name__})"
    missing = sorted(set(map(manifest_name, range(writers))) - set(names))
    if missing:
      return f"it was never sealed ({missing[0]} is missing)"
    for rel, (size, crc) in sorted(files.items()):
      full = os.path.join(step_dir, rel)
      if not os.path.isfile(full):
        return f"{rel} is missing"
      if os.path.getsize(full) != size:
        return f"{rel} has {os.path.getsize(full)} bytes, {size} were saved"
      if _crc(full) != crc:
        return f"{rel} differs from what was saved (CRC-32 mismatch)"
  return None
