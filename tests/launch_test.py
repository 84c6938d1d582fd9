"""launch/: the GPU XLA flags parse, KEY=VALUE overrides, and multi-process runs for real.

Two CPU processes with 4 devices each, joined by `jax.distributed` over loopback, are one
8-device job; their losses must equal one process with 8 devices. The SLURM scripts run the
same way with `srun` and `scontrol` replaced by stand-ins on PATH.
"""

import functools
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# A folded layout whose EP all-to-all and DP all-reduce cross the two processes.
OVERRIDES = ["parallel.dp=4", "parallel.tp=2", "parallel.ep=8", "parallel.etp=1",
             f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
             "train.seq_len=32", "train.batch_size=8", "data.max_bytes=200000",
             f"checkpoint.every={STEPS}"]
CONFIG = "esjax/configs/tiny.py"


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("ESJAX_", "SLURM_"))}
  env.update({"JAX_PLATFORMS": "cpu", "ESJAX_PYTHON": sys.executable, "XLA_FLAGS": "", **extra})
  return env


def _free_port() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return str(s.getsockname()[1])


def _losses(workdir) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory) -> list[float]:
  workdir = str(tmp_path_factory.mktemp("single"))
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-m", "esjax.main", f"--config={CONFIG}",
                         f"--workdir={workdir}", *[f"--config.{o}" for o in OVERRIDES]],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _losses(workdir)


def _check_same_losses(workdir, want):
  got = _losses(workdir)
  assert len(got) == STEPS == len(want)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _gpu_flags() -> str:
  out = subprocess.run(["bash", "-c", "source launch/slurm/xla_gpu_flags.sh && "
                        "echo \"$XLA_FLAGS\""], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, check=True)
  return out.stdout.strip()


def _start_jax(xla_flags: str) -> subprocess.CompletedProcess:
  code = ("import jax, jax.numpy as jnp; "
          "print(float(jax.jit(lambda x: x @ x)(jnp.ones((4, 4)))[0, 0]))")
  return subprocess.run([sys.executable, "-c", code], env=_env(XLA_FLAGS=xla_flags),
                        capture_output=True, text=True, timeout=120)


def test_gpu_xla_flags_are_accepted_by_the_pinned_jaxlib():
  flags = _gpu_flags()
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  ok = _start_jax(flags)
  assert ok.returncode == 0 and ok.stdout.strip() == "4.0", ok.stderr[-2000:]
  typo = _start_jax(flags.replace("latency_hiding", "latency_hidding"))  # the check can fail
  assert typo.returncode != 0 and "latency_hidding" in typo.stderr


def test_key_value_overrides_become_config_flags():
  run = functools.partial(subprocess.run, cwd=ROOT, capture_output=True, text=True)
  out = run(["bash", "-c", "source launch/lib.sh && config_flags train.steps=5 "
             "model.dtype=bfloat16 --verbosity=1"])
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["--config.train.steps=5", "--config.model.dtype=bfloat16",
                                "--verbosity=1"]
  bad = run(["bash", "-c", "source launch/lib.sh && config_flags train.steps"])
  assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr


