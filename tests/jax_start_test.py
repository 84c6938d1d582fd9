"""esjax starts JAX quietly on a machine without an NVIDIA GPU that has the CUDA plugin
installed (esjax/jax_start.py), and passes everything else written to stderr on.

The plugin is a stand-in with the CUDA plugin's behaviour on such a machine: a `jax_plugins`
module whose import writes absl's pre-initialization lines to descriptor 2 and whose
`initialize` fails unless the platforms exclude CUDA (the real plugin skips its version check
then). A line of its own at import must survive the filter.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from esjax import jax_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
         "STDERR\nI0000 00:00:1796636945.192253    7521 cudart_stub.cc:31] Could not find cuda "
         "drivers on your machine, GPU will not be used.\n")
PLUGIN = f"""
import os
os.write(2, {NOISE!r}.encode())
os.write(2, b"plugin: a line of its own\\n")

def initialize():
  os.write(2, {NOISE!r}.encode())
  from jax._src import config
  if config.jax_platforms.value != "cpu":
    raise RuntimeError("Unable to load CUDA. Is it installed?")
"""

pytestmark = pytest.mark.skipif(jax_start.has_nvidia_gpu(), reason="this machine has a GPU")


def _run(tmp_path, code: str, **env) -> str:
  plugin = tmp_path / "jax_plugins" / "xla_cuda_standin"
  plugin.mkdir(parents=True, exist_ok=True)
  (plugin / "__init__.py").write_text(PLUGIN)
  environ = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  environ.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", **env)
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ,
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stderr


def test_the_standin_plugin_makes_the_noise_without_esjax(tmp_path):
  err = _run(tmp_path, "import jax; jax.devices()")
  assert "cudart_stub.cc" in err and "Unable to load CUDA" in err


def test_esjax_imports_and_runs_jax_quietly_and_passes_other_lines_on(tmp_path):
  err = _run(tmp_path, """
      import esjax, jax, sys
      jax.numpy.ones(3).sum().block_until_ready()
      print("after:", jax.devices()[0].platform, file=sys.stderr)""")
  assert err == "plugin: a line of its own\nafter: cpu\n"


def test_platforms_set_by_the_user_are_left_alone(tmp_path):
  err = _run(tmp_path, "import esjax, jax; jax.devices()", JAX_PLATFORMS="cpu")
  assert "cudart_stub.cc" in err
