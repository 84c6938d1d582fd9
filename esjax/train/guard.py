"""Collapse guard: stop on a NaN/Inf loss, or (optionally) on a loss spike."""

from __future__ import annotations

import collections
import math


class TrainingCollapsed(RuntimeError):
  """Training stopped because the loss is no longer usable."""


class CollapseGuard:
  """`check(step, loss, grad_norm)` raises TrainingCollapsed naming the step when the loss or
  the gradient norm is NaN/Inf, or, when `spike_factor > 0`, when the loss exceeds
  `spike_factor` times the mean of the last `spike_window` losses (once that many have been
  seen; the window restarts empty when a run resumes)."""

  def __init__(self, spike_factor: float = 0.0, spike_window: int = 50):
    self.spike_factor = spike_factor
    self._recent = collections.deque(maxlen=max(spike_window, 1))

  def check(self, step: int, loss: float, grad_norm: float = 0.0) -> None:
    if not math.isfinite(loss):
      raise TrainingCollapsed(f"step {step}: loss is {loss}; training stopped.")
    if not math.isfinite(grad_norm):  # The update of this step would poison the params.
      raise TrainingCollapsed(f"step {step}: gradient norm is {grad_norm}; training stopped.")
    if self.spike_factor > 0 and len(self._recent) == self._recent.maxlen:
      mean = sum(self._recent) / len(self._recent)
      if loss > self.spike_factor * mean:
        raise TrainingCollapsed(
            f"step {step}: loss {loss:.4g} is above train.spike_factor={self.spike_factor} x "
            f"the mean {mean:.4g} of the last {len(self._recent)} steps; training stopped.")
    self._recent.append(loss)
