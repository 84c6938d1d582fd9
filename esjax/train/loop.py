"""The training loop: data, train state (fresh, resumed or init_from), jitted steps,
validation, metrics, checkpoints and the collapse guard.

Read top to bottom: setup, restore or create the state, then the loop. Step t's metrics are
fetched only after step t+1 has been dispatched, so the host never stalls the device, except
at checkpoint and final steps, whose loss is checked before the state is saved: a checkpoint
never holds the result of a NaN/Inf step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from esjax.configs import common
from esjax.data import dataset, hosts
from esjax.models import params as params_lib
from esjax.train import (checkpoint, guard as guard_lib, init_from, metrics as metrics_lib,
                         state as state_lib, step as step_lib, workdir as workdir_lib)


def check_config(config: ml_collections.ConfigDict, model_cfg: Any) -> None:
  """Cross-section checks that no single section can make."""
  common.check_ranges(config)
  t = config.train
  if t.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len="
                     f"{model_cfg.max_seq_len}")
  e, k, cf = model_cfg.n_experts, model_cfg.top_k, model_cfg.capacity_factor
  if model_cfg.is_moe and not cf <= e:  # a capacity of ~1e30 tokens overflowed in the step
    raise ValueError(f"model.capacity_factor={cf}, expected a number in [0, n_experts={e}] (0: "
                     f"dropless; from n_experts / top_k = {e / k:g} on, no token is dropped)")


def _write_configs(workdir: str, config: ml_collections.ConfigDict, model_cfg: Any) -> None:
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(workdir, "model_config.json"), "w", encoding="utf-8") as f:
    json.dump(model_cfg.to_dict(), f, indent=2, sort_keys=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       task_hook: Callable[[Any], Any] | None = None,
                       stop: Callable[[int], str | None] | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint). Returns a summary:
  `first_loss` (of this invocation), `last_loss`, `val_loss`, `step`, `wall_s`, and
  `stopped` (what `stop` returned, or None).

  `task_hook`: `tokenizer -> hook` with `hook.due(step)` and `hook(step, model, force=)`, the
  benchmark tasks of the `eval` section (`esjax.eval.hook.for_config(config.eval)`).
  `stop(step)`: asked after every step (on every process: under jax.distributed it is where
  the processes agree on the preemption step); a non-empty answer (e.g. 'SIGTERM') saves a
  checkpoint of that step and returns (esjax.main sets it from SIGTERM and SIGINT).

  Nothing in `workdir` is written before the config, the workdir lock and the resume checks
  pass (config.json records the run that trains)."""
  if config.eval.tasks and task_hook is None:
    raise ValueError(f"eval.tasks={config.eval.tasks!r} needs a task evaluator: run through "
                     "`python -m esjax.main`, or pass task_hook=esjax.eval.hook.for_config("
                     "config.eval)")
  t0 = time.perf_counter()
  is_main = jax.process_index() == 0
  model_cfg = common.model_config(config)
  check_config(config, model_cfg)
  tc = config.train
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, expected a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_lib.Lock(workdir) if is_main else None
  except PermissionError as e:
    raise ValueError(f"--workdir={workdir} is not writable ({e.strerror})") from None
  ckpt = writer = None
  try:
    # Data.
    data = dataset.build(config.data, tc.seq_len, tc.batch_size, tc.seed, tc.eval_batches,
                         cache_dir=os.path.join(workdir, "data_cache"))  # prepared once
    if data.tokenizer.vocab_size > model_cfg.vocab_size:
      raise ValueError(f"data.tokenizer={config.data.tokenizer!r} has "
                       f"{data.tokenizer.vocab_size} ids but model.vocab_size="
                       f"{model_cfg.vocab_size}")
    tasks = None if task_hook is None else task_hook(data.tokenizer)

    # Model, layout, optimizer, steps (the planner compiles the same ones).
    run = step_lib.for_config(config)
    steps, engine = run.steps, run.steps.engine
    check_host_memory(steps.abstract_state)
    batch_sh = steps.batch_sharding
    rows = hosts.process_rows(batch_sh, (tc.batch_size, tc.seq_len))  # the rows read here

    def put(local):  # this process's rows -> global device arrays
      return hosts.global_batch(local, rows, batch_sh, tc.batch_size)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, checkpoint.CHECKPOINT_DIR),
                                   keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save)
    latest = ckpt.latest_good_step()
    if latest is not None:
      workdir_lib.check_resume(ckpt.model_config(latest).to_dict(), model_cfg.to_dict(),
                               ckpt.step_dir(latest))

    # Restore (same workdir), or init_from another run's weights, or fresh.
    if latest is not None:
      try:
        state, data_state = ckpt.restore(latest, steps.abstract_state, engine.fmt)
      except ValueError as e:  # orbax's tree mismatch: say which setting made it
        raise ValueError(_optimizer_change(workdir, config, ckpt.step_dir(latest)) or str(e)
                         ) from e
      note = data.train.restore(data_state)
      if note and is_main:
        print(f"esjax: note: {note}", file=sys.stderr, flush=True)
      health = ckpt.health(latest)
      tqdm.tqdm.write(f"resumed from {ckpt.step_dir(latest)}" + (
          f" (loss {health['loss']:.4g}, gradient norm {health['grad_norm']:.3g}, largest "
          f"|parameter| {health['max_abs_param']:.3g})" if health else ""))
      earlier = [ckpt.health(s) for s in ckpt.all_steps() if s < latest]
      warning = guard_lib.resume_warning(latest, health, [h for h in earlier if h])
      if config.checkpoint.init_from:  # a resume continues this run, not another's weights
        warning = (f"checkpoint.init_from={config.checkpoint.init_from!r} is not used: this "
                   f"run resumes from its own step {latest}" + (f"; {warning}" if warning
                                                                else ""))
      if warning and is_main:
        print(f"esjax: warning: {warning}", file=sys.stderr, flush=True)
    else:
      params = None
      if config.checkpoint.init_from:
        params = init_from.load(config, model_cfg, engine.plan)
      state = state_lib.create_train_state(engine, run.tx, jax.random.key(tc.seed), params)
    start = int(jax.device_get(state.step))
    if data.train.position != start:
      raise ValueError(f"checkpoint step {start} but data position {data.train.position}")
    if start >= tc.steps:
      tqdm.tqdm.write(f"checkpoint step {start} already reaches train.steps={tc.steps}: "
                      "nothing to train (raise train.steps to continue)")
    if is_main:  # Steps after the checkpoint are run again: drop their old records.
      _write_configs(workdir, config, model_cfg)
      metrics_lib.truncate(workdir, start)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    val_batches = [put({k: v[rows] for k, v in b.items()}) for b in data.val]
    return _run(config, state, data, rows, put, steps, val_batches, tasks, ckpt, writer,
                model_cfg, start, t0, is_main, stop)
  finally:
    if ckpt is not None:
      ckpt.close()
    if writer is not None:
      writer.close()
    if lock is not None:
      lock.release()


