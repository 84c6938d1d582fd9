"""Trains a model: `python -m esjax.main --config=esjax/configs/tiny.py --workdir=DIR`.

This file is intentionally short: flags in, `esjax.train.loop.train_and_evaluate` out.
Override any config field with `--config.section.field=value`; the config is locked, so an
unknown field or a value of the wrong type is an error. Re-running with the same --workdir
resumes from its last checkpoint. Multi-process runs start from `launch/` (local.sh, slurm/).

SIGTERM or Ctrl-C (SIGINT) while training finishes the step, saves a checkpoint and exits
with status 75 (EX_TEMPFAIL: preempted, rerun to resume); a second one stops at once.
Errors are one line on stderr (`--verbosity=1` logs the traceback).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback
import warnings

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from esjax import console
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
  except SyntaxError as e:  # the config file's own: where, not the import machinery's trace
    sys.exit(f"esjax: error: --config: {e.filename}:{e.lineno}: {e.msg}")
  except flags.Error as e:  # A config file that raised comes with its traceback: keep the end.
    lines = str(e).strip().splitlines()
    text = lines[0] if len(lines) == 1 else f"{lines[0].split(': Error')[0]}: {lines[-1]}"
    sys.exit(f"esjax: error: {text}")
  except Exception as e:  # pylint: disable=broad-except
    _config_file_raised(e)
    if not isinstance(e, (AttributeError, KeyError)):
      raise
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


def _config_file_raised(e: BaseException) -> None:
  """Exits in one line naming the config file's line when `e` was raised in it (its
  `get_config`, or what that calls there), e.g. a KeyError that is no unknown field."""
  frames = traceback.extract_tb(e.__traceback__)
  path = next((f.filename for f in frames if f.name == "get_config"), None)
  if path is not None:
    line = [f.lineno for f in frames if f.filename == path][-1]
    first = (str(e).strip().splitlines() or [""])[0]
    sys.exit(f"esjax: error: --config: {path}:{line}: {type(e).__name__}: {first}")


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint saved


class StopSignals:
  """Records the first SIGTERM / SIGINT (the loop asks after every step); a second one of
  the same kind gets the default action (stop at once).

  Under `jax.distributed` (`distributed=True`; create it after `jax.distributed.initialize`)
  SIGTERM is the coordination service's preemption notice: jax's own handler takes it and
  shares it, and every process stops at the same step, the one
  `multihost_utils.reached_preemption_sync_point` agrees on. A SIGINT is turned into that
  notice, so a Ctrl-C that reaches the processes at different steps stops them together."""

  def __init__(self, distributed: bool = False):
    self.received: str | None = None
    self.distributed = distributed
    signal.signal(signal.SIGINT, self._handle)
    if not distributed:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    signal.signal(signum, signal.SIG_DFL)
    if self.distributed:  # the preemption notice reaches every process through jax
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.received = signal.Signals(signum).name

  def __call__(self, step: int) -> str | None:
    if self.distributed and multihost_utils.reached_preemption_sync_point(step):
      self.received = self.received or "SIGTERM"
    return self.received


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  if "RESOURCE_EXHAUSTED" in text:
    size = re.search(r"allocate (\d+) bytes", text)
    what = f" ({int(size.group(1)) / 2**30:.1f} GiB in one buffer)" if size else ""
    return (f"out of device memory{what}: lower train.batch_size or train.seq_len, raise "
            "parallel.microbatches, set model.remat=full, or split over parallel.tp / cp; "
            "`python -m esjax.plan` shows what fits")
  first = text.splitlines()[0] if text else ""
  return f"{type(e).__name__}: {first}"


def _exit(message: str) -> None:
  """Exits with status 1 after `message`, without waiting for the threads a failed
  checkpoint save leaves behind (orbax's, blocked on a signal that never comes: the
  interpreter would wait for them forever), and without a warning for each write such a
  save scheduled and never started (orbax stops its loop at the first failed write)."""
  print(message, file=sys.stderr, flush=True)
  warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
  others = [t for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon]
  if others:
    sys.stdout.flush()
    os._exit(1)
  sys.exit(1)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.config_with_absl()
  console.quiet_libraries()
  stop = StopSignals()
  try:
    if multihost.initialize_from_env():  # a no-op unless a launcher (launch/) set ESJAX_*
      stop = StopSignals(distributed=True)  # after jax's preemption handler is installed
    config = _CONFIG.value
    summary = loop.train_and_evaluate(config, _WORKDIR.value, hook.for_config(config.eval),
                                      stop=stop)
  except (ValueError, FileNotFoundError, guard.TrainingCollapsed) as e:
    logging.info("full traceback:", exc_info=True)
    _exit(f"esjax: error: {e}")
  except (OSError, jax.errors.JaxRuntimeError) as e:  # full disk, lost device, OOM
    logging.info("full traceback:", exc_info=True)
    _exit(f"esjax: error: {_one_line(e)}")
  if summary["stopped"]:
    print(f"esjax: stopped by {summary['stopped']} after step {summary['step']}; checkpoint "
          f"saved in {_WORKDIR.value}/checkpoints: rerun the same command to resume",
          file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
  print(f"done: {summary}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
