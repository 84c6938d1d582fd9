"""Checksum manifests of checkpoint steps: what was saved, so that what is read back is known
to be the same.

`write(step_dir)` records every file's size and CRC-32 in `<step_dir>/MANIFEST`, computed
from the files once the save is complete (orbax has renamed the step directory into place);
`problem(step_dir)` re-reads them and names the first file that is missing, resized or
changed (None when all match). A step without a manifest (written by an older esjax, or a
run killed between the save and its manifest) cannot be verified: `problem` says so with
`unverified=True` rather than failing it.

CRC-32 reads at disk speed and catches flipped bytes, truncation and deletion; it is not a
defence against deliberate tampering.
"""

from __future__ import annotations

import json
import os
import zlib

from esjax.data import shards

MANIFEST = "esjax_manifest.json"
_CHUNK = 1 << 24


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
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def has_manifest(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST))


def write(step_dir: str) -> None:
  """Writes the manifest of a complete step directory (atomically)."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc(os.path.join(step_dir, rel))]
           for rel in _files(step_dir)}
  shards.write_json(os.path.join(step_dir, MANIFEST), {"format": 1, "files": files})


def problem(step_dir: str, unverified: bool = False) -> str | None:
  """What is wrong with a step directory against its manifest, or None if every file matches.
  Without a manifest: None, or 'no checksum manifest' when `unverified` is asked for."""
  if not os.path.isdir(step_dir):
    return "the step directory is missing"
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return "no checksum manifest" if unverified else None
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its manifest {MANIFEST} is unreadable ({type(e).__name__})"
  for rel, (size, crc) in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    if os.path.getsize(full) != size:
      return f"{rel} has {os.path.getsize(full)} bytes, {size} were saved"
    if _crc(full) != crc:
      return f"{rel} differs from what was saved (CRC-32 mismatch)"
  return None
