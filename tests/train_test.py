"""The training system: schedule, one step against a hand-written AdamW, the collapse guard,
exact resume, init_from and collapse through the loop."""

import math
import os
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from esjax.configs import common, tiny
from esjax.data import dataset
from esjax.models import params as params_lib
from esjax.models.loss import lm_loss
from esjax.train import (checkpoint, guard, init_from, loop, metrics, optimizer,
                         state as state_lib, step as step_lib)


def small_config(steps=4, variant="moe", **train):
  """tiny.py at the smallest size that still reads real text."""
  c = tiny.get_config(f"{variant},steps={steps}")
  c.data.max_bytes = 150_000
  c.train.update({**dict(seq_len=32, batch_size=4, log_every=1, eval_every=0, eval_batches=2),
                  **train})
  c.checkpoint.async_save = False
  c.optim.warmup_steps = 2
  c.parallel.dp = 1  # one of the test process's 8 devices
  return c


def test_schedule_is_linear_warmup_then_cosine():
  cfg = ml_collections.ConfigDict(dict(lr=1.0, schedule="cosine", warmup_steps=10,
                                       final_lr_fraction=0.1))
  lr = optimizer.learning_rate(cfg, total_steps=110)
  for t in (0, 5, 10, 60, 110, 200):
    if t < 10:
      want = t / 10
    else:
      frac = min(t - 10, 100) / 100
      want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
    assert float(lr(t)) == pytest.approx(want, abs=1e-6), t
  cfg.schedule = "constant"
  const = optimizer.learning_rate(cfg, total_steps=110)
  assert [float(const(t)) for t in (5, 10, 1000)] == pytest.approx([0.5, 1.0, 1.0])
  cfg.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    optimizer.learning_rate(cfg, 10)


@pytest.mark.parametrize("max_norm", [0.5, 50.0])  # clipped, and left alone
def test_clip_by_global_norm_scales_by_the_float64_factor(max_norm):
  """g * min(1, max_norm / |g|) against float64 numpy, over a tree; below the threshold
  the gradients come back unchanged, bit for bit."""
  rng = np.random.default_rng(2)
  g = {"w": rng.normal(size=(7, 5)).astype(np.float32),
       "b": {"x": rng.normal(size=(3,)).astype(np.float32),
             "h": rng.normal(size=(4, 2)).astype(np.float32)}}
  out, _ = jax.jit(optimizer.clip_by_global_norm(max_norm).update)(
      jax.tree.map(jnp.asarray, g), optax.EmptyState())
  norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                       for x in jax.tree.leaves(g)))
  scale = min(1.0, max_norm / norm)
  assert (scale < 1) == (max_norm == 0.5)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64) * scale,
                               rtol=1e-6, atol=1e-8)
    if scale == 1:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_step_matches_reference_adamw():
  """One jitted, donated step == nnx gradients + AdamW written out in float64 numpy."""
  c = small_config(variant="dense")
  # eps 1e-6 keeps g / (|g| + eps) insensitive to float32 summation order for tiny g.
  c.optim.update(dict(warmup_steps=0, lr=1e-2, grad_clip=0.5, weight_decay=0.1, eps=1e-6))
  model_cfg = common.model_config(c)
  c.train.batch_size, c.train.seq_len = 2, 16
  run = step_lib.for_config(c)
  engine = run.steps.engine
  state = state_lib.create_train_state(engine, run.tx, jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.integers(0, 256, (2, 16)), jnp.int32)
           for k in ("inputs", "targets")}

  params = state_lib.params_from_state(jax.device_get(state.params), engine)
  model = params_lib.model_from_params(model_cfg, jax.tree.map(jnp.asarray, params))
  grad_fn = nnx.jit(nnx.value_and_grad(lm_loss, has_aux=True))
  (ref_loss, _), grads = grad_fn(model, batch)
  g = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(grads))
  p0 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

  new, m = run.steps.train(state, jax.device_put(batch, run.steps.batch_sharding))
  norm = math.sqrt(sum(float(np.sum(x * x)) for x in jax.tree.leaves(g)))
  scale = min(1.0, 0.5 / norm)
  assert float(m["loss"]) == pytest.approx(float(ref_loss), rel=1e-6)
  assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-5)
  assert int(new.step) == 1 and float(m["lr"]) == pytest.approx(1e-2)

  def adamw_first_step(p, grad):  # m_hat = g, v_hat = g^2 after one step.
    gc = grad * scale
    upd = gc / (np.abs(gc) + 1e-6)
    if p.ndim >= 2:
      upd = upd + 0.1 * p
    return p - 1e-2 * upd

  want = jax.tree.map(adamw_first_step, p0, g)
  got = state_lib.params_from_state(jax.device_get(new.params), engine)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), got, want)