@pytest.mark.slow
def test_local_two_processes_equal_one_process(tmp_path, single_process_losses):
  workdir = tmp_path / "two"
  proc = subprocess.run(["launch/local.sh", "2", CONFIG, str(workdir), *OVERRIDES], cwd=ROOT,
                        env=_env(ESJAX_CPU_DEVICES="4", ESJAX_PORT=_free_port()),
                        capture_output=True, text=True, timeout=600)
  logs = sorted(os.listdir(workdir / "logs")) if (workdir / "logs").exists() else []
  assert proc.returncode == 0, (proc.stderr[-2000:], [
      open(workdir / "logs" / name).read()[-2000:] for name in logs])
  assert [n.split("-rank")[1] for n in logs] == ["0.log", "1.log"]
  assert os.listdir(workdir / "checkpoints") == [str(STEPS)]
  _check_same_losses(workdir, single_process_losses)
  # Each process wrote the manifest of its own files; a flipped byte in a file of process 1
  # is found at resume (by the process it falls to) and refused on both.
  step = workdir / "checkpoints" / str(STEPS)
  names = sorted(n for n in os.listdir(step) if n.startswith("esjax_manifest"))
  assert names == ["esjax_manifest.1.json", "esjax_manifest.json"]
  listed = [json.load(open(step / n))["files"] for n in names]
  assert not set(listed[0]) & set(listed[1]) and all(listed)
  victim = max(listed[0], key=lambda rel: listed[0][rel][0])
  assert "process_1" in victim
  with open(step / victim, "r+b") as f:
    f.seek(os.path.getsize(step / victim) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  again = subprocess.run(["launch/local.sh", "2", CONFIG, str(workdir), *OVERRIDES,
                          f"train.steps={STEPS + 1}"], cwd=ROOT,
                         env=_env(ESJAX_CPU_DEVICES="4", ESJAX_PORT=_free_port()),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode != 0
  for name in sorted(os.listdir(workdir / "logs")):
    log = open(workdir / "logs" / name).read()
    assert f"{victim} differs from what was saved" in log, log[-2000:]
    assert "every checkpoint in" in log and "failed verification" in log, log[-2000:]


@pytest.mark.slow
def test_a_two_process_pipeline_checkpoint_resumes_on_one_process_with_another_layout(
    tmp_path):
  """3 steps of pp2 x dp2 x tp2 (ep4) on 2 processes x 4 devices, each stage on its own
  process, then 2 more on 1 process x 8 devices as dp8 x ep8: the 5 losses are those of an
  uninterrupted dp8 run (a constant learning rate, so the shorter first run has the same
  schedule)."""
  base = ["train.log_every=1", "train.eval_every=0", "train.seq_len=32",
          "train.batch_size=16", "data.max_bytes=200000", "checkpoint.every=1",
          "optim.schedule=constant", "optim.warmup_steps=0", "parallel.microbatches=2",
          "parallel.etp=1"]
  dp8 = base + ["parallel.dp=8", "parallel.ep=8", "train.steps=5"]
  env8 = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")

  def one_process(workdir):
    proc = subprocess.run([sys.executable, "-m", "esjax.main", f"--config={CONFIG}",
                           f"--workdir={workdir}", *[f"--config.{o}" for o in dp8]],
                          cwd=ROOT, env=env8, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

  one_process(tmp_path / "straight")
  work = tmp_path / "moved"
  two = subprocess.run(["launch/local.sh", "2", CONFIG, str(work), *base, "parallel.pp=2",
                        "parallel.dp=2", "parallel.tp=2", "parallel.ep=4", "train.steps=3"],
                       cwd=ROOT, env=_env(ESJAX_CPU_DEVICES="4", ESJAX_PORT=_free_port()),
                       capture_output=True, text=True, timeout=600)
  assert two.returncode == 0, two.stderr[-3000:]
  one_process(work)
  got, want = _losses(work), _losses(tmp_path / "straight")
  assert len(got) == len(want) == 5
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _stand_in(directory, name, body):
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
def test_slurm_sbatch_runs_one_process_per_gpu(tmp_path, single_process_losses):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # srun: one node; drops its options and runs the node script as that node.
  _stand_in(bin_dir, "srun", 'while [[ "$1" == -* ]]; do shift; done\n'
            'SLURM_NODEID=0 exec "$@"\n')
  _stand_in(bin_dir, "scontrol", 'echo 127.0.0.1\n')
  workdir = tmp_path / "slurm"
  env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
             SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node001", SLURM_SUBMIT_DIR=ROOT,
             GPUS_PER_NODE="2", ESJAX_CPU_DEVICES="4", ESJAX_PORT=_free_port())
  # sbatch runs a copy of the script elsewhere: it must find the repository by itself.
  sbatch = os.path.join(ROOT, "launch/slurm/train.sbatch")
  proc = subprocess.run(["bash", sbatch, CONFIG, str(workdir), *OVERRIDES], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logs = sorted(os.listdir(workdir / "logs" / "4242"))
  assert [n.split("-rank")[1] for n in logs] == ["0.log", "1.log"]
  # Both processes ran to the end with the GPU flags in XLA_FLAGS (an unknown one aborts).
  rank1 = open(workdir / "logs" / "4242" / logs[1]).read()
  assert "done:" in rank1, rank1[-2000:]
  _check_same_losses(workdir, single_process_losses)


@pytest.mark.parametrize("env,message", [
    (dict(ESJAX_NUM_PROCESSES="2", ESJAX_PROCESS_ID="0"), "expected host:port"),
    (dict(ESJAX_COORDINATOR="h:1", ESJAX_NUM_PROCESSES="two", ESJAX_PROCESS_ID="0"),
     "ESJAX_NUM_PROCESSES='two'"),
    (dict(ESJAX_COORDINATOR="h:1", ESJAX_NUM_PROCESSES="2", ESJAX_PROCESS_ID="2"),
     "ESJAX_PROCESS_ID=2 must be in [0, ESJAX_NUM_PROCESSES=2)"),
])
def test_bad_multihost_environment_is_named(env, message):
  from esjax.parallel import multihost  # pylint: disable=g-import-not-at-top
  env = dict(env)
  env.setdefault("ESJAX_COORDINATOR", "nohost")
  with pytest.raises(ValueError, match=re.escape(message)):
    multihost.initialize_from_env(env)


def test_no_coordinator_means_one_process():
  from esjax.parallel import multihost  # pylint: disable=g-import-not-at-top
  assert multihost.initialize_from_env({}) is False


def test_sigterm_reaches_every_process_once_and_the_launcher_returns_their_status(tmp_path):
  """Preemption: the launcher forwards one SIGTERM to each process (a second one would stop
  esjax.main before its checkpoint) and waits for them; here each stand-in records the
  signals it got and exits 75 as esjax.main does after saving."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  python = tmp_path / "python"
  _stand_in(tmp_path, "python", f"""
trap 'echo TERM >> {tmp_path}/got.$ESJAX_PROCESS_ID; sleep 0.5; exit 75' TERM
touch {tmp_path}/up.$ESJAX_PROCESS_ID
while true; do sleep 0.05; done
""")
  env = {**os.environ, "ESJAX_PYTHON": str(python), "ESJAX_CPU_DEVICES": "1",
         "ESJAX_PORT": _free_port()}
  proc = subprocess.Popen(["launch/local.sh", "2", CONFIG, str(tmp_path / "run")], cwd=ROOT,
                          env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not all((tmp_path / f"up.{i}").exists() for i in (0, 1)) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 75, err
  assert [(tmp_path / f"got.{i}").read_text() for i in (0, 1)] == ["TERM\n", "TERM\n"]
  assert "failed" not in err


def test_a_failed_process_stops_the_others_at_once(tmp_path):
  """Rank 1 fails; rank 0 ignores SIGTERM and sleeps, as a process blocked in a collective
  with the dead peer does: the launcher still returns rank 1's status within seconds."""
  fake = tmp_path / "python"
  fake.write_text("#!/usr/bin/env bash\n"
                  "if [[ ${ESJAX_PROCESS_ID} == 1 ]]; then sleep 1; exit 3; fi\n"
                  "trap '' TERM; sleep 120\n")
  fake.chmod(0o755)
  start = time.time()
  proc = subprocess.run(["launch/local.sh", "2", CONFIG, str(tmp_path / "run")], cwd=ROOT,
                        env=_env(ESJAX_PYTHON=str(fake), ESJAX_CPU_DEVICES="1"),
                        capture_output=True, text=True, timeout=100)
  assert proc.returncode == 3, proc.stderr
  assert "failed (exit 3); stopping the others" in proc.stderr
  assert time.time() - start < 30


def test_sigterm_stops_a_two_process_run_at_one_step_with_its_checkpoint(tmp_path):
  """The real esjax.main on 2 x 4 CPU devices through launch/local.sh: a SIGTERM to the
  launcher (one to each process) makes both stop at the same step, save it, and exit 75.
  jax.distributed installs its own SIGTERM handler (the preemption notice), which used to
  replace esjax's: the run trained on to its end and saved nothing at the signal."""
  import signal  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  steps = 400
  overrides = [o for o in OVERRIDES if not o.startswith(("train.steps", "checkpoint.every"))]
  proc = subprocess.Popen(["launch/local.sh", "2", CONFIG, str(workdir), *overrides,
                           f"train.steps={steps}", f"checkpoint.every={steps}"], cwd=ROOT,
                          env=_env(ESJAX_CPU_DEVICES="4", ESJAX_PORT=_free_port()),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and (
      time.time() < deadline and proc.poll() is None):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  logs = [open(workdir / "logs" / n).read() for n in sorted(os.listdir(workdir / "logs"))]
  assert proc.returncode == 75, (err[-2000:], [log[-2000:] for log in logs])
  saved = [int(s) for s in os.listdir(workdir / "checkpoints")]
  assert len(saved) == 1 and 3 <= saved[0] < steps, saved
  for log in logs:
    assert f"stopped by SIGTERM after step {saved[0]}" in log, log[-2000:]
  # The console shows rank 0's step lines and every rank's exit status (issue 28 item 9).
  assert re.search(r"^step +1 \| loss", err, re.M), err[-2000:]
  assert f"esjax: stopped by SIGTERM after step {saved[0]}" in err
  for rank in (0, 1):
    assert f"launch: rank {rank} exited with status 75" in err, err[-2000:]
