"""Metrics out of the loop: `<workdir>/metrics.jsonl` (one JSON object per line) and
TensorBoard event files, plus the conversion of a step's device metrics to a record."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorboardX

# Step metrics copied to the record when the step function returns them.
SCALARS = ("loss", "ce_loss", "lr", "grad_norm", "aux_loss", "seq_aux_loss", "z_loss",
           "max_z_loss", "drop_fraction")


def step_record(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
  """JSON-ready record of one step's (host) metrics: scalars as floats, `expert_load` as a
  list per MoE layer of per-expert fractions of routed assignments, `ep_overflow_fraction`
  as the mean over MoE layers (with `ep_overflow_by_layer` when any layer overflowed)."""
  rec: dict[str, Any] = {"step": int(step)}
  for k in SCALARS:
    if k in metrics:
      rec[k] = float(metrics[k])
  if "expert_load" in metrics:
    rec["expert_load"] = np.asarray(metrics["expert_load"], np.float64).round(6).tolist()
  if "ep_overflow_fraction" in metrics:  # per MoE layer: the mean, and the layers if any
    overflow = np.asarray(metrics["ep_overflow_fraction"], np.float64).reshape(-1)
    rec["ep_overflow_fraction"] = float(overflow.mean())
    if overflow.any():
      rec["ep_overflow_by_layer"] = overflow.round(6).tolist()
  return rec


class MetricWriter:
  """Appends records to metrics.jsonl (only on process 0) and mirrors scalars to
  TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    step = record["step"]
    for k, v in record.items():
      if k != "step" and isinstance(v, float):
        self._tb.add_scalar(k, v, step)
    for i, load in enumerate(record.get("expert_load", [])):
      # Max expert load relative to a perfectly balanced router (1.0 = balanced).
      self._tb.add_scalar(f"expert_load_max/layer{i}", max(load) * len(load), step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def truncate(workdir: str, step: int) -> None:
  """Drops the records after `step` from metrics.jsonl (a resumed run logs them again)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError):  # A line cut short by a killed process.
      pass
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
