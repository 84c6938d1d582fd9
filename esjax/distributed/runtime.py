"""Asynchronous parameter-server training on Ray: one server actor, N worker actors.

Each worker loops on its own (compute on the local model, push to the server, apply the
reply) with no barrier between workers; the server actor serves one push at a time in
arrival order. The driver (`AsyncTraining`) only watches: it drains the server's per-update
records into `metrics.jsonl`, evaluates and checkpoints the server's model from time to
time, and notes workers that die. A dead worker costs its remaining steps, nothing else: the
server and the other workers go on, and the model lives in the server actor (and in the
last checkpoint). A dead server ends the run (`ServerDied`: the workers are stopped, and the
same command resumes from the last checkpoint).

`init_ray(None)` starts Ray on this machine; `init_ray("auto")` or `init_ray("host:6379")`
joins a running cluster (`ray start --head` on one node, `ray start --address=...` on the
others). Workers are spread over the cluster's CPUs by Ray's scheduler.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import warnings
from typing import Any

import jax
import numpy as np
import ray
from absl import logging
from flax import nnx

from esjax.configs import common
from esjax.data import dataset
from esjax.distributed.server import MODES, RESYNCS, ParameterServer
from esjax.distributed.worker import Worker, abstract_model, init_params
from esjax.optim import dgs
from esjax.models import moe
from esjax.models.loss import lm_loss
from esjax.train.metrics import MetricWriter

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def init_ray(address: str | None = None, num_cpus: int | None = None,
             ship_code: bool = True) -> None:
  """Start (address None) or join a Ray cluster, making `esjax` importable by the actors."""
  if ray.is_initialized():
    return
  if address is None:
    path = os.pathsep.join(p for p in (os.path.dirname(_PACKAGE_DIR),
                                       os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
  else:  # other machines get the package from the driver unless it is installed there
    runtime_env = {"py_modules": [_PACKAGE_DIR]} if ship_code else {}
  # "local": always a fresh instance here, never a cluster `ray start` left running.
  kwargs = {"num_cpus": num_cpus, "include_dashboard": False} if address is None else {}
  with warnings.catch_warnings():  # Ray starts its processes with fork + exec: safe here
    warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
    ray.init(address=address or "local", runtime_env=runtime_env, log_to_driver=True,
             logging_level=std_logging.ERROR, **kwargs)  # its start-up lines are noise


class ServerDied(RuntimeError):
  """The parameter server actor is gone, and with it the model since the last checkpoint."""


@ray.remote
class WorkerActor:
  """A `Worker` that trains against the server actor until it has done `num_steps`."""

  def __init__(self, server, worker_id: int, **worker_kwargs):
    self.server, self.worker_id = server, worker_id
    self.worker = Worker(worker_id, **worker_kwargs)

  def run(self, num_steps: int) -> dict[str, Any]:
    self.worker.set_params(ray.get(self.server.register.remote(self.worker_id)))
    for _ in range(num_steps):
      payload, info = self.worker.compute()
      self.worker.receive(ray.get(self.server.push.remote(self.worker_id, payload, info)))
    return {"worker": self.worker_id, "steps": self.worker.step}


class AsyncTraining:
  """Driver of one asynchronous run: `start()`, then `poll()` until `done`, then `finish()`."""

  def __init__(self, config, workdir: str):
    validate(config)
    self.config, self.workdir = config, workdir
    os.makedirs(workdir, exist_ok=True)
    self.model_cfg = common.model_config(config)  # the workers check it on their devices
    self.graphdef, abstract, self.rest = abstract_model(moe.checked(self.model_cfg))
    self.treedef = jax.tree.structure(abstract)
    train = config.train
    self.data = dataset.build(config.data, train.seq_len, train.batch_size, train.seed,
                              train.eval_batches)
    if self.data.tokenizer.vocab_size > self.model_cfg.vocab_size:
      raise ValueError(f"tokenizer vocab {self.data.tokenizer.vocab_size} > model.vocab_size="
                       f"{self.model_cfg.vocab_size}")
    self.val_batches = self.data.val
    self._eval_fn = jax.jit(lambda p, b: lm_loss(nnx.merge(self.graphdef, p, self.rest), b)[0])
    self.ckpt = None
    if config.checkpoint.enabled:
      import orbax.checkpoint as ocp  # noqa: PLC0415
      self.ckpt = ocp.CheckpointManager(
          os.path.join(os.path.abspath(workdir), "checkpoints"),
          options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep))
    self.server = None
    self.workers: dict[int, Any] = {}
    self.running: dict[Any, int] = {}  # run() ref -> worker id
    self.finished: dict[int, dict[str, Any]] = {}
    self.dead: dict[int, str] = {}
    self.last_eval = -1
    self.version = 0  # the server's, as last seen
    self.saved: int | None = None  # the last checkpoint's version
    self.staleness_sum = self.staleness_n = 0
    self.updates_by_worker: dict[int, int] = {}  # server updates logged, per worker
    self.writer = None
    self.summary: dict[str, Any] = {}

  # --- lifecycle -----------------------------------------------------------------------------

  def start(self) -> None:
    cfg = self.config
    params, version = self._initial_params()
    self.writer = MetricWriter(self.workdir)
    with open(os.path.join(self.workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    n = cfg.train.num_workers
    # Local Ray: at least enough logical CPUs for every actor (oversubscribing the cores).
    needed = math.ceil(n * cfg.ray.cpus_per_worker + cfg.ray.cpus_per_server)
    init_ray(cfg.ray.address, cfg.ray.num_cpus or max(needed, os.cpu_count() or 1),
             cfg.ray.ship_code)
    mode = cfg.dgs.mode
    self.server = ray.remote(ParameterServer).options(num_cpus=cfg.ray.cpus_per_server).remote(
        params, mode, cfg.dgs.down_ratio, cfg.dgs.resync_every, version, up_ratio=cfg.dgs.ratio,
        resync=cfg.dgs.resync)
    remaining = max(0, cfg.train.steps_per_worker * n - version)
    shards = np.array_split(self.data.train.windows, n)  # contiguous, disjoint
    optim = cfg.optim.to_dict()
    optim["decay_steps"] = optim["decay_steps"] or cfg.train.steps_per_worker
    for k in range(n):
      self.workers[k] = WorkerActor.options(
          num_cpus=cfg.ray.cpus_per_worker, runtime_env=_worker_env(cfg)).remote(
              self.server, k, model_cfg=self.model_cfg.to_dict(), optim=optim,
              mode=mode, ratio=cfg.dgs.ratio, windows=ray.put(shards[k]),
              batch_size=cfg.train.batch_size, seed=cfg.train.seed,
              ratio_follows_lr=cfg.dgs.ratio_follows_lr)
      steps = remaining // n + (k < remaining % n)
      self.running[self.workers[k].run.remote(steps)] = k
    logging.info("DGS %s: %d workers, %d updates to go from version %d", mode, n, remaining,
                 version)

  @property
  def done(self) -> bool:
    return not self.running

  def poll(self, timeout: float = 1.0) -> None:
    """Collect finished or dead workers, log the server's records, evaluate when due."""
    ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout)
    for ref in ready:
      k = self.running.pop(ref)
      try:
        self.finished[k] = ray.get(ref)
      except ray.exceptions.RayActorError as e:  # killed, crashed, or its node went away
        version = self.server_version()  # ServerDied if the server is what the worker lost
        self.dead[k] = type(e).__name__
        logging.warning("worker %d died (%s); the others go on", k, type(e).__name__)
        self.writer.write({"step": version, "event": "worker_died", "worker": k})
    self._log_records()
    every = self.config.train.eval_every
    if every and self.server_version() // every > self.last_eval // every:
      self.evaluate()

  def finish(self) -> dict[str, Any]:
    """Final records, evaluation and checkpoint; stops the actors; returns the summary."""
    self._log_records()
    snap = self.evaluate() if self.server_version() != self.last_eval else self.last_snap
    if self.ckpt is not None:
      self.ckpt.wait_until_finished()
    n_updates = snap["updates"]
    self.summary = {
        "mode": self.config.dgs.mode, "version": snap["version"], "updates": n_updates,
        "val_loss": snap["val_loss"], "bytes_up": snap["bytes_up"],
        "bytes_down": snap["bytes_down"], "dead_workers": sorted(self.dead),
        "finished_workers": sorted(self.finished),
        "up_density": snap["entries_up"] / max(1, n_updates * snap["n_entries"]),
        "down_density": snap["entries_down"] / max(1, n_updates * snap["n_entries"]),
        "up_bytes_ratio": snap["bytes_up"] / max(1, n_updates * snap["dense_bytes"]),
        "dense_replies": snap["dense_replies"], "model_bytes": snap["dense_bytes"],
        "mean_staleness": self.staleness_sum / max(1, self.staleness_n),
        "time": snap["time"]}
    with open(os.path.join(self.workdir, "summary.json"), "w") as f:
      json.dump(self.summary, f, indent=2)
    for actor in [*self.workers.values(), self.server]:
      ray.kill(actor)
    self.writer.close()
    return self.summary

  def run(self) -> dict[str, Any]:
    self.start()
    try:
      while not self.done:
        self.poll()
    except ServerDied:
      self.writer.close()
      raise
    return self.finish()

  # --- helpers -------------------------------------------------------------------------------

  def _ask_server(self, method: str) -> Any:
    """`server.method()`; if the server is dead, stops the workers and raises ServerDied."""
    try:
      return ray.get(getattr(self.server, method).remote())
    except ray.exceptions.RayActorError as e:
      for actor in self.workers.values():
        ray.kill(actor)
      self.running.clear()
      resume = (f"run the same command to resume from its checkpoint at version {self.saved}"
                if self.saved is not None else "no checkpoint was written")
      raise ServerDied(f"the parameter server died ({type(e).__name__}) after version "
                       f"{self.version}; the workers were stopped; {resume}") from None

  def server_version(self) -> int:
    self.version = self._ask_server("get_version")
    return self.version

  def server_params(self) -> tuple[Any, dict[str, Any]]:
    """The server's model as an nnx.State, and its counters."""
    snap = self._ask_server("snapshot")
    self.version = snap["version"]
    return self.treedef.unflatten(snap.pop("params")), snap

  def _log_records(self) -> None:
    for rec in self._ask_server("drain_records"):
      self.staleness_sum += rec["staleness"]
      self.staleness_n += 1
      self.updates_by_worker[rec["worker"]] = self.updates_by_worker.get(rec["worker"], 0) + 1
      self.writer.write(rec)

  def eval_loss(self, params) -> float:
    """Mean loss over the fixed validation batches; `params` an nnx.State or its leaves."""
    if isinstance(params, list):
      params = self.treedef.unflatten([jax.numpy.asarray(x) for x in params])
    return float(np.mean([self._eval_fn(params, b) for b in self.val_batches]))

  def evaluate(self) -> dict[str, Any]:
    params, snap = self.server_params()
    val = self.eval_loss(params)
    if not np.isfinite(val):
      raise FloatingPointError(f"val_loss is {val} at server version {snap['version']}")
    snap["val_loss"] = val
    self.last_eval, self.last_snap = snap["version"], snap
    self.writer.write({"step": snap["version"], "val_loss": val,
                       "bytes_up_total": snap["bytes_up"], "bytes_down_total": snap["bytes_down"],
                       "time": snap["time"]})
    if self.ckpt is not None:
      import orbax.checkpoint as ocp  # noqa: PLC0415
      # The checkpoint step is the server version.
      self.ckpt.save(snap["version"], args=ocp.args.StandardSave(
          {"params": nnx.to_pure_dict(params)}))
      self.saved = snap["version"]
    return snap

  def _initial_params(self) -> tuple[list[np.ndarray], int]:
    """Fresh parameters, or the server model of the last checkpoint in `workdir`."""
    if self.ckpt is None or self.ckpt.latest_step() is None:
      return init_params(self.model_cfg, self.config.train.seed), 0
    import orbax.checkpoint as ocp  # noqa: PLC0415
    step = self.ckpt.latest_step()
    state = abstract_model(self.model_cfg)[1]
    target = {"params": nnx.to_pure_dict(state)}
    restored = self.ckpt.restore(step, args=ocp.args.StandardRestore(target))
    nnx.replace_by_pure_dict(state, restored["params"])
    logging.info("resuming the server model from %s at version %d", self.workdir, step)
    self.saved = self.version = int(step)
    return [np.asarray(x) for x in jax.tree.leaves(state)], int(step)