def test_guard_names_the_step():
  g = guard.CollapseGuard(spike_factor=2.0, spike_window=3)
  for s, l in enumerate([3.0, 2.0, 2.5, 3.0], 1):
    g.check(s, l)
  with pytest.raises(guard.TrainingCollapsed, match="step 5: loss 9 is above train.spike_factor"):
    g.check(5, 9.0)
  with pytest.raises(guard.TrainingCollapsed, match="step 6: loss is nan"):
    g.check(6, float("nan"))
  with pytest.raises(guard.TrainingCollapsed, match="step 7: gradient norm is inf"):
    g.check(7, 1.0, float("inf"))
  guard.CollapseGuard().check(8, 1e9)  # No spike check unless asked for.


def test_resume_is_exact(tmp_path):
  """10 steps straight == 5 steps, a restart from the step-5 checkpoint, 5 more."""
  c = small_config(steps=10, eval_every=5)
  c.checkpoint.every = 5
  straight = str(tmp_path / "straight")
  loop.train_and_evaluate(c, straight)
  # The interrupted run: the workdir as if killed after step 10's metrics were written but
  # before its checkpoint was (steps 6-10 run again; their old records are replaced).
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "10"))
  with open(os.path.join(resumed, "metrics.jsonl"), "a") as f:
    f.write('{"step": 11, "loss": 1')  # ... and mid-way through a line.
  summary = loop.train_and_evaluate(c, resumed)
  assert summary["step"] == 10

  a, b = metrics.read_metrics(straight), metrics.read_metrics(resumed)
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
  for ra, rb in zip(a, b):  # Same batches => same losses, to float32 rounding.
    for key in ("loss", "val_loss", "aux_loss", "lr"):
      if key in ra:
        assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    np.testing.assert_allclose(rb["expert_load"], ra["expert_load"], atol=1e-6)
  _, pa = checkpoint.restore_params(straight)
  _, pb = checkpoint.restore_params(resumed)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), pa, pb)


def test_collapse_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
  c = small_config(steps=30, variant="dense")
  c.optim.update(dict(lr=1e6, grad_clip=0.0, warmup_steps=0, schedule="constant"))
  c.checkpoint.every = 1
  with pytest.raises(guard.TrainingCollapsed, match=r"step (\d+): (loss|gradient norm) is "
                                                    r"(nan|inf).*last good checkpoint is step"
                     ) as err:
    loop.train_and_evaluate(c, str(tmp_path))
  bad = int(str(err.value).split(":")[0].split()[1])
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  assert ckpt.latest_step() == bad - 1
  ckpt.close()
  _, params = checkpoint.restore_params(str(tmp_path))
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_weights_only(tmp_path):
  c = small_config(steps=3, variant="dense")
  loop.train_and_evaluate(c, str(tmp_path / "a"))
  _, trained = checkpoint.restore_params(str(tmp_path / "a"))
  c2 = small_config(steps=1, variant="dense")
  c2.checkpoint.init_from = str(tmp_path / "a")
  c2.optim.lr = 0.0  # An update of zero: the loss of step 1 is that of the loaded weights.
  loop.train_and_evaluate(c2, str(tmp_path / "b"))
  (rec,) = metrics.read_metrics(str(tmp_path / "b"))
  model_cfg = common.model_config(c2)
  data = dataset.build(c2.data, c2.train.seq_len, c2.train.batch_size, c2.train.seed)
  ref, _ = lm_loss(params_lib.model_from_params(model_cfg, trained),
                   jax.device_put(data.train.batch(0)))
  assert rec["loss"] == pytest.approx(float(ref), rel=1e-6)
  fresh_opt = checkpoint.Checkpointer(str(tmp_path / "b" / "checkpoints"))
  steps = step_lib.for_config(c2).steps
  st, _ = fresh_opt.restore(1, steps.abstract_state, steps.engine.fmt)
  fresh_opt.close()
  assert int(st.opt_state[1][0].count) == 1  # Adam restarted: one update, not four.
  c3 = small_config(steps=1, variant="dense")
  c3.model.d_ff = 64  # Smaller than the checkpoint's: no load-time conversion shrinks.
  c3.checkpoint.init_from = str(tmp_path / "a")
  with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.w_down' has shape \(128, 64\) but "
                                       r"the model expects \(64, 64\).*d_ff 128 -> 64 shrinks"):
    init_from.load(c3, common.model_config(c3), step_lib.for_config(c3).plan)


