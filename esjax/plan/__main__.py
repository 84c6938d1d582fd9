"""`python -m esjax.plan`: the cluster step without the cluster.

  python -m esjax.plan --config=esjax/configs/presets.py:mixtral-8x7b --devices=64 \\
      --target=h100 --config.parallel.pp=4 --config.parallel.tp=2 --config.parallel.ep=8

compiles the training loop's own train step for N devices of the target with abstract inputs
(XLA:GPU deviceless for h100/h200, fake CPU devices for cpu), prints per-device memory, the
collectives per mesh axis with their links, the minimum bytes the layout needs, and the
predicted step time and MFU, then one JSON object. `--search` ranks the valid layouts
(esjax/plan/search.py) and compiles the best few. See esjax/plan/dryrun.py for the model.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices to plan for.")
_TARGET = flags.DEFINE_string("target", "h100", "h100, h200 (deviceless XLA:GPU) or cpu.")
_SEARCH = flags.DEFINE_bool("search", False, "Rank the valid layouts and compile the best.")
_TOP = flags.DEFINE_integer("top", 3, "--search: how many of the best layouts to compile.")
_JSON = flags.DEFINE_bool("json", False, "Print only the JSON object(s).")
flags.mark_flags_as_required(["config"])


def _start_jax(target: str, devices: int) -> None:
  """Platform settings that must precede the first use of a JAX backend: the deviceless GPU
  compiler runs beside the CPU platform (the CUDA plugin must not start), fake CPU devices
  need XLA_FLAGS."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  if target == "cpu":
    xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={devices}".strip()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")


def main(argv: list[str]) -> None:
  del argv
  _start_jax(_TARGET.value, _DEVICES.value)
  from esjax.plan import dryrun, search, table, targets  # pylint: disable=g-import-not-at-top
  target = targets.get(_TARGET.value)
  config = _CONFIG.value
  if _SEARCH.value:
    results = search.search(config, target, _DEVICES.value, top=_TOP.value,
                            log=None if _JSON.value else print)
    for r in results:
      print(json.dumps(r))
    return
  result = dryrun.plan(config, target, _DEVICES.value)
  if not _JSON.value:
    print(table.format_result(result, target))
  print(json.dumps(result.to_json()))


if __name__ == "__main__":
  try:
    app.run(main)
  except (ValueError, RuntimeError) as e:
    sys.exit(f"esjax.plan: error: {e}")
