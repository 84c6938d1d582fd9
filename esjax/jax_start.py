"""How esjax starts JAX: quietly on a machine without an NVIDIA GPU where the CUDA plugin is
installed (the planner's requirements-plan.txt in the training venv).

There the plugin writes absl's pre-initialization lines ("Could not find cuda drivers on
your machine") straight to file descriptor 2, three at `import jax` and one when JAX loads
its plugins, and its version check fails with a ~25-line traceback at the first backend use.
None of that is news on a machine that has no GPU: `import_jax()` sets `jax_platforms` to
"cpu" (the plugin then skips its check; the planner compiles for GPUs deviceless beside the
CPU platform anyway), loads the plugins at once (registration only; no backend starts, so
`jax.distributed.initialize` may still follow), and drops those lines from what was written
to descriptor 2 meanwhile; everything else written there is passed on. With a GPU, with
JAX_PLATFORMS set, or without the plugin, it is a plain `import jax`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil
import re
import sys
import tempfile

_NOISE = re.compile(r"cudart_stub\.cc:\d+\] Could not find cuda drivers|"
                    r"^WARNING: All log messages before absl::InitializeLog\(\) is called")


def cuda_plugin_installed() -> bool:
  if importlib.util.find_spec("jax_plugins") is None:
    return False
  import jax_plugins  # pylint: disable=g-import-not-at-top  (a namespace package: cheap)
  return any(m.name.startswith("xla_cuda") for m in pkgutil.iter_modules(jax_plugins.__path__))


def has_nvidia_gpu() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*"))


def import_jax() -> None:
  if ("jax" in sys.modules or os.environ.get("JAX_PLATFORMS") or has_nvidia_gpu()
      or not cuda_plugin_installed()):
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import jax  # pylint: disable=g-import-not-at-top
      from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
      jax.config.update("jax_platforms", "cpu")
      # Private (jax has no public way to load plugins without starting a backend): where a
      # jax lacks it, the plugin's line at backend start is simply not filtered.
      register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
      if register is not None:
        register()
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
              if not _NOISE.search(line)]
      sys.stderr.write("".join(kept))
      sys.stderr.flush()