def _optimizer_change(workdir: str, config: ml_collections.ConfigDict, step_dir: str
                      ) -> str | None:
  """Why the optimizer state of the run that wrote `workdir` cannot be this run's, if a
  setting that shapes it changed (gradient clipping adds a transformation to the chain)."""
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      before = float(json.load(f)["optim"]["grad_clip"])
  except (OSError, ValueError, KeyError, TypeError):
    return None
  now = float(config.optim.grad_clip)
  if (before > 0) == (now > 0):
    return None
  return (f"cannot resume {step_dir} with optim.grad_clip={now:g}: its optimizer state was "
          f"saved with grad_clip={before:g}, and clipping on or off changes the state's "
          "structure; keep clipping on (any value > 0) or off, or start a new run from its "
          f"weights with checkpoint.init_from={step_dir}")


def check_host_memory(abstract_state: Any, available: int | None = None) -> None:
  """On CPU devices (host memory), refuses a train state that cannot fit before allocating
  it, in one line: allocating one far too big left the process idle, without a word and
  deaf to SIGTERM. `available`: bytes (default: the kernel's MemAvailable)."""
  if jax.default_backend() != "cpu":
    return  # device memory: XLA's RESOURCE_EXHAUSTED is reported in one line already
  need = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_state))
  available = _mem_available() if available is None else available
  if available is not None and need > available:
    raise ValueError(f"the train state (weights and optimizer state) needs {need / 2**30:,.1f}"
                     f" GiB of host memory, {available / 2**30:,.1f} GiB is available: a "
                     "smaller model, or `python -m esjax.plan` for a cluster that holds it")


def _mem_available() -> int | None:
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _evaluate(eval_step, state, val_batches) -> float:
  losses = [eval_step(state.params, b, state.buffers)["ce_loss"] for b in val_batches]
  return float(np.mean(jax.device_get(losses)))


