"""Trains a model: `python -m esjax.main --config=esjax/configs/tiny.py --workdir=DIR`.

This file is intentionally short: flags in, `esjax.train.loop.train_and_evaluate` out.
Override any config field with `--config.section.field=value`; the config is locked, so an
unknown field or a value of the wrong type is an error. Re-running with the same --workdir
resumes from its last checkpoint. Multi-process runs start from `launch/` (local.sh, slurm/).
"""

from __future__ import annotations

import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from esjax.eval import hook
from esjax.parallel import multihost
from esjax.train import guard, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. esjax/configs/tiny.py[:variant].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors, also for an unknown `--config.*` field (which
  ml_collections reports as an AttributeError) and a bad config file argument."""
  try:
    args = flags.FLAGS(argv)
    _CONFIG.value.keys()  # ml_collections defers a missing config file's error to first use.
    return args
  except OSError:
    path = flags.FLAGS["config"].config_filename
    sys.exit(f"esjax: error: --config: cannot load config file {path!r}")
  except flags.Error as e:  # A config file that raised comes with its traceback: keep the end.
    lines = str(e).strip().splitlines()
    text = lines[0] if len(lines) == 1 else f"{lines[0].split(': Error')[0]}: {lines[-1]}"
    sys.exit(f"esjax: error: {text}")
  except (AttributeError, KeyError) as e:
    msg = str(e)
    key = re.search(r"(\w+)", msg)
    key = key.group(1) if key else "?"
    hint = re.search(r'Did you mean "(\w+)"', msg)
    hint = f"; did you mean {hint.group(1)!r}?" if hint else ""
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=")[0].split(".")), "--config")
    sys.exit(f"esjax: error: {flag}: unknown config field {key!r}{hint} (the config is locked)")
  except ValueError as e:
    sys.exit(f"esjax: error: --config: {e}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.config_with_absl()
  if not flags.FLAGS["verbosity"].present:  # Keep orbax's per-save INFO lines out of the log.
    logging.set_verbosity(logging.WARNING)
  try:
    multihost.initialize_from_env()  # a no-op unless a launcher (launch/) set ESJAX_*
    config = _CONFIG.value
    summary = loop.train_and_evaluate(config, _WORKDIR.value, hook.for_config(config.eval))
  except (ValueError, FileNotFoundError, guard.TrainingCollapsed) as e:
    logging.info("full traceback:", exc_info=True)
    sys.exit(f"esjax: error: {e}")
  print(f"done: {summary}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
