"""Checkpoints: orbax `CheckpointManager` (args API) in `<workdir>/checkpoints/<step>/`.

Each checkpoint is a Composite of these items:
  `params`        the model's own tree (`layers.{i}`: one array per layer and parameter),
                  whatever layout wrote it,
  `opt_state`     the optax state, its moments in the same per-layer tree,
  `buffers`       the model's buffers (DeepSeek-V3's expert biases), per layer too,
  `data`          the data iterator's position (JSON),
  `model_config`  the `ModelConfig` as JSON, so a checkpoint says what it holds,
  `layout`        the format (JSON) and how the writing run stacked its layers,
  `health`        the saved step's loss, gradient norm and largest |parameter| (JSON; a
                  resume near a collapse says so, `esjax.train.guard.resume_warning`).

Layout-free. The train state stacks the layers by pipeline stage; `esjax.train.relayout`
splits them into per-layer arrays on the devices that hold them, so saving gathers nothing
(each process writes its own shards), and `esjax.train.shard_reader` reads a checkpoint into
any other layout, each device reading its own shard of each layer. A run therefore resumes,
optimizer and data position included, under any other pp, virtual_stages, tp, ep, cp, dp,
fsdp or ZeRO-1 setting, on any number of devices and processes. One exception to the
per-layer tree: orbax writes only arrays that span processes, so a multi-process run whose
layers each lie on one process (a pipeline stage per host) writes the stacked tree
(`layout.format` "stacked", with its stacking), which orbax restores straight into a run
stacked the same way and `shard_reader` into any other. Checkpoints written before the
`layout` item (item `stage_format`) are stacked ones, converted with a one-line note.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed at any moment leaves either a whole checkpoint or one that is never listed (leftover
temporary directories are removed the next time the manager opens). The last `keep` are kept.

Each completed step also gets checksum manifests (`esjax.train.integrity`): each process
checksums the files it wrote once orbax has finished the step (`seal_finished`, which the
loop calls after every step, or the next save or `close`); a step without them was never
sealed and counts as corrupt. `latest_good_step` verifies
steps newest first, the manifests shared out over the processes and the verdict agreed by
all: a step that does not match is moved aside to `<checkpoints>.corrupt/` (never deleted)
with a one-line warning, and the run resumes from the newest step that matches;
`restore_params` (init_from, esjax.eval, esjax.generate) refuses a step that does not.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from esjax.models import params as params_lib
from esjax.models.config import ModelConfig
from esjax.parallel import stages
from esjax.train import integrity, relayout, shard_reader
from esjax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"
FORMAT = "layers"  # the `layout` item's format: the model's own tree, one array per layer
STACKED = "stacked"  # or the train state's stacked tree (`layout.stacking` says how)


class Checkpointer:
  """Saves and restores train states (+ data position and model config) under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self._read_only = read_only
    self._unsealed: list[int] = []  # saved by this process, manifest not yet written
    if not read_only:
      for path in (self.directory, self.directory + ".corrupt"):  # orbax hung on a file
        if os.path.exists(path) and not os.path.isdir(path):
          raise ValueError(f"{path} is a file, not a directory of checkpoints: move it away "
                           "or use another --workdir")
      _remove_partial_saves(self.directory)
    # orbax's own clean-up of those runs in a thread that close() does not wait for: a run
    # that stops right after opening would exit under it (a traceback at interpreter exit).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=False, enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("params", "opt_state", "data", "model_config", "layout", "buffers",
                    "health", "stage_format"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_good_step(self) -> int | None:
    """The newest step that matches its checksum manifest (or has none: older runs). Newer
    steps that do not match are moved aside to `<directory>.corrupt/` by process 0, each
    with a one-line warning on stderr; if every step fails, a ValueError says so."""
    steps = sorted(self.all_steps(), reverse=True)
    bad = []
    for step in steps:
      why = verify(self.step_dir(step))
      if why is None:
        break
      bad.append((step, why))
    good = steps[len(bad)] if len(bad) < len(steps) else None
    if not bad:
      return good
    if jax.process_count() > 1:  # every process has read the manifests before any move
      multihost_utils.sync_global_devices("esjax_checkpoint_verify")
    aside = self.directory + ".corrupt"
    for step, why in bad:
      dest = os.path.join(aside, str(step))
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        n = 1
        while os.path.exists(dest):
          dest, n = os.path.join(aside, f"{step}.{n}"), n + 1
        os.replace(self.step_dir(step), dest)
      print(f"esjax: warning: checkpoint {self.step_dir(step)} is corrupt ({why}); moved to "
            f"{dest}" + (f", resuming from step {good}" if good is not None else ""),
            file=sys.stderr, flush=True)
    self._mngr.reload()
    if good is None:
      raise ValueError(f"every checkpoint in {self.directory} failed verification (moved to "
                       f"{aside}); restore one by hand or start a new --workdir")
    return good

  def _seal(self) -> None:
    """Writes this process's manifests of the finished saves (every process waits for all
    first: process 0 renames a step into place once every process has written its part)."""
    if self._unsealed and not self._read_only:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("esjax_checkpoint_seal")
      for step in self._unsealed:
        if os.path.isdir(self.step_dir(step)):  # max_to_keep may have removed it already
          integrity.write(self.step_dir(step), jax.process_index(), jax.process_count())
    self._unsealed = []

  def seal_finished(self) -> None:
    """Seals the saves that have finished, without waiting for one that has not (the loop
    calls this after every step, on every process). While a save is pending the processes
    agree whether all have finished it (one small collective per step until it is sealed),
    so a step is sealed soon after it is written, not at the next save."""
    if not self._unsealed:
      return
    done = not self._mngr.is_saving_in_progress()
    if jax.process_count() > 1:
      done = bool(np.all(multihost_utils.process_allgather(np.asarray(done))))
    if done:
      self.wait()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, state: TrainState, data_state: dict[str, Any], model_cfg: ModelConfig,
           fmt: stages.StageFormat, health: dict[str, float] | None = None) -> int:
    """Saves `state` as step `state.step` (async when configured), with `health` (numbers
    about it) when given; returns the step."""
    step = int(jax.device_get(state.step))
    self.wait()
    self._check_space(step, sum(x.nbytes for x in jax.tree.leaves(
        (state.params, state.opt_state, state.buffers))))
    # orbax cannot write an array held by one process of many: where a layer lies within one
    # process (a stage per host), the stacked tree is written instead (restored the same).
    stacked = relayout.has_process_local_layers(state.params)
    put = (lambda t: t) if stacked else (lambda t: relayout.split(t, fmt))  # noqa: E731
    record = {"format": STACKED if stacked else FORMAT, "stacking": fmt.to_dict()}
    items = dict(params=ocp.args.StandardSave(put(state.params)),
                 opt_state=ocp.args.StandardSave(put(state.opt_state)),
                 data=ocp.args.JsonSave(data_state),
                 model_config=ocp.args.JsonSave(model_cfg.to_dict()),
                 layout=ocp.args.JsonSave(record))
    if jax.tree.leaves(state.buffers):
      items["buffers"] = ocp.args.StandardSave(put(state.buffers))
    if health:
      items["health"] = ocp.args.JsonSave(health)
    return self._write(step, items)

  def save_params(self, step: int, params: Any, model_cfg: ModelConfig) -> int:
    """Saves only parameters (the model's own tree) and model config: a checkpoint to start
    runs from (`checkpoint.init_from`) or to evaluate, not to resume (no optimizer state)."""
    self.wait()
    return self._write(step, dict(params=ocp.args.StandardSave(relayout.str_layers(params)),
                                  model_config=ocp.args.JsonSave(model_cfg.to_dict()),
                                  layout=ocp.args.JsonSave({"format": FORMAT})))

  def _write(self, step: int, items: dict[str, Any]) -> int:
    """Starts the save of `items` as `step` (the previous save finished); returns the step."""
    self._unsealed.append(step)
    try:
      self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except (OSError, ValueError, RuntimeError) as e:
      raise self._save_failed(e) from e
    return step

  def stacking(self, step: int) -> tuple[stages.StageFormat | None, bool]:
    """(how `step` stacks its layers, None for one array per layer; whether it is of the
    earlier format, which had no `layout` item)."""
    if os.path.isdir(os.path.join(self.step_dir(step), "stage_format")):
      out = self._mngr.restore(step, args=ocp.args.Composite(
          stage_format=ocp.args.JsonRestore()))
      return stages.StageFormat(**dict(out.stage_format)), True
    out = self._mngr.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))
    if out.layout.get("format") == STACKED:
      return stages.StageFormat(**dict(out.layout["stacking"])), False
    return None, False

  def restore(self, step: int, target: TrainState, fmt: stages.StageFormat
              ) -> tuple[TrainState, dict[str, Any]]:
    """The train state at `step` laid out like `target` (abstract, with shardings, its layers
    stacked as `fmt` says), and the data position saved with it. A checkpoint stacked as
    `fmt` is read by orbax straight into the shardings; any other, one array per layer or
    stacked otherwise, by `shard_reader`: each device reads its own shard of each layer."""
    saved, earlier = self.stacking(step)
    parts = dict(params=target.params, opt_state=target.opt_state)
    if jax.tree.leaves(target.buffers):
      parts["buffers"] = target.buffers
    direct = saved == fmt
    items = {k: ocp.args.StandardRestore(v) for k, v in parts.items()} if direct else {}
    if earlier and not direct and jax.process_index() == 0:
      print(f"esjax: note: {self.step_dir(step)} has the earlier checkpoint format (layers "
            f"stacked for pp={saved.pp}, virtual_stages={saved.virtual}); converting it on "
            "read", file=sys.stderr, flush=True)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore(),
                                                              **items))
      got = ({k: out[k] for k in parts} if direct else
             {k: shard_reader.read(os.path.join(self.step_dir(step), k), saved, v, fmt)
              for k, v in parts.items()})
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise ValueError(f"checkpoint {self.step_dir(step)} could not be read "
                       f"({type(e).__name__}: {first})") from e
    state = TrainState(step=jax.numpy.asarray(step, jax.numpy.int32), params=got["params"],
                       opt_state=got["opt_state"], buffers=got.get("buffers", target.buffers))
    if target.step.sharding is not None:
      state = state.replace(step=jax.device_put(state.step, target.step.sharding))
    return state, dict(out.data)

  def health(self, step: int) -> dict[str, float] | None:
    """What `save` recorded about `step` (None for a checkpoint saved without)."""
    if not os.path.isdir(os.path.join(self.step_dir(step), "health")):
      return None
    out = self._mngr.restore(step, args=ocp.args.Composite(health=ocp.args.JsonRestore()))
    return dict(out.health)

  def model_config(self, step: int | None = None) -> ModelConfig:
    step = self.latest_step() if step is None else step
    out = self._mngr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return ModelConfig.from_dict(dict(out.model_config))

  def restore_item(self, step: int, name: str, target: Any) -> Any:
    """Item `name` ("params", "buffers") of `step`, read into `target` (abstract arrays)."""
    out = self._mngr.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(target)}))
    return out[name]

  def _check_space(self, step: int, need: int) -> None:
    """Refuses a save of about `need` bytes that the filesystem has no room for, before
    anything is written (process 0 looks; every process raises)."""
    why = None
    if jax.process_index() == 0:
      free = shutil.disk_usage(self.directory).free
      if free < need * 1.05 + (1 << 20):
        why = (f"checkpoint step {step} needs about {need / 2**20:,.1f} MiB but "
               f"{self.directory} has {free / 2**20:,.1f} MiB free; {self._intact()}: free "
               "space (or move --workdir) and rerun to resume")
    why = _agree(why)
    if why:
      raise ValueError(why)

  def _intact(self, but: Any = None) -> str:
    """The completed checkpoints (all but step `but`), as a save error says them."""
    intact = [s for s in self.all_steps() if s != but]
    return (f"the checkpoints of steps {intact} are intact" if intact
            else "no earlier checkpoint exists")

  def _save_failed(self, e: BaseException) -> ValueError:
    """One line for a save that failed (a full disk, a lost filesystem): which step, and
    that the completed checkpoints are intact."""
    text = str(e).strip()
    failed = self._unsealed[-1] if self._unsealed else "?"
    self._unsealed = []
    kept = self._intact(but=failed)
    if "No space left on device" in text or "os_error_code='28'" in text:
      return ValueError(f"no space left on device while saving checkpoint step {failed} in "
                        f"{self.directory}; {kept}: free space (or move --workdir) and rerun "
                        "to resume")
    first = text.splitlines()[0][:300] if text else type(e).__name__
    return ValueError(f"saving checkpoint step {failed} in {self.directory} failed ({first}); "
                      f"{kept}")

  def wait(self) -> None:
    try:
      self._mngr.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      raise self._save_failed(e) from e
    self._seal()

  def close(self) -> None:
    self.wait()
    self._mngr.close()


