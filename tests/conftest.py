"""Test setup: 8 fake CPU devices (set before any JAX backend starts), float32 matmuls, and
one persistent compilation cache for the run (the xdist workers and the esjax processes the
tests start compile the same tiny steps many times)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"esjax-tests-jax-cache-{os.getuid()}"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
