"""Multi-process start: `jax.distributed` from the environment the launchers set.

`launch/local.sh` (N processes on one machine) and `launch/slurm/node.sh` (one process per
GPU on every node of a SLURM job) export, for each process:

  ESJAX_COORDINATOR       host:port of process 0's coordination service
  ESJAX_NUM_PROCESSES     processes in the job
  ESJAX_PROCESS_ID        this process, 0 .. N-1
  ESJAX_LOCAL_DEVICE_IDS  optional, e.g. "3": the GPUs this process drives

Without ESJAX_COORDINATOR nothing happens (one process). The values are passed to
`jax.distributed.initialize` explicitly, with its own cluster auto-detection off, so a run
does what the launcher says whatever scheduler variables are also set.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax


def _int(env: Mapping[str, str], name: str) -> int:
  value = env.get(name)
  try:
    return int(value)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r}: expected an integer (ESJAX_COORDINATOR is set, so "
                     "this is a multi-process run)") from None


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process job the environment describes; False when there is none."""
  env = os.environ if env is None else env
  coordinator = env.get("ESJAX_COORDINATOR")
  if not coordinator:
    return False
  if ":" not in coordinator:
    raise ValueError(f"ESJAX_COORDINATOR={coordinator!r}: expected host:port")
  n, pid = _int(env, "ESJAX_NUM_PROCESSES"), _int(env, "ESJAX_PROCESS_ID")
  if not 0 <= pid < n:
    raise ValueError(f"ESJAX_PROCESS_ID={pid} must be in [0, ESJAX_NUM_PROCESSES={n})")
  ids = env.get("ESJAX_LOCAL_DEVICE_IDS")
  local = [int(i) for i in ids.split(",")] if ids else None
  jax.distributed.initialize(coordinator, n, pid, local_device_ids=local,
                             cluster_detection_method="deactivate",
                             initialization_timeout=_int(env, "ESJAX_INIT_TIMEOUT")
                             if "ESJAX_INIT_TIMEOUT" in env else 300)
  return True
