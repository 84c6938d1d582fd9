"""The one seam between the training loop and `esjax.parallel`.

The loop asks `make_layout(config.parallel, model_cfg)` once and uses only the `Layout`
interface: a context entered around building, compiling and running the step functions,
the shardings of the train state and of a batch, and how a host batch becomes a (global)
device array. With the default `parallel` section (every size 1) this is `SingleDevice`:
no mesh, jit's default placement. Any other layout is built by `esjax.parallel.mesh`,
which implements the same interface.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol

import jax
import numpy as np

from esjax.models.config import ModelConfig

_SIZES = ("dp", "tp", "cp", "pp", "ep", "etp", "microbatches")


class Layout(Protocol):
  """How a run is laid out over devices (see module docstring)."""

  def context(self) -> ContextManager[Any]: ...

  def state_shardings(self, abstract_state: Any, abstract_params: Any) -> Any: ...

  def batch_sharding(self) -> Any: ...

  def put_batch(self, batch: dict[str, np.ndarray], rows: np.ndarray | None = None,
                batch_size: int | None = None) -> dict[str, jax.Array]:
    """Host batch -> device arrays: the global batch, or with `rows` only those rows of a
    `batch_size` global batch (this process's: esjax.data.hosts.process_rows)."""


class SingleDevice:
  """No mesh: everything on the default device."""

  def context(self) -> ContextManager[Any]:
    return contextlib.nullcontext()

  def state_shardings(self, abstract_state: Any, abstract_params: Any) -> None:
    del abstract_state, abstract_params
    return None

  def batch_sharding(self) -> None:
    return None

  def put_batch(self, batch: dict[str, np.ndarray], rows: np.ndarray | None = None,
                batch_size: int | None = None) -> dict[str, jax.Array]:
    del rows, batch_size  # One process holds every row.
    return jax.device_put(batch)


def is_single_device(parallel_cfg: Any) -> bool:
  return all(parallel_cfg[k] == 1 for k in _SIZES) and not parallel_cfg.fsdp


def make_layout(parallel_cfg: Any, model_cfg: ModelConfig) -> Layout:
  """`SingleDevice()` for the default section, else the layout `esjax.parallel` builds
  (`esjax.parallel.mesh.training_layout(parallel_cfg, model_cfg)`)."""
  if is_single_device(parallel_cfg):
    return SingleDevice()
  try:
    from esjax.parallel import mesh  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "esjax.parallel.mesh":
      raise
    raise ValueError(f"parallel={dict(parallel_cfg.items())} asks for a multi-device layout, but "
                     "esjax.parallel.mesh is not available in this checkout") from None
  return mesh.training_layout(parallel_cfg, model_cfg)
