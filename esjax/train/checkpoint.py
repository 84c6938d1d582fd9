"""Checkpoints: orbax `CheckpointManager` (args API) in `<workdir>/checkpoints/<step>/`.

Each checkpoint is a Composite of four items:
  `params`        the parameter tree (pure dict, see `esjax.train.state`),
  `opt_state`     the optax state,
  `data`          the data iterator's position (JSON),
  `model_config`  the `ModelConfig` as JSON, so a checkpoint says what it holds.
Orbax writes each step into a temporary directory and renames it when complete, so a run
killed at any moment leaves either a whole checkpoint or one that is never listed (leftover
temporary directories are removed the next time the manager opens). The last `keep` are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from esjax.models.config import ModelConfig
from esjax.train import state as state_lib
from esjax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
  """Saves and restores train states (+ data position and model config) under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("params", "opt_state", "data", "model_config"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, state: TrainState, data_state: dict[str, Any], model_cfg: ModelConfig
           ) -> int:
    """Saves `state` as step `state.step` (async when configured); returns the step."""
    step = int(jax.device_get(state.step))
    self._mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data=ocp.args.JsonSave(data_state),
        model_config=ocp.args.JsonSave(model_cfg.to_dict())), force=True)
    return step

  def save_params(self, step: int, params: Any, model_cfg: ModelConfig) -> int:
    """Saves only parameters and model config: a checkpoint to start runs from
    (`checkpoint.init_from`) or to evaluate, not to resume (no optimizer state)."""
    self._mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        model_config=ocp.args.JsonSave(model_cfg.to_dict())), force=True)
    return step

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """The train state at `step` laid out like `target` (abstract, with shardings), and the
    data position saved with it."""
    out = self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target.params),
        opt_state=ocp.args.StandardRestore(target.opt_state),
        data=ocp.args.JsonRestore()))
    state = TrainState(step=jax.numpy.asarray(step, jax.numpy.int32), params=out.params,
                       opt_state=out.opt_state)
    if target.step.sharding is not None:
      state = state.replace(step=jax.device_put(state.step, target.step.sharding))
    return state, dict(out.data)

  def model_config(self, step: int | None = None) -> ModelConfig:
    step = self.latest_step() if step is None else step
    out = self._mngr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return ModelConfig.from_dict(dict(out.model_config))

  def restore_params(self, step: int, target: Any) -> Any:
    out = self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))
    return out.params

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def _locate(path: str) -> tuple[str, int]:
  """(checkpoints directory, step) for a run's workdir, its checkpoints directory, or one
  step directory inside it."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint.init_from={path!r}: no such directory")
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    path = os.path.join(path, CHECKPOINT_DIR)
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(name)
  steps = sorted(int(d) for d in os.listdir(path)
                 if d.isdigit() and os.path.isdir(os.path.join(path, d, "params")))
  if not steps:
    raise FileNotFoundError(f"checkpoint.init_from={path!r}: no complete checkpoint there "
                            "(expected a run's workdir, its checkpoints/ or checkpoints/<step>)")
  return path, steps[-1]


def restore_params(path: str, target: Any = None) -> tuple[ModelConfig, Any]:
  """(model config, params) of the latest checkpoint at `path` (a workdir, its checkpoints
  directory or a step directory), without optimizer state. `target` (abstract params with
  shardings, or a function of the checkpoint's model config that returns them) places them;
  by default they are built for the checkpoint's own model config on the default device."""
  directory, step = _locate(path)
  ckpt = Checkpointer(directory, keep=0, async_save=False, read_only=True)
  try:
    model_cfg = ckpt.model_config(step)
    if callable(target):
      target = target(model_cfg)
    if target is None:
      _, abstract = state_lib.abstract_model(model_cfg)
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            nnx.to_pure_dict(abstract))
    return model_cfg, ckpt.restore_params(step, target)
  finally:
    ckpt.close()
