"""The parameter server of asynchronous training: plain Python, no Ray (runtime.py wraps it).

The server holds the global model as a flat list of arrays (the parameter leaves in
`jax.tree` order) and serves workers one `push` at a time, in arrival order, with no barrier:

- `dense` (ASGD): the worker sends its dense momentum update; the reply is the dense model.
- `oneway`: the worker sends a sparse SAMomentum update; the reply is the dense model.
- `dgs`: sparse both ways. The reply is the top-k of the model difference the worker is
  missing (methods.md 7.2). Every `resync_every` updates the server snapshots its model and
  sends each worker, on its next reply, the dense model once (resetting its accumulator).

Per worker the server keeps the model version it last sent (staleness of an update = updates
applied since then) and counts bytes and entries each way. Payload byte counts are those of
`dgs.payload_stats` (int32 index + value per sparse entry), not Ray's framing.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esjax.optim import dgs

MODES = ("dense", "oneway", "dgs")


@functools.partial(jax.jit, static_argnames=("ratio",))
def _dgs_push(params, sync, sent, payload, ratio):
  params = dgs.apply_payload(params, payload, -1.0)
  reply, sent = dgs.model_difference(params, sync, sent, ratio)
  return params, sent, reply


@jax.jit
def _dense_push(params, payload):
  return dgs.apply_payload(params, payload, -1.0)


@jax.jit
def _subtract(a, b):
  return jax.tree.map(jnp.subtract, a, b)


@jax.jit
def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


class ParameterServer:
  """Global model, per-worker state and counters. Not thread-safe: one push at a time."""

  def __init__(self, params: list[np.ndarray], mode: str = "dgs", down_ratio: float = 0.01,
               resync_every: int = 0, version: int = 0):
    if mode not in MODES:
      raise ValueError(f"DGS mode {mode!r}, expected one of {MODES}")
    if mode == "dgs":
      dgs.num_kept(1, down_ratio)  # validates the ratio
    if resync_every < 0:
      raise ValueError(f"resync_every={resync_every} must be >= 0 (0: never)")
    self.mode, self.down_ratio, self.resync_every = mode, down_ratio, resync_every
    self.params = [jnp.asarray(p) for p in params]
    self.sync = self.params  # snapshot of the last resync (dgs)
    self.sent: dict[int, list[jax.Array]] = {}  # per worker: sent since resync (dgs)
    self.resync_due: set[int] = set()
    self.version = version  # updates applied (plus the version restored from)
    self.worker_version: dict[int, int] = {}  # server version each worker's model is at
    self.n_entries = sum(int(p.size) for p in self.params)
    self.dense_bytes = sum(int(p.nbytes) for p in self.params)
    self.totals = dict(bytes_up=0, bytes_down=0, entries_up=0, entries_down=0, updates=0,
                       dense_replies=0)
    self.records: list[dict[str, Any]] = []
    self.t0 = time.time()

  def _dense_reply(self, worker: int) -> list[np.ndarray]:
    if self.mode == "dgs":  # the worker now holds params = sync + sent
      self.sent[worker] = _subtract(self.params, self.sync)
    return [np.asarray(p) for p in self.params]

  def register(self, worker: int) -> list[np.ndarray]:
    """A worker joins (or rejoins after a restart): it gets the dense model."""
    self.worker_version[worker] = self.version
    self.resync_due.discard(worker)
    self.totals["bytes_down"] += self.dense_bytes  # counted, but not an update's reply
    return self._dense_reply(worker)

  def push(self, worker: int, payload: list, info: dict[str, Any] | None = None) -> list:
    """Apply worker `worker`'s update, return its reply (list of arrays or of dgs.Sparse)."""
    if worker not in self.worker_version:
      raise ValueError(f"worker {worker} pushed before it registered")
    staleness = self.version - self.worker_version[worker]
    up_bytes, up_entries = dgs.payload_stats(payload)
    if self.mode == "dgs" and worker not in self.resync_due:
      self.params, self.sent[worker], reply = _dgs_push(
          self.params, self.sync, self.sent[worker], payload, ratio=self.down_ratio)
      reply = jax.device_get(reply)
    else:
      self.params = _dense_push(self.params, payload)
      self.resync_due.discard(worker)
      reply = self._dense_reply(worker)
    self.version += 1
    self.worker_version[worker] = self.version
    down_bytes, down_entries = dgs.payload_stats(reply)
    if self.mode == "dgs" and self.resync_every and self.version % self.resync_every == 0:
      self._resync()
    dense_reply = not dgs.is_sparse_payload(reply)
    for key, val in (("bytes_up", up_bytes), ("bytes_down", down_bytes),
                     ("entries_up", up_entries), ("entries_down", down_entries),
                     ("updates", 1), ("dense_replies", int(dense_reply))):
      self.totals[key] += val
    self.records.append({
        "step": self.version, "worker": worker, "staleness": staleness,
        "bytes_up": up_bytes, "bytes_down": down_bytes,
        "up_density": up_entries / self.n_entries,
        "down_density": down_entries / self.n_entries,
        **{f"{k}_total": v for k, v in self.totals.items() if k.startswith("bytes")},
        "time": time.time() - self.t0, **(info or {})})
    return reply

  def _resync(self) -> None:
    """New snapshot; every worker gets the dense model on its next reply. Until then its
    accumulator is re-based so that `worker model == sync + sent` keeps holding."""
    shift = _subtract(self.sync, self.params)
    self.sent = {k: _add(a, shift) for k, a in self.sent.items()}
    self.sync = self.params
    self.resync_due = set(self.worker_version)

  def drain_records(self) -> list[dict[str, Any]]:
    records, self.records = self.records, []
    return records

  def snapshot(self) -> dict[str, Any]:
    """The global model (numpy leaves) with the counters at this version."""
    return {"params": [np.asarray(p) for p in self.params], "version": self.version,
            "dense_bytes": self.dense_bytes, "n_entries": self.n_entries, **self.totals,
            "time": time.time() - self.t0}

  def get_version(self) -> int:
    return self.version