@pytest.mark.slow
def test_init_from_onto_a_parallel_layout(tmp_path):
  """A single-device run's weights start a pp x tp x dp run (read sharded onto its mesh):
  with lr 0 its first loss is the loss of those weights."""
  c = small_config(steps=2, variant="dense")
  loop.train_and_evaluate(c, str(tmp_path / "a"))
  _, trained = checkpoint.restore_params(str(tmp_path / "a"))
  c2 = small_config(steps=1, variant="dense")
  c2.checkpoint.init_from = str(tmp_path / "a")
  c2.optim.lr = 0.0
  c2.parallel.update(dict(pp=2, tp=2, dp=2, microbatches=2, fsdp=True))
  c2.model.n_layers = 2  # one layer per stage
  loop.train_and_evaluate(c2, str(tmp_path / "b"))
  (rec,) = metrics.read_metrics(str(tmp_path / "b"))
  data = dataset.build(c2.data, c2.train.seq_len, c2.train.batch_size, c2.train.seed)
  ref, _ = lm_loss(params_lib.model_from_params(common.model_config(c2), trained),
                   jax.device_put(data.train.batch(0)))
  assert rec["loss"] == pytest.approx(float(ref), rel=1e-5)


def test_eval_tasks_during_training_score_the_model_of_that_step(tmp_path):
  """eval.tasks: metrics of the benchmark task at every eval.every steps and the last, equal
  to evaluating the checkpoint of that step directly."""
  from esjax.data.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  from esjax.eval import harness, hook, loading, tasks  # pylint: disable=g-import-not-at-top
  mc_dir = os.path.join(os.path.dirname(__file__), "testdata", "eval", "tiny_mc")
  ppl_dir = tmp_path / "tiny_ppl"  # a continuous metric: bits per byte of a text
  ppl_dir.mkdir()
  (ppl_dir / "task.json").write_text('{"kind": "perplexity"}')
  (ppl_dir / "test.jsonl").write_text('{"text": "def add(a, b):\\n  return a + b\\n"}\n')
  task_dir = f"{mc_dir},{ppl_dir}"
  c = small_config(steps=3, variant="dense")
  c.eval.update(dict(tasks=task_dir, every=2, limit=3, batch_size=2))
  c.checkpoint.every = 0  # only the final checkpoint (step 3)
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="eval.tasks=.* needs a task evaluator"):
    loop.train_and_evaluate(c, workdir)
  loop.train_and_evaluate(c, workdir, hook.for_config(c.eval))
  records = {r["step"]: r for r in metrics.read_metrics(workdir)}
  assert [s for s, r in records.items() if "eval/tiny_mc/acc" in r] == [2, 3]
  model_cfg, params = checkpoint.restore_params(os.path.join(workdir, "checkpoints", "3"))
  want = harness.evaluate(loading.build_model(model_cfg, params), ByteTokenizer(),
                          tasks.load_tasks(task_dir), limit=3, batch_size=2)
  got = records[3]
  for metric in ("acc", "acc_norm", "n"):
    assert got[f"eval/tiny_mc/{metric}"] == want["results"]["tiny_mc"][metric], metric
  bpb = want["results"]["tiny_ppl"]["bits_per_byte"]
  assert got["eval/tiny_ppl/bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
  assert records[2]["eval/tiny_ppl/bits_per_byte"] != pytest.approx(bpb, rel=1e-6)


def test_tokens_per_s_leaves_evaluation_time_out(tmp_path, monkeypatch):
  """Evaluation steps report training throughput, and the evaluation's seconds as eval_s (a
  slow evaluation made its step's tokens_per_s several times too low). The loop's clock is
  replaced by one that ticks 1 s per reading, and each evaluation takes 1000 s of it."""
  now = [0.0]

  def tick():
    now[0] += 1.0
    return now[0]

  monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=tick))
  evaluate = loop._evaluate

  def slow_evaluate(*args):
    now[0] += 1000.0
    return evaluate(*args)

  monkeypatch.setattr(loop, "_evaluate", slow_evaluate)
  loop.train_and_evaluate(small_config(steps=4, eval_every=2), str(tmp_path))
  records = {r["step"]: r for r in metrics.read_metrics(str(tmp_path))}
  assert {s: r.get("eval_s") for s, r in records.items()} == {1: None, 2: 1001.0, 3: None,
                                                               4: 1001.0}
  for s in (2, 3, 4):  # 128 tokens a step in a few ticks, not over a 1000 s evaluation
    assert records[s]["tokens_per_s"] > 128 / 10, records[s]
