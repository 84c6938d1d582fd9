"""Periodic evaluation during training.

    hook = EvalHook(load_tasks("tasks/arc_easy,tasks/hellaswag"), tokenizer, every=1000,
                    limit=200)
    ...
    metrics.update(hook(step, model))   # {} except every `every` steps

The returned keys are flat, `eval/<task>/<metric>` (groups as `eval/<group>/<metric>`), ready
for `metrics.jsonl` and TensorBoard. A loop that holds a params dict rather than a model passes
`esjax.eval.loading.build_model(model_cfg, params)` (no copy: the model wraps those arrays).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from esjax.eval.harness import evaluate
from esjax.eval.tasks import Task, TaskGroup, load_tasks
from esjax.models.transformer import Transformer


def flatten(report: dict, prefix: str = "eval") -> dict[str, float]:
  """Numeric metrics of an `evaluate` report as `{prefix/name/metric: value}`."""
  out = {}
  for section in ("results", "groups"):
    for name, metrics in report.get(section, {}).items():
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_fewshot":
          out[f"{prefix}/{name}/{k}"] = float(v)
  return out


class EvalHook:
  """Runs `evaluate` on the given tasks every `every` steps (never at step 0)."""

  def __init__(self, tasks: Sequence[Task | TaskGroup], tokenizer, *, every: int,
               limit: int = 0, batch_size: int = 8, max_len: int | None = None,
               num_fewshot: int | None = None):
    if every < 1:
      raise ValueError(f"EvalHook: every={every} must be >= 1")
    self.tasks = list(tasks)
    self.tokenizer = tokenizer
    self.every = every
    self.kwargs = dict(limit=limit, batch_size=batch_size, max_len=max_len,
                       num_fewshot=num_fewshot)

  def due(self, step: int) -> bool:
    return step > 0 and step % self.every == 0

  def __call__(self, step: int, model: Transformer, force: bool = False) -> dict[str, float]:
    """The flat metrics at a due step (or any step with `force`), else {}."""
    if not (self.due(step) or force) or not self.tasks:
      return {}
    return flatten(evaluate(model, self.tokenizer, self.tasks, **self.kwargs))


def for_config(eval_cfg: Any) -> Callable[[Any], EvalHook] | None:
  """The `eval` config section's hook factory, `tokenizer -> EvalHook`, or None when
  `eval.tasks` is empty (what `esjax.train.loop.train_and_evaluate` takes as `task_hook`)."""
  if not eval_cfg.tasks:
    return None
  if eval_cfg.every < 1:
    raise ValueError(f"eval.every={eval_cfg.every} must be >= 1 when eval.tasks is set")
  if jax.process_count() > 1:
    raise ValueError("eval.tasks runs in single-process jobs; score a multi-process run's "
                     "checkpoints with `python -m esjax.eval --checkpoint=...`")
  tasks = load_tasks(eval_cfg.tasks)
  fewshot = None if eval_cfg.num_fewshot < 0 else eval_cfg.num_fewshot
  return lambda tokenizer: EvalHook(tasks, tokenizer, every=eval_cfg.every,
                                    limit=eval_cfg.limit, batch_size=eval_cfg.batch_size,
                                    num_fewshot=fewshot)
