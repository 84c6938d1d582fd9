"""The parameter server of asynchronous training: plain Python, no Ray (runtime.py wraps it).

The server holds the global model as a flat list of arrays (the parameter leaves in
`jax.tree` order) and serves workers one `push` at a time, in arrival order, with no barrier:

- `dense` (ASGD): the worker sends its dense momentum update; the reply is the dense model.
- `oneway`: the worker sends a sparse SAMomentum update; the reply is the dense model.
- `dgs`: sparse both ways. The reply is the top-k of the model difference the worker is
  missing (methods.md 7.2). Every `resync_every` updates the server snapshots its model and
  sends each worker, on its next reply, a dense model once. `resync="snapshot"` (the
  authors' core/server.py) sends the snapshot and zeroes the worker's accumulator;
  `"current"` sends the model as of that reply and sets the accumulator to its distance from
  the snapshot (a fresher model for the same bytes; experiments/dgs/README.md compares them).

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
RESYNCS = ("snapshot", "current")


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
def _zeros(a):
  return jax.tree.map(jnp.zeros_like, a)


class ParameterServer:
  """Global model, per-worker state and counters. Not thread-safe: one push at a time."""

  def __init__(self, params: list[np.ndarray], mode: str = "dgs", down_ratio: float = 0.01,
               resync_every: int = 0, version: int = 0, up_ratio: float | None = None,
               resync: str = "snapshot"):
    """`up_ratio`: the workers' static upload density; their (trimmed) sparse payloads are
    padded to it so the jitted update compiles once (None: payloads arrive at one size)."""
    if mode not in MODES:
      raise ValueError(f"DGS mode {mode!r}, expected one of {MODES}")
    if mode == "dgs":
      dgs.num_kept(1, down_ratio)  # validates the ratio
    if resync_every < 0:
      raise ValueError(f"resync_every={resync_every} must be >= 0 (0: never)")
    if resync not in RESYNCS:
      raise ValueError(f"resync={resync!r}, expected one of {RESYNCS}")
    self.mode, self.down_ratio, self.resync_every = mode, down_ratio, resync_every
    self.resync = resync
    self.up_kept = (None if up_ratio is None or mode == "dense"
                    else [dgs.num_kept(int(np.size(p)), up_ratio) for p in params])
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
    """The dense model for `worker`. In dgs mode the worker then holds `sync + sent[worker]`:
    the snapshot with a zero accumulator (resync="snapshot", the authors' server) or the
    current model with the accumulator at its distance from the snapshot ("current")."""
    self.resync_due.discard(worker)
    if self.mode != "dgs":
      return [np.asarray(p) for p in self.params]
    if self.resync == "snapshot":
      self.sent[worker] = _zeros(self.params)
      return [np.asarray(p) for p in self.sync]
    self.sent[worker] = _subtract(self.params, self.sync)
    return [np.asarray(p) for p in self.params]

  def register(self, worker: int) -> list[np.ndarray]:
    """A worker joins (or rejoins after a restart): it gets the dense model."""
    self.worker_version[worker] = self.version
    self.totals["bytes_down"] += self.dense_bytes  # counted, but not an update's reply
    return self._dense_reply(worker)

  def push(self, worker: int, payload: list, info: dict[str, Any] | None = None) -> list:
    """Apply worker `worker`'s update, return its reply (list of arrays or of dgs.Sparse)."""
    if worker not in self.worker_version:
      raise ValueError(f"worker {worker} pushed before it registered")
    staleness = self.version - self.worker_version[worker]
    up_bytes, up_entries = dgs.payload_stats(payload)
    if self.up_kept is not None:
      payload = dgs.pad(payload, self.up_kept)
    resync_point = (self.mode == "dgs" and self.resync_every
                    and (self.version + 1) % self.resync_every == 0)
    if self.mode == "dgs" and not resync_point and worker not in self.resync_due:
      self.params, self.sent[worker], reply = _dgs_push(
          self.params, self.sync, self.sent[worker], payload, ratio=self.down_ratio)
      reply = jax.device_get(reply)
    else:
      self.params = _dense_push(self.params, payload)
      if resync_point:  # new snapshot; every worker gets a dense reply next (this one now)
        self.sync, self.resync_due = self.params, set(self.worker_version)
      reply = self._dense_reply(worker)
    self.version += 1
    self.worker_version[worker] = self.version
    down_bytes, down_entries = dgs.payload_stats(reply)
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
