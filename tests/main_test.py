"""`python -m esjax.main` end to end (train, metrics, resume) and its one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from esjax.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.max_bytes=150000", "--config.train.seq_len=32",
         "--config.train.batch_size=4", "--config.train.log_every=1",
         "--config.train.eval_every=2", "--config.train.eval_batches=1",
         "--config.checkpoint.every=2", "--config.optim.warmup_steps=1"]


def main_env(cache=""):
  """One CPU device (not conftest's 8 fake ones: the run is the README's single-device one)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  if cache:  # The resumed run reuses the first run's compiled steps.
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  return env


def run_main(*args, config="esjax/configs/tiny.py:steps=3", workdir="/nonexistent", cache=""):
  env = main_env(cache)
  return subprocess.run([sys.executable, "-m", "esjax.main", f"--config={config}",
                         f"--workdir={workdir}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_train_writes_metrics_then_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  cache = str(tmp_path / "jax_cache")
  first = run_main(*SMALL, workdir=workdir, cache=cache)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:  # The default experiment is an MoE: router figures in every record.
    for key in ("loss", "lr", "aux_loss", "z_loss", "drop_fraction", "expert_load"):
      assert key in r, key
    loads = r["expert_load"]
    assert len(loads) == 2 and all(len(l) == 8 and abs(sum(l) - 1) < 1e-5 for l in loads)
  assert all("tokens_per_s" in r for r in records[1:])
  assert "val_loss" in records[1] and "val_loss" in records[2] and "val_loss" not in records[0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert json.load(open(os.path.join(workdir, "model_config.json")))["n_experts"] == 8

  assert "step      3 | loss" in first.stdout  # The log line of each logged step.
  # Each checkpoint records its step's loss and gradient norm (as logged) and largest
  # |parameter| (as restored).
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  healths = {s: ckpt.health(s) for s in (2, 3)}
  ckpt.close()
  for s, h in healths.items():
    assert h["loss"] == pytest.approx(records[s - 1]["loss"], rel=1e-6)
    assert h["grad_norm"] == pytest.approx(records[s - 1]["grad_norm"], rel=1e-6)
  _, params = checkpoint.restore_params(workdir)
  biggest = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(params))
  assert healths[3]["max_abs_param"] == pytest.approx(biggest, rel=1e-6)
  second = run_main(*SMALL, "--config.train.steps=5", workdir=workdir, cache=cache)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from" in second.stdout and "/checkpoints/3" in second.stdout
  assert f"/checkpoints/3 (loss {healths[3]['loss']:.4g}, gradient norm" in second.stdout
  assert "close to a collapse" not in second.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("args, message", [
    (["--config.optim.lrr=0.1"],
     "--config.optim.lrr: unknown config field 'lrr'; did you mean 'lr'?"),
    (["--config.train.steps=many"], "--config.train.steps=many"),
    (["--config.data.source=/no/such/corpus"], "'/no/such/corpus' is not a file"),
], ids=["unknown_key", "wrong_type", "missing_dataset"])
def test_bad_input_is_one_line_error(args, message, tmp_path):
  out = run_main(*args, workdir=str(tmp_path))
  assert out.returncode != 0
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("esjax: error:"), out.stderr[-2000:]
  assert message in lines[0]


def test_empty_dataset_and_bad_config_arg(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  out = run_main(f"--config.data.source={tmp_path}/empty.txt", workdir=str(tmp_path / "w"))
  assert out.returncode != 0 and "esjax: error:" in out.stderr
  assert "empty.txt" in out.stderr and "too small" in out.stderr
  assert "Traceback" not in out.stderr
  out = run_main(config="esjax/configs/tiny.py:huge", workdir=str(tmp_path / "w"))
  assert out.returncode != 0 and "variant 'huge'" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


# A save that fails the way orbax's can: each array's writer opens its file, then gathers its
# writes, in a loop run to the first error and closed. The writer that opens in the step the
# loop stops in schedules writes that never start (here the one with 3 opens' delay).
_FAILED_SAVE = """
import asyncio, sys
from absl import app
from esjax import main
async def write():
  await asyncio.sleep(1)
async def serialize(delay):
  for _ in range(delay):  # opening the array's file
    await asyncio.sleep(0)
  if delay == 0:
    raise OSError("No space left on device")
  await asyncio.gather(*[write() for _ in range(4)])
async def save():
  await asyncio.gather(*[serialize(delay) for delay in range(8)])
def train_and_evaluate(*args, **kwargs):
  loop = asyncio.new_event_loop()
  try:
    loop.run_until_complete(save())
  except OSError as e:
    raise ValueError("no space left on device while saving checkpoint step 4") from e
  finally:
    loop.close()
main.loop.train_and_evaluate = train_and_evaluate
sys.argv = [sys.argv[0], "--config=esjax/configs/tiny.py", "--workdir=/nonexistent"]
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_a_failed_save_with_writes_left_unstarted_is_still_one_line():
  """The writes an abandoned save never started are collected without a warning each."""
  out = subprocess.run([sys.executable, "-c", _FAILED_SAVE], cwd=ROOT, env=main_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr == ("esjax: error: no space left on device while saving checkpoint "
                        "step 4\n"), out.stderr[-2000:]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_equals_uninterrupted(tmp_path):
  """A run SIGKILLed mid-training (checkpointing every step, asynchronously, so the kill
  often lands in a save) and restarted gives the same losses as a run never interrupted."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  args = [*SMALL, "--config.checkpoint.every=1", "--config.checkpoint.async_save=True",
          "--config.checkpoint.keep=2"]
  cache = str(tmp_path / "jax_cache")
  straight = str(tmp_path / "straight")
  assert run_main(*args, config="esjax/configs/tiny.py:steps=12", workdir=straight,
                  cache=cache).returncode == 0
  killed = str(tmp_path / "killed")
  for kill_after in (3, 7):  # Killed twice, at different points.
    env = main_env(cache)
    proc = subprocess.Popen(
        [sys.executable, "-m", "esjax.main", "--config=esjax/configs/tiny.py:steps=12",
         f"--workdir={killed}", *args], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
      if os.path.exists(path) and len(open(path).readlines()) >= kill_after:
        break
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # Killed, not finished.
  final = run_main(*args, config="esjax/configs/tiny.py:steps=12", workdir=killed,
                   cache=cache)
  assert final.returncode == 0, final.stderr[-3000:]
  a = [json.loads(l) for l in open(os.path.join(straight, "metrics.jsonl"))]
  b = [json.loads(l) for l in open(os.path.join(killed, "metrics.jsonl"))]
  assert [r["step"] for r in b] == list(range(1, 13))
  for ra, rb in zip(a, b):
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), ra["step"]