def _remove_partial_saves(directory: str) -> None:
  """Deletes the temporary directories of saves that never completed (a killed run's
  `<step>.orbax-checkpoint-tmp*`; never listed as steps). Process 0 deletes, all wait."""
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in os.listdir(directory):
      if re.fullmatch(r"\d+\.orbax-checkpoint-tmp.*", name):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("esjax_checkpoint_partial_saves")


def _agree(reason: str | None) -> str | None:
  """The first process's reason that is not None, the same on every process."""
  if jax.process_count() == 1:
    return reason
  data = np.zeros(512, np.uint8)
  text = (reason or "").encode("utf-8")[:512]
  data[:len(text)] = np.frombuffer(text, np.uint8)
  for row in multihost_utils.process_allgather(data):
    found = bytes(row).rstrip(b"\0").decode("utf-8", errors="replace")
    if found:
      return found
  return None


def verify(step_dir: str) -> str | None:
  """What is wrong with a saved step (`integrity.problem`), each process checking its share
  of the manifests, the verdict the same on every process; None if nothing."""
  return _agree(integrity.problem(step_dir, jax.process_index(), jax.process_count()))


def _locate(path: str) -> tuple[str, int]:
  """(checkpoints directory, step) for a run's workdir, its checkpoints directory, or one
  step directory inside it."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path!r}: no such directory")
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    path = os.path.join(path, CHECKPOINT_DIR)
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(name)
  steps = sorted(int(d) for d in os.listdir(path)
                 if d.isdigit() and os.path.isdir(os.path.join(path, d, "params")))
  if not steps:
    raise FileNotFoundError(f"checkpoint {path!r}: no complete checkpoint there "
                            "(expected a run's workdir, its checkpoints/ or checkpoints/<step>)")
  return path, steps[-1]


def restore_params(path: str, shardings: Any = None) -> tuple[ModelConfig, Any]:
  """(model config, params of the model's own tree) of the latest checkpoint at `path` (a
  workdir, its checkpoints directory or a step directory), without optimizer state.

  `shardings` (NamedShardings of the model's tree, or a function of the checkpoint's model
  config that returns them) places them: each device reads only its shards. By default they
  are placed on the default device."""
  directory, step = _locate(path)
  why = verify(os.path.join(directory, str(step)))
  if why is not None:
    raise ValueError(f"checkpoint {directory}/{step} is corrupt ({why})")
  ckpt = Checkpointer(directory, keep=0, async_save=False, read_only=True)
  try:
    model_cfg = ckpt.model_config(step)
    if callable(shardings):
      shardings = shardings(model_cfg)
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, params_lib.shapes(model_cfg))
    return model_cfg, _read_model_tree(ckpt, step, "params", params_lib.shapes(model_cfg),
                                       shardings)
  finally:
    ckpt.close()


def restore_buffers(path: str) -> Any:
  """The model's buffers (its own tree, on the default device) of the latest checkpoint at
  `path`: the expert biases a DeepSeek-V3-style model routes with; {} for most models."""
  directory, step = _locate(path)
  ckpt = Checkpointer(directory, keep=0, async_save=False, read_only=True)
  try:
    shapes = params_lib.buffer_shapes(ckpt.model_config(step))
    if not jax.tree.leaves(shapes):
      return {}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return _read_model_tree(ckpt, step, "buffers", shapes,
                            jax.tree.map(lambda _: device, shapes))
  finally:
    ckpt.close()


def _read_model_tree(ckpt: Checkpointer, step: int, item: str, shapes: Any, shardings: Any
                     ) -> Any:
  """Item `item` of `step` as the model's own tree (`shapes`) placed by `shardings`."""
  target = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                        shapes, shardings)
  saved, _ = ckpt.stacking(step)
  if saved is None:
    return relayout.int_layers(ckpt.restore_item(step, item, relayout.str_layers(target)))
  return shard_reader.read(os.path.join(ckpt.step_dir(step), item), saved, target)
