"""The asynchronous PS runtime on a local Ray instance (esjax/distributed/runtime.py)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray

from esjax.distributed import runtime
from esjax.distributed.worker import init_params

# Ray starts its processes with fork + exec, which is safe in a process running JAX.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork.. was called:RuntimeWarning")

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "dgs", "tiny_lm.py")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
  runtime.init_ray(num_cpus=2)
  yield
  ray.shutdown()


def _config(mode, **overrides):
  spec = importlib.util.spec_from_file_location("tiny_lm", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"{mode},test=1")
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config


def _initial_loss(training):
  return training.eval_loss(init_params(training.model_cfg, training.config.train.seed))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_dgs_trains_and_reports_the_configured_compression(tmp_path):
  config = _config("dgs", **{"dgs.ratio": 0.01, "dgs.down_ratio": 0.02,
                             "dgs.ratio_follows_lr": False})  # a fixed density to check
  training = runtime.AsyncTraining(config, str(tmp_path))
  initial = _initial_loss(training)
  summary = training.run()
  assert summary["finished_workers"] == [0, 1] and not summary["dead_workers"]
  assert summary["updates"] == 2 * config.train.steps_per_worker
  assert summary["val_loss"] < initial - 1.0, (initial, summary["val_loss"])
  # Exactly the per-tensor k's both ways (no resync in this short run), i.e. close to the ratios.
  assert summary["up_density"] == pytest.approx(runtime.expected_density(config), rel=1e-9)
  assert summary["up_density"] == pytest.approx(0.01, rel=0.1)
  assert summary["down_density"] == pytest.approx(0.02, rel=0.1)
  records = _records(str(tmp_path))
  pushes = [r for r in records if "worker" in r and "loss" in r]
  assert len(pushes) == summary["updates"]
  assert all(r["staleness"] >= 0 for r in pushes) and max(r["staleness"] for r in pushes) >= 1
  assert any("val_loss" in r for r in records)
  assert pushes[-1]["bytes_up_total"] == summary["bytes_up"]


@pytest.mark.slow
def test_killed_worker_does_not_stop_the_others_or_lose_the_model(tmp_path):
  config = _config("oneway", **{"train.num_workers": 3, "train.steps_per_worker": 40})
  training = runtime.AsyncTraining(config, str(tmp_path))
  training.start()
  deadline = time.time() + 120
  while training.updates_by_worker.get(0, 0) < 3:  # worker 0 is training
    assert time.time() < deadline, "worker 0 made no progress"
    training.poll(timeout=0.2)
  ray.kill(training.workers[0])
  while not training.done:
    training.poll(timeout=0.5)
  params, snap = training.server_params()
  summary = training.finish()
  assert summary["dead_workers"] == [0] and summary["finished_workers"] == [1, 2]
  pushes = [r for r in _records(str(tmp_path)) if "loss" in r and "worker" in r]
  by_worker = {k: sum(r["worker"] == k for r in pushes) for k in range(3)}
  assert by_worker == training.updates_by_worker
  assert by_worker[1] == by_worker[2] == 40 and 3 <= by_worker[0] < 40
  # The server kept every update, including those of the dead worker, and still trains.
  assert snap["version"] == summary["updates"] == sum(by_worker.values())
  assert np.isfinite(summary["val_loss"]) and summary["val_loss"] < _initial_loss(training) - 1.0
  assert training.eval_loss(params) == pytest.approx(summary["val_loss"], rel=1e-6)
  # The final server model is checkpointed; a restart resumes from it with nothing to do.
  again = runtime.AsyncTraining(config, str(tmp_path))
  restored, version = again._initial_params()
  assert version == summary["version"]
  assert again.eval_loss(restored) == pytest.approx(summary["val_loss"], rel=1e-6)


def test_dead_server_stops_the_run_in_one_line_and_the_rerun_resumes(tmp_path):
  config = _config("oneway", **{"train.num_workers": 2, "train.steps_per_worker": 400,
                                "train.eval_every": 4})
  training = runtime.AsyncTraining(config, str(tmp_path))
  training.start()
  deadline = time.time() + 120
  while training.saved is None:  # a checkpoint of the server model exists
    assert time.time() < deadline, "no evaluation/checkpoint came"
    training.poll(timeout=0.2)
  training.ckpt.wait_until_finished()
  saved = training.saved
  ray.kill(training.server)
  with pytest.raises(runtime.ServerDied) as e:
    while not training.done:
      training.poll(timeout=0.2)
  message = str(e.value)
  assert message.startswith("the parameter server died (") and "\n" not in message
  assert f"resume from its checkpoint at version {saved}" in message
  assert training.done  # the workers were stopped
  for actor in training.workers.values():
    with pytest.raises(ray.exceptions.RayActorError):
      ray.get(actor.run.remote(1), timeout=60)
  again = runtime.AsyncTraining(config, str(tmp_path))
  assert again._initial_params()[1] >= saved  # pylint: disable=protected-access


def _descends_from(pid: int, ancestor: int) -> bool:
  while pid > 1:
    if pid == ancestor:
      return True
    with open(f"/proc/{pid}/stat") as f:
      pid = int(f.read().rsplit(")", 1)[1].split()[1])
  return False


@pytest.mark.slow
def test_the_command_line_says_a_dead_server_in_one_line(tmp_path):
  """`python -m esjax.distributed.main` with its server killed (kill -9): stderr is the error
  line alone (a 14-line traceback came before it, and Ray's start-up lines; issue 30 item 7);
  stdout has Ray's own one-line notice of the dead process."""
  workdir = tmp_path / "run"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      [sys.executable, "-m", "esjax.distributed.main", f"--config={CONFIG}:dgs,test=1",
       "--config.train.steps_per_worker=100000", "--config.train.eval_every=10",
       f"--workdir={workdir}"], cwd=root, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 180
    server = None
    while server is None:
      assert time.time() < deadline and proc.poll() is None, "no server with a checkpoint"
      time.sleep(1)
      ckpts = workdir / "checkpoints"
      if not (ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts))):
        continue
      found = subprocess.run(["pgrep", "-f", "ray::ParameterServer"], capture_output=True,
                             text=True).stdout.split()
      server = next((int(p) for p in found if _descends_from(int(p), proc.pid)), None)
    os.kill(server, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  lines = [l for l in err.splitlines() if l.strip()]
  assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
  assert lines[0].startswith("esjax.distributed: error: the parameter server died ("), lines
