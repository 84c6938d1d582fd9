"""Evaluates a checkpoint on tasks and writes a JSON report.

  python -m esjax.eval --checkpoint=/tmp/esjax_tiny --tasks=val,tasks/arc_easy,tasks/mmlu \
      [--config=esjax/configs/tiny.py] [--num_fewshot=5] [--limit=100] [--output=report.json]

The report goes to `--output`, by default `eval_report.json` beside the checkpoint: in the
run's workdir (or the Hugging Face folder).

`--checkpoint` is an esjax run (workdir, checkpoints/ or one step) or a Hugging Face folder.
`--tasks` is a comma-separated list of task directories / .jsonl files (format in
esjax/eval/README.md) and `val`: perplexity and bits per byte of the run's held-out
validation windows (the data section of `--config`, or of the run's own config.json).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from esjax.data import shards

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (optional: the run's config.json is used).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "esjax run or Hugging Face folder.")
_TASKS = flags.DEFINE_string("tasks", None, "Comma-separated task paths, or 'val'.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Overrides every task's n-shot.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Score only the first N items of each task (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Context length (default: the model's).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON report (default: "
                              "eval_report.json in the run's workdir or the HF folder).")
_SAMPLES = flags.DEFINE_bool("log_samples", False, "Include per-item results in the report.")
flags.mark_flags_as_required(["checkpoint", "tasks"])


def _check_flags() -> None:
  if _LIMIT.value < 0:
    raise ValueError(f"--limit={_LIMIT.value}, expected >= 0 (0: every item)")
  if _BATCH.value <= 0:
    raise ValueError(f"--batch_size={_BATCH.value}, expected > 0")
  if _MAX_LEN.value is not None and _MAX_LEN.value <= 0:
    raise ValueError(f"--max_len={_MAX_LEN.value}, expected > 0")
  if _NUM_FEWSHOT.value is not None and _NUM_FEWSHOT.value < 0:
    raise ValueError(f"--num_fewshot={_NUM_FEWSHOT.value}, expected >= 0")
  folder = os.path.dirname(os.path.abspath(_OUTPUT.value)) if _OUTPUT.value else None
  if folder and not os.path.isdir(folder):
    raise ValueError(f"--output={_OUTPUT.value}: no directory {folder}")


def _write_report(report: dict, path: str) -> str:
  """Writes the report atomically at `path`; if that fails (after minutes of scoring), in the
  temporary directory instead, saying so. Returns where it went."""
  try:
    shards.write_json(path, report)
    return path
  except OSError as e:
    fd, fallback = tempfile.mkstemp(prefix="esjax_eval_report_", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    print(f"esjax.eval: warning: cannot write --output={path} ({e.strerror}); the report is "
          f"in {fallback}", file=sys.stderr)
    return fallback


def _interrupted(signum, frame) -> None:
  """Ctrl-C ends the evaluation at once in one line (nothing is written before the end). A
  KeyboardInterrupt raised where it falls could land in a garbage-collection callback, be
  printed as ignored, and the evaluation went on."""
  del signum, frame
  print("esjax.eval: interrupted; no report written", file=sys.stderr, flush=True)
  os._exit(130)


def main(argv: list[str]) -> None:
  signal.signal(signal.SIGINT, _interrupted)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  from esjax.eval import (  # pylint: disable=g-import-not-at-top
      harness, loading, perplexity, tasks)

  jax.config.config_with_absl()
  if not flags.FLAGS["verbosity"].present:  # orbax's lines on opening a checkpoint to read
    logging.set_verbosity(logging.ERROR)     # it are noise here (--verbosity=-1 shows them)
  t0 = time.perf_counter()
  try:
    _check_flags()
    model, tokenizer, config = loading.load(_CHECKPOINT.value, _CONFIG.value)
    if _MAX_LEN.value and _MAX_LEN.value > model.cfg.max_seq_len:
      raise ValueError(f"--max_len={_MAX_LEN.value} exceeds the model's max_seq_len="
                       f"{model.cfg.max_seq_len}")
    names = [t.strip() for t in _TASKS.value.split(",") if t.strip()]
    task_list = tasks.load_tasks(",".join(n for n in names if n != "val"))
    report = harness.evaluate(model, tokenizer, task_list, num_fewshot=_NUM_FEWSHOT.value,
                              limit=_LIMIT.value, batch_size=_BATCH.value,
                              max_len=_MAX_LEN.value, log_samples=_SAMPLES.value)
    if "val" in names:
      report["results"]["val"] = perplexity.val_perplexity(model, config)
  except (ValueError, FileNotFoundError) as e:
    logging.debug("full traceback (shown with --verbosity=1):", exc_info=True)
    sys.exit(f"esjax.eval: error: {e}")
  report = {"checkpoint": _CHECKPOINT.value, "tasks": names,
            "model_config": model.cfg.to_dict(),
            "settings": {"num_fewshot": _NUM_FEWSHOT.value, "limit": _LIMIT.value,
                         "batch_size": _BATCH.value, "max_len": _MAX_LEN.value},
            **report, "wall_s": round(time.perf_counter() - t0, 2)}
  output = _write_report(report, _OUTPUT.value or os.path.join(
      loading.run_dir(_CHECKPOINT.value), "eval_report.json"))
  for name, metrics in {**report["results"], **report["groups"]}.items():
    shown = {k: v for k, v in metrics.items() if not k.endswith("_stderr")}
    print(name, json.dumps(shown))
  print(f"report written to {output}")


if __name__ == "__main__":
  app.run(main)
