"""What the entry points print: their own lines, without the libraries' noise.

`quiet_libraries()` (unless --verbosity is given) keeps absl logging at WARNING and drops:
  - orbax's logs: its INFO lines per save, its warnings (two lines on every read-only open,
    so before each init_from error), its errors (a failed save's traceback in each of its
    threads, a failure it also raises to the caller, which reports it in one line);
  - asyncio's "Future exception was never retrieved" of each write a failed save abandoned;
  - the unraisable "Event loop is closed" that tensorstore reports for each write that
    completes after a failed save closed orbax's event loop (~170 lines above the one-line
    error of a disk that fills mid-save).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import flags, logging


def _not_library_noise(record: std_logging.LogRecord) -> bool:
  return f"{os.sep}orbax{os.sep}" not in record.pathname and record.name != "asyncio"


def _without_closed_loop_errors(hook):
  """`hook` (sys.unraisablehook) except for orbax's closed event loop."""

  def unraisablehook(unraisable):
    if not (unraisable.exc_type is RuntimeError and
            str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)

  return unraisablehook


def quiet_libraries() -> None:
  """Call at the start of an entry point's main (after flags are parsed)."""
  if flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_not_library_noise)
  sys.unraisablehook = _without_closed_loop_errors(sys.unraisablehook)
