"""Collapse guard: stop on a NaN/Inf loss, or (optionally) on a loss spike; warn when a run
resumes from a checkpoint that looks close to one."""

from __future__ import annotations

import collections
import math
import statistics
from typing import Mapping, Sequence

# A trained language model's weights stay within about 100 (norm gains, embeddings); a
# parameter this large is a run diverging, even while its loss is still finite.
MAX_ABS_PARAM = 1e4
# A gradient norm this many times the median of the earlier checkpoints' is a jump.
GRAD_NORM_JUMP = 10.0


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


def resume_warning(step: int, health: Mapping[str, float] | None,
                   earlier: Sequence[Mapping[str, float]]) -> str | None:
  """What is alarming about resuming from `step`, whose checkpoint recorded `health`
  (`loss`, `grad_norm`, `max_abs_param`; `earlier`: those of the run's older checkpoints),
  or None."""
  if not health:
    return None
  why = []
  if not math.isfinite(health["max_abs_param"]) or health["max_abs_param"] > MAX_ABS_PARAM:
    why.append(f"its largest |parameter| is {health['max_abs_param']:.3g} (above "
               f"{MAX_ABS_PARAM:.0e})")
  norms = [h["grad_norm"] for h in earlier if math.isfinite(h.get("grad_norm", math.nan))]
  if norms and health["grad_norm"] > GRAD_NORM_JUMP * statistics.median(norms):
    why.append(f"its gradient norm {health['grad_norm']:.3g} is "
               f"{health['grad_norm'] / statistics.median(norms):.0f}x the median "
               f"{statistics.median(norms):.3g} of the {len(norms)} earlier checkpoints")
  if not why:
    return None
  return (f"checkpoint step {step} may be close to a collapse: {'; '.join(why)}. If the run "
          "diverges again, lower optim.lr or optim.grad_clip, or move this step aside to "
          "resume from an earlier one")
