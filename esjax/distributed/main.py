"""Asynchronous parameter-server training (DGS and its baselines) on Ray.

  python -m esjax.distributed.main --config=experiments/dgs/tiny_lm.py:dgs --workdir=/tmp/dgs

`--config.ray.address=auto` (or host:port) joins a running Ray cluster instead of starting
one on this machine. Metrics go to `<workdir>/metrics.jsonl`, the summary to `summary.json`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from esjax.distributed.runtime import AsyncTraining

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  summary = AsyncTraining(_CONFIG.value, _WORKDIR.value).run()
  logging.info("summary: %s", summary)
  print(summary)


if __name__ == "__main__":
  app.run(main)
