"""Asynchronous parameter-server training (DGS and its baselines) on Ray.

  python -m esjax.distributed.main --config=experiments/dgs/tiny_lm.py:dgs --workdir=/tmp/dgs

`--config.ray.address=auto` (or host:port) joins a running Ray cluster instead of starting
one on this machine. Metrics go to `<workdir>/metrics.jsonl` (one record per server update,
plus `val_loss` records), TensorBoard files to `<workdir>/tensorboard`, the run's totals to
`<workdir>/summary.json`. Re-running with the same --workdir resumes from the server model
of its last checkpoint.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from esjax import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/dgs/tiny_lm.py:dgs.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def runtime():
  """(AsyncTraining, ServerDied), or exit in one line when Ray (optional) is missing."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from esjax.distributed.runtime import AsyncTraining, ServerDied
  except ImportError as e:
    if e.name != "ray" and not str(e.name or "").startswith("ray."):
      raise
    sys.exit("esjax.distributed: error: DGS runs on Ray, which is not installed: "
             "pip install -r requirements-optional.txt")
  return AsyncTraining, ServerDied


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries()  # the failure's traceback is logged at INFO: --verbosity=0
  AsyncTraining, ServerDied = runtime()
  try:
    summary = AsyncTraining(_CONFIG.value, _WORKDIR.value).run()
  except (ValueError, FileNotFoundError, ServerDied) as e:
    logging.info("full traceback:", exc_info=True)
    sys.exit(f"esjax.distributed: error: {e}")
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