def _run(config, state, data, rows, put, steps, val_batches, tasks, ckpt, writer, model_cfg,
         start, t0, is_main, stop) -> dict[str, Any]:
  tc, cc = config.train, config.checkpoint
  guard = guard_lib.CollapseGuard(tc.spike_factor, tc.spike_window)
  tokens_per_step = tc.batch_size * tc.seq_len
  summary: dict[str, Any] = {"step": start, "first_loss": None, "last_loss": None,
                             "val_loss": None, "stopped": None}
  # Throughput counts training time: evaluation seconds since the last record are taken out.
  clock = {"step": start, "time": time.perf_counter(), "eval_s": 0.0}
  last = {}  # loss and gradient norm of the last step that passed the guard
  warned: set[str] = set()  # one-time warnings already given
  max_abs = jax.jit(lambda p: jnp.max(jnp.stack(
      [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(p)])))
  bar = tqdm.tqdm(total=tc.steps, initial=start, desc="train", unit="step",
                  mininterval=1.0, dynamic_ncols=True, disable=not is_main)

  def where() -> str:
    ckpt.wait()
    saved = ckpt.all_steps()
    return (f" The last good checkpoint is step {max(saved)} in {ckpt.directory}." if saved
            else " No checkpoint was written.")

  def finish(step: int, metrics: Any, val_loss: float | None,
             task_metrics: dict[str, float], eval_s: float | None) -> None:
    """Host side of a dispatched step: guard, log record, progress."""
    loss, grad_norm = map(float, jax.device_get((metrics["loss"], metrics["grad_norm"])))
    try:
      guard.check(step, loss, grad_norm)
    except guard_lib.TrainingCollapsed as e:
      raise guard_lib.TrainingCollapsed(f"{e}{where()}") from None
    summary["first_loss"] = loss if summary["first_loss"] is None else summary["first_loss"]
    summary.update(step=step, last_loss=loss)
    last.update(loss=loss, grad_norm=grad_norm)
    bar.update(step - bar.n)
    if step == start + 1:  # Throughput excludes the first step (compilation).
      clock.update(step=step, time=time.perf_counter(), eval_s=0.0)
    else:
      clock["eval_s"] += eval_s or 0.0
    if step % tc.log_every and val_loss is None and not task_metrics and step != tc.steps:
      return
    record = metrics_lib.step_record(step, jax.device_get(metrics))
    now = time.perf_counter()
    if step > clock["step"]:
      record["tokens_per_s"] = ((step - clock["step"]) * tokens_per_step
                                / (now - clock["time"] - clock["eval_s"]))
      clock.update(step=step, time=now, eval_s=0.0)
    if eval_s is not None:
      record["eval_s"] = eval_s
    line = f"step {step:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e}"
    if val_loss is not None:
      record["val_loss"] = summary["val_loss"] = val_loss
      line += f" | val_loss {val_loss:.4f}"
    if "tokens_per_s" in record:
      line += f" | {record['tokens_per_s']:,.0f} tok/s"
    if eval_s is not None:
      line += f" | eval {eval_s:.1f} s"
    record.update(task_metrics)
    shown = ("/acc", "/acc_norm", "/exact_match_flexible", "/bits_per_byte")
    line += "".join(f" | {k[5:]} {v:.4f}" for k, v in task_metrics.items() if k.endswith(shown))
    writer.write(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
    if is_main:
      tqdm.tqdm.write(line)
      overflow = record.get("ep_overflow_by_layer")
      if overflow and "ep_overflow" not in warned:
        warned.add("ep_overflow")
        layer = int(np.argmax(overflow))
        print(f"esjax: warning: step {step}: the EP buffers dropped {overflow[layer]:.2%} of "
              f"the routed rows of MoE layer {layer} (model.ep_buffer_factor="
              f"{model_cfg.ep_buffer_factor}; raise it, or 0 for the exact dropless bound); "
              "metrics.jsonl has ep_overflow_fraction per step", file=sys.stderr, flush=True)

  pending = None  # (step, device metrics, val_loss) of the last dispatched step
  try:
    for step in range(start + 1, tc.steps + 1):
      batch = put(data.train.next_rows(rows))
      state, metrics = steps.train(state, batch)  # Dispatch step `step` ...
      if pending is not None:
        finish(*pending)  # ... then wait for the previous one.
      val_loss, task_metrics, eval_s = None, {}, None
      val_due = tc.eval_every and val_batches and (step % tc.eval_every == 0 or step == tc.steps)
      tasks_due = tasks is not None and (tasks.due(step) or step == tc.steps)
      if val_due or tasks_due:
        jax.block_until_ready(metrics)  # the step's own time stays training time
        t_eval = time.perf_counter()
        if val_due:
          val_loss = _evaluate(steps.evaluate, state, val_batches)
        if tasks_due:
          params = state_lib.params_from_state(state.params, steps.engine)
          buffers = state_lib.buffers_from_state(state.buffers, steps.engine)
          model = params_lib.model_from_params(steps.engine.cfg, params, buffers)  # checked
          task_metrics = tasks(step, model, force=True)
        eval_s = time.perf_counter() - t_eval
      pending = (step, metrics, val_loss, task_metrics, eval_s)
      stopped = stop(step) if stop is not None else None
      if step == tc.steps or (cc.every and step % cc.every == 0) or stopped:
        finish(*pending)  # A checkpoint only after its step's loss passed the guard.
        pending = None
        ckpt.save(state, data.train.state(), model_cfg, steps.engine.fmt,
                  health=dict(last, max_abs_param=float(jax.device_get(max_abs(state.params)))))
      else:
        ckpt.seal_finished()  # a finished save is sealed now, not at the next one
      if stopped:
        summary["stopped"] = stopped
        break
  finally:
    bar.close()  # an error's line then starts a line of its own
  summary["wall_s"] = time.perf_counter() - t0
  return summary
