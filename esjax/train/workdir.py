"""A run's working directory: one run at a time, and a resume that continues the same model.

`lock(workdir)` takes an exclusive `fcntl.flock` on `<workdir>/esjax.lock` (process 0 of a
run; the kernel drops it when the process dies, so a lock left by a killed run is taken over,
with a message naming it). A second run on a live workdir is refused in one line naming the
holder. On a network filesystem flock is as good as its server makes it (NFSv4 and Lustre
with `flock` mounted honour it).

`check_resume(saved, new)` compares the checkpoint's model config with this run's before
anything is written: every differing field is named, except the ones that only choose an
implementation of the same function (`RESUMABLE`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Any

LOCK_FILE = "esjax.lock"
# ModelConfig fields that may change on resume: the same model, computed another way.
RESUMABLE = ("remat", "attention_impl", "moe_impl", "moe_block_size", "router_impl", "init_std")


class Lock:
  """An exclusive lock on a workdir, held until `release()` (or the process ends)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 200, 0).decode("utf-8", "replace").strip() or "another run"
      os.close(self._fd)
      raise ValueError(f"--workdir={os.path.dirname(self.path)} is in use by {holder} (lock "
                       f"{self.path}); wait for it to finish or use another --workdir") from None
    previous = os.pread(self._fd, 200, 0).decode("utf-8", "replace").strip()
    if previous:
      print(f"esjax: taking over the lock of {previous}, which no longer runs",
            file=sys.stderr, flush=True)
    me = f"pid {os.getpid()} on {socket.gethostname()}".encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, me, 0)

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def check_resume(saved: dict[str, Any], new: dict[str, Any], where: str) -> None:
  """Raises a one-line ValueError naming every model field that differs between a
  checkpoint's config (`saved`) and this run's (`new`), outside `RESUMABLE`."""
  differ = [f"{k} {saved.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(saved) | set(new))
            if k not in RESUMABLE and saved.get(k) != new.get(k)]
  if differ:
    raise ValueError(f"cannot resume {where} with a different model ({'; '.join(differ)}): "
                     "set the model back, or start a new --workdir with "
                     f"checkpoint.init_from={where}")