def validate(config) -> None:
  """One-line errors for a bad config, before any actor starts."""
  if config.dgs.mode not in MODES:
    raise ValueError(f"dgs.mode={config.dgs.mode!r}, expected one of {MODES}")
  for name in ("ratio", "down_ratio"):
    if not 0.0 < config.dgs[name] <= 1.0:
      raise ValueError(f"dgs.{name}={config.dgs[name]} must be in (0, 1]")
  if config.dgs.resync_every < 0:
    raise ValueError(f"dgs.resync_every={config.dgs.resync_every} must be >= 0 (0: never)")
  if config.dgs.resync not in RESYNCS:
    raise ValueError(f"dgs.resync={config.dgs.resync!r}, expected one of {RESYNCS}")
  if config.dgs.ratio_follows_lr and config.optim.lr <= 0:
    raise ValueError(f"dgs.ratio_follows_lr needs optim.lr > 0, got {config.optim.lr}")
  if config.train.num_workers < 1 or config.train.steps_per_worker < 0:
    raise ValueError(f"train.num_workers={config.train.num_workers} must be >= 1 and "
                     f"train.steps_per_worker={config.train.steps_per_worker} >= 0")
  if config.optim.schedule not in ("constant", "cosine"):
    raise ValueError(f"optim.schedule={config.optim.schedule!r}, expected 'constant' or 'cosine'")


def _worker_env(config) -> dict[str, Any] | None:
  env = dict(config.ray.worker_env)
  return {"env_vars": env} if env else None


def expected_density(config) -> float:
  """The fraction of entries a sparse upload sends under `config` (per-tensor rounding)."""
  _, abstract, _ = abstract_model(common.model_config(config))
  return dgs.expected_density(abstract, config.dgs.ratio)

