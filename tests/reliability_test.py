"""What a clumsy or hostile user does to a run: corrupt checkpoints, a second run on a live
workdir, a changed model on resume, values out of range, SIGTERM. Each case provokes the
failure and checks the one-line message and that nothing was lost."""

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoint_test import CFG, engine_for, make_state
from esjax.configs import common
from esjax.train import checkpoint, integrity, state as state_lib, workdir
from main_test import ROOT, SMALL, main_env, run_main


def _saved(tmp_path, steps=(1, 2)):
  state, tx = make_state()
  engine = engine_for(CFG)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=0, async_save=True)
  states = {}
  for step in steps:
    state = state.replace(step=jnp.asarray(step, jnp.int32),
                          params=jax.tree.map(lambda p: p + 1.0, state.params))
    ckpt.save(state, {"position": step}, CFG, engine.fmt)
    states[step] = state
  ckpt.close()
  return states, engine, tx


def _biggest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "params", "**"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip(path, n=55):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(n):
      data[(len(data) // 2 + 7 * i) % len(data)] ^= 0xFF
    f.seek(0)
    f.write(data)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "empty_step",
                                    "empty_step_and_manifest"])
def test_corrupt_latest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    tmp_path, damage, capfd):
  states, engine, tx = _saved(tmp_path)
  step_dir = os.path.join(str(tmp_path), "2")
  assert integrity.problem(step_dir) is None  # the manifest matches what was saved
  victim = _biggest_file(step_dir)
  if damage == "flip":
    _flip(victim)
  elif damage == "truncate":
    os.truncate(victim, os.path.getsize(victim) // 2)
  elif damage == "delete":
    os.remove(victim)
  else:
    for f in os.listdir(step_dir):
      if f != integrity.MANIFEST or damage == "empty_step_and_manifest":
        os.system(f"rm -r '{os.path.join(step_dir, f)}'")
  assert integrity.problem(step_dir) is not None

  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=0)
  assert ckpt.latest_good_step() == 1
  err = [l for l in capfd.readouterr().err.splitlines() if l.startswith("esjax")]
  assert len(err) == 1 and "checkpoint" in err[0] and "is corrupt" in err[0], err
  assert "resuming from step 1" in err[0]
  assert ckpt.all_steps() == [1]
  assert os.path.isdir(os.path.join(str(tmp_path) + ".corrupt", "2"))  # kept, not deleted
  restored, data = ckpt.restore(1, state_lib.abstract_train_state(engine, tx), engine.fmt)
  ckpt.close()
  assert data == {"position": 1}
  jax.tree.map(np.testing.assert_array_equal, restored.params, states[1].params)


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
  _saved(tmp_path, steps=(1,))
  _flip(_biggest_file(os.path.join(str(tmp_path), "1")))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=0)
  with pytest.raises(ValueError, match="every checkpoint in .* failed verification"):
    ckpt.latest_good_step()
  ckpt.close()


def test_restore_params_refuses_a_corrupt_checkpoint(tmp_path):
  _saved(tmp_path, steps=(1,))
  _flip(_biggest_file(os.path.join(str(tmp_path), "1")))
  with pytest.raises(ValueError, match=r"checkpoint .*/1 is corrupt \(params/.* differs"):
    checkpoint.restore_params(str(tmp_path))


def test_an_unsealed_step_is_set_aside_like_a_corrupt_one(tmp_path, capfd):
  """A run killed between a save and its seal leaves a step without manifests (issue 30,
  item 1: 64 flipped bytes in it were restored unverified). Resume sets it aside and falls
  back; init_from / eval / generate refuse it."""
  states, engine, tx = _saved(tmp_path, steps=(1, 2))
  os.remove(os.path.join(str(tmp_path), "2", integrity.MANIFEST))
  _flip(_biggest_file(os.path.join(str(tmp_path), "2")))
  with pytest.raises(ValueError, match=r"checkpoint .*/2 is corrupt \(it was never sealed"):
    checkpoint.restore_params(os.path.join(str(tmp_path), "2"))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=0)
  assert ckpt.latest_good_step() == 1
  err = [l for l in capfd.readouterr().err.splitlines() if l.startswith("esjax")]
  assert len(err) == 1 and "never sealed" in err[0] and "resuming from step 1" in err[0], err
  restored, _ = ckpt.restore(1, state_lib.abstract_train_state(engine, tx), engine.fmt)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored.params, states[1].params)


def test_a_finished_save_is_sealed_before_the_next_one(tmp_path):
  """The loop calls seal_finished after every step: an async save is sealed once it has
  finished, with no later save or close."""
  state, _ = make_state()
  engine = engine_for(CFG)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=0, async_save=True)
  ckpt.save(state.replace(step=jnp.asarray(5, jnp.int32)), {"position": 5}, CFG, engine.fmt)
  step_dir = os.path.join(str(tmp_path), "5")
  deadline = time.time() + 60
  while not (os.path.isdir(step_dir) and integrity.manifests(step_dir)):
    assert time.time() < deadline, "the finished save was never sealed"
    ckpt.seal_finished()
    time.sleep(0.01)
  assert integrity.problem(step_dir) is None
  ckpt._mngr.close()  # pylint: disable=protected-access  (no close(): nothing else seals)


def test_a_step_missing_one_processes_manifest_was_never_sealed(tmp_path):
  step = tmp_path / "4"
  (step / "params/ocdbt.process_1/d").mkdir(parents=True)
  (step / "params/ocdbt.process_1/d/b").write_bytes(b"b" * 10)
  integrity.write(str(step), 0, processes=2)  # process 1 was killed before its manifest
  assert integrity.problem(str(step)) == "it was never sealed (esjax_manifest.1.json is missing)"
  integrity.write(str(step), 1, processes=2)
  assert integrity.problem(str(step)) is None


def test_each_process_checksums_the_files_it_wrote_and_checks_its_share(tmp_path):
  """A two-process step as orbax lays it out: each process's manifest lists its own files,
  together every file; a verifying process reads only its share of the manifests."""
  files = {"_CHECKPOINT_METADATA": 0, "params/_METADATA": 0, "params/d/root": 0,
           "params/ocdbt.process_0/d/a": 0, "params/array_metadatas/process_0": 0,
           "params/ocdbt.process_1/d/b": 1, "params/ocdbt.process_1/manifest.ocdbt": 1,
           "params/array_metadatas/process_1": 1, "opt_state/ocdbt.process_12/d/c": 12}
  step = tmp_path / "7"
  for rel in files:
    (step / rel).parent.mkdir(parents=True, exist_ok=True)
    (step / rel).write_bytes(rel.encode() * 100)
  assert {rel: integrity.owner(rel) for rel in files} == files
  for process in (0, 1, 12):
    integrity.write(str(step), process)
  assert integrity.manifests(str(step)) == [
      "esjax_manifest.json", "esjax_manifest.1.json", "esjax_manifest.12.json"]
  listed = [set(json.load(open(step / n))["files"]) for n in integrity.manifests(str(step))]
  assert listed == [{r for r, p in files.items() if p == q} for q in (0, 1, 12)]
  _flip(str(step / "params/ocdbt.process_1/d/b"))
  # Two verifying processes: manifests 0 and 12 go to the first, 1 to the second.
  assert integrity.problem(str(step), 0, 2) is None
  assert integrity.problem(str(step), 1, 2) == ("params/ocdbt.process_1/d/b differs from "
                                                "what was saved (CRC-32 mismatch)")
  assert "process_1/d/b differs" in integrity.problem(str(step))  # one process checks all


def test_workdir_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path, capfd):
  lock = workdir.Lock(str(tmp_path))
  holder = subprocess.run(  # another process (flock is per open file, not per thread)
      [sys.executable, "-c", "import sys; from esjax.train import workdir; "
       "workdir.Lock(sys.argv[1])", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
  assert holder.returncode != 0
  assert f"is in use by pid {os.getpid()} on" in holder.stderr.strip().splitlines()[-1]
  lock.release()
  # A holder killed without releasing leaves its name in the file, but not the lock.
  dead = subprocess.run(
      [sys.executable, "-c", "import os, sys; from esjax.train import workdir; "
       "workdir.Lock(sys.argv[1]); os._exit(0)", str(tmp_path)], cwd=ROOT)
  assert dead.returncode == 0
  capfd.readouterr()
  taken = workdir.Lock(str(tmp_path))
  assert "taking over the lock of pid" in capfd.readouterr().err
  taken.release()


def test_resume_with_another_model_names_every_differing_field():
  saved = CFG.to_dict()
  with pytest.raises(ValueError, match=r"cannot resume .* \(d_ff 64 -> 96; n_layers 1 -> 2\)"):
    workdir.check_resume(saved, CFG.replace(n_layers=2, d_ff=96).to_dict(), "ckpt/3")
  workdir.check_resume(saved, CFG.replace(remat="full").to_dict(), "ckpt/3")  # same model


@pytest.mark.parametrize("field, value, message", [
    ("optim.lr", -1.0, "optim.lr=-1.0, expected a finite number >= 0"),
    ("optim.lr", float("nan"), "optim.lr=nan"),
    ("optim.b1", 2.0, "optim.b1=2.0, expected in [0, 1)"),
    ("optim.warmup_steps", -5, "optim.warmup_steps=-5"),
    ("optim.grad_clip", float("nan"), "optim.grad_clip=nan"),
    ("checkpoint.every", -1, "checkpoint.every=-1"),
    ("checkpoint.keep", -1, "checkpoint.keep=-1"),
    ("checkpoint.upcycle_drop", 1.5, "checkpoint.upcycle_drop=1.5, expected in [0, 1]"),
    ("data.max_bytes", -5, "data.max_bytes=-5"),
    ("train.eval_every", -3, "train.eval_every=-3"),
    ("train.seed", 2**64, "train.seed=18446744073709551616, expected a 64-bit signed integer"),
])
def test_out_of_range_values_are_refused_naming_the_field(field, value, message):
  config = common.base_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError) as e:
    common.check_ranges(config)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)
  common.check_ranges(common.base_config())  # the defaults pass


@pytest.mark.parametrize("field, value, message", [
    ("init_std", -1.0, "init_std=-1.0 must be a finite number > 0"),
    ("init_std", float("nan"), "init_std=nan must be a finite number > 0"),
    ("router_init_std", -0.1, "router_init_std=-0.1 must be a finite number >= 0"),
    ("norm_eps", 0.0, "norm_eps=0.0 must be a finite number > 0"),
    ("aux_loss_coef", float("inf"), "aux_loss_coef=inf must be a finite number >= 0"),
    ("z_loss_coef", -1e-3, "z_loss_coef=-0.001 must be a finite number >= 0"),
    ("rope_theta", 0.0, "rope_theta=0.0 must be a finite number > 0"),
])
def test_out_of_range_model_values_are_refused_naming_the_field(field, value, message):
  from esjax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  base = common.model_config(common.base_config()).to_dict()
  with pytest.raises(ValueError, match=re.escape(f"ModelConfig: {message}")):
    ModelConfig.from_dict({**base, field: value})
  assert ModelConfig.from_dict({**base, field: 0.5}) is not None  # a plain value passes


@pytest.mark.parametrize("value", [float("inf"), 1e30, 9.0])
def test_capacity_factor_beyond_the_experts_is_refused(value):
  """An infinite or huge capacity factor overflowed deep in the step (80 lines)."""
  from esjax.train import loop  # pylint: disable=g-import-not-at-top
  from esjax.configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config("moe")  # tiny-mixtral: 8 experts, top-2
  config.model.capacity_factor = value
  model_cfg = common.model_config(config)
  assert (model_cfg.n_experts, model_cfg.top_k) == (8, 2)
  with pytest.raises(ValueError, match=re.escape(
      f"model.capacity_factor={value}, expected a number in [0, n_experts=8] (0: dropless; "
      "from n_experts / top_k = 4 on, no token is dropped)")):
    loop.check_config(config, model_cfg)
  config.model.capacity_factor = 8.0
  loop.check_config(config, common.model_config(config))


def test_refused_resume_leaves_the_run_record_alone(tmp_path):
  from esjax.configs import tiny  # pylint: disable=g-import-not-at-top
  from esjax.train import loop  # pylint: disable=g-import-not-at-top
  config = tiny.get_config("steps=3")
  config.data.max_bytes = 150_000
  config.parallel.dp = 1
  saved_cfg = common.model_config(config)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save_params(3, state_lib.init_params(saved_cfg, jax.random.key(0)), saved_cfg)
  ckpt.close()
  (tmp_path / "config.json").write_text("the run that trained")
  config.model.capacity_factor = 1.25
  with pytest.raises(ValueError) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  assert str(e.value).startswith(f"cannot resume {tmp_path}/checkpoints/3 with a different "
                                 "model (capacity_factor 0.0 -> 1.25)")
  assert (tmp_path / "config.json").read_text() == "the run that trained"


def test_sigterm_saves_a_checkpoint_and_exits_75_then_resume_continues(tmp_path):
  run = str(tmp_path / "run")
  env = main_env()  # the test run's compilation cache (conftest): the rerun compiles nothing
  args = [*SMALL, "--config.checkpoint.every=0"]  # only the signal's checkpoint
  proc = subprocess.Popen(
      [sys.executable, "-m", "esjax.main", "--config=esjax/configs/tiny.py:steps=500",
       f"--workdir={run}", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(run, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-2000:]
  line = [l for l in err.splitlines() if l.startswith("esjax:")][-1]
  assert line.startswith("esjax: stopped by SIGTERM after step") and "rerun" in line
  stopped_at = int(line.split("after step ")[1].split(";")[0])
  assert os.listdir(os.path.join(run, "checkpoints")) == [str(stopped_at)]
  steps = [json.loads(l)["step"] for l in open(metrics)]
  assert steps[-1] == stopped_at and 2 <= stopped_at < 500
  again = run_main(*args, config=f"esjax/configs/tiny.py:steps={stopped_at + 2}",
                   workdir=run)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"/checkpoints/{stopped_at}" in again.stdout


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  from esjax.train import loop  # pylint: disable=g-import-not-at-top
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(ValueError, match=r"--workdir=.*/file is a file, expected a directory"):
    loop.train_and_evaluate(common.base_config(), str(path))


@pytest.mark.parametrize("name", ["checkpoints", "checkpoints.corrupt"])
def test_checkpoints_path_that_is_a_file_stops_at_once_in_one_line(tmp_path, name):
  """`<workdir>/checkpoints` a file hung the run for minutes after the save failed (3
  tracebacks); `checkpoints.corrupt` a file was a raw FileExistsError."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / name).write_text("x")
  out = subprocess.run([sys.executable, "-m", "esjax.main", "--config=esjax/configs/tiny.py",
                        f"--workdir={workdir}", *SMALL], cwd=ROOT, env=main_env(),
                       capture_output=True, text=True, timeout=300)
  lines = [l for l in out.stderr.splitlines() if l.startswith("esjax")]
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines == [f"esjax: error: {workdir / name} is a file, not a directory of checkpoints: "
                   "move it away or use another --workdir"]
  assert (workdir / name).read_text() == "x" and not os.path.exists(workdir / "metrics.jsonl")


def test_out_of_device_memory_is_one_line_with_what_to_change():
  code = ("import jax; from esjax.main import _one_line; print(_one_line(jax.errors."
          "JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
          "30281166392 bytes.\\nmore lines')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=main_env())
  assert out.returncode == 0, out.stderr[-2000:]
  line = out.stdout.strip()
  assert line.startswith("out of device memory (28.2 GiB in one buffer): lower train.batch_size")
  assert "python -m esjax.plan" in line and "\n" not in line


@pytest.mark.parametrize("cli, args, message", [
    ("esjax.eval", ["--tasks=val", "--limit=-1"], "--limit=-1, expected >= 0"),
    ("esjax.eval", ["--tasks=val", "--batch_size=0"], "--batch_size=0, expected > 0"),
    ("esjax.eval", ["--tasks=val", "--output=/no/such/dir/r.json"], "no directory /no/such/dir"),
    ("esjax.generate", ["--prompt=hi", "--top_p=0"], "--top_p=0.0, expected in (0, 1]"),
    ("esjax.generate", ["--prompt=hi", "--max_new_tokens=0"], "--max_new_tokens=0"),
])
def test_eval_and_generate_refuse_bad_flags_before_loading(cli, args, message):
  out = subprocess.run([sys.executable, "-m", cli, "--checkpoint=/no/such/run", *args],
                       cwd=ROOT, capture_output=True, text=True, env=main_env())
  lines = [l for l in out.stderr.splitlines() if l.startswith("esjax")]
  assert out.returncode != 0 and len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith(f"{cli}: error: ") and message in lines[0]
  assert "/no/such/run" not in lines[0]  # refused before the checkpoint is looked at


def test_perplexity_of_an_overflowing_word_is_inf_not_an_error():
  from esjax.eval import perplexity  # pylint: disable=g-import-not-at-top
  assert perplexity._exp(700.0) == math.exp(700.0)  # pylint: disable=protected-access
  assert perplexity._exp(5000.0) == float("inf")  # math.exp raises OverflowError here
  with pytest.raises(OverflowError):
    math.exp(5000.0)


@pytest.mark.parametrize("name, text", [("tok.json", '{"not json'), ("sp.model", "garbage")])
def test_garbage_tokenizer_file_is_one_line(tmp_path, name, text):
  from esjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ValueError, match=rf"data.tokenizer='{path}': not a readable \w+ file"):
    tokenizer.load_tokenizer(str(path))


def test_config_file_with_a_syntax_error_is_one_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n  pass\n")
  out = run_main(config=str(bad), workdir=str(tmp_path / "run"))
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode != 0 and lines[-1] == f"esjax: error: --config: {bad}:1: invalid syntax"
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("body, message", [
    ('raise RuntimeError("no such cluster")', "RuntimeError: no such cluster"),
    ("return {}['mixtral']", "KeyError: 'mixtral'"),  # was "unknown config field 'mixtral'"
])
def test_config_file_whose_get_config_raises_is_one_line(tmp_path, body, message):
  bad = tmp_path / "raises.py"
  bad.write_text(f"def get_config(arg=None):\n  {body}\n")
  out = run_main(config=str(bad), workdir=str(tmp_path / "run"))
  lines = [l for l in out.stderr.splitlines() if l.startswith("esjax")]
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines == [f"esjax: error: --config: {bad}:2: {message}"]


TEXT = "caf\u00e9 ok ".encode("utf-8") * 10


@pytest.mark.parametrize("data, message", [
    (b"ab" + bytes(range(256)) * 64, "is not text (NUL byte at offset 2)"),
    (TEXT + b"\xff\xfe" + b"x" * 100, f"is not UTF-8 text (invalid byte at offset {len(TEXT)})"),
])
def test_binary_input_is_refused_naming_the_file(tmp_path, data, message):
  from esjax.data import sources  # pylint: disable=g-import-not-at-top
  path = tmp_path / "blob.txt"
  path.write_bytes(data)
  with pytest.raises(ValueError, match=rf"data.source: {path} {re.escape(message)}"):
    sources.resolve_files(str(path))
  good = tmp_path / "good.txt"
  good.write_bytes("caf\u00e9 ".encode("utf-8") * 20000)  # multibyte chars across the probe
  assert sources.resolve_files(str(good)) == [str(good)]


def test_binary_after_the_first_64_kib_is_refused_when_read(tmp_path):
  """A text input that is UTF-8 for its first 64 KiB and binary after passes the early check
  but not the reading (issue 30 item 4: 124,649 replacement characters were trained on)."""
  from esjax.data import sources  # pylint: disable=g-import-not-at-top
  head = "caf\u00e9 ok\n".encode("utf-8") * 8000  # 96,000 bytes
  path = tmp_path / "late.txt"
  path.write_bytes(head + b"\xff\xfe\x80 binary")
  files = sources.resolve_files(str(path))
  piece = sources.Piece("text", files[0], 0, 1, os.path.getsize(path), 0)
  with pytest.raises(ValueError, match=rf"data.source: {path} is not UTF-8 text \(invalid "
                                       rf"byte at offset {len(head)}\)"):
    list(sources.documents(piece))


@pytest.fixture()
def hf_folder(tmp_path):
  """The tiny config's model exported as a Hugging Face folder (esjax's own writer)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from esjax.configs import tiny  # pylint: disable=g-import-not-at-top
  from esjax.interop import hf  # pylint: disable=g-import-not-at-top
  from esjax.models import Transformer  # pylint: disable=g-import-not-at-top
  cfg = common.model_config(tiny.get_config())
  folder = tmp_path / "hf"
  hf.save_pretrained(Transformer(cfg, nnx.Rngs(0)), folder, max_shard_bytes=40_000)
  return folder


def _one_line_of_main(out):
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  return lines[-1]


def test_truncated_safetensors_in_init_from_is_one_line(hf_folder, tmp_path):
  shard = sorted(hf_folder.glob("*.safetensors"))[-1]
  with open(shard, "r+b") as f:
    f.truncate(shard.stat().st_size - 100)
  out = run_main(*SMALL, f"--config.checkpoint.init_from={hf_folder}",
                 workdir=str(tmp_path / "run"))
  line = _one_line_of_main(out)
  assert line.startswith("esjax: error: ") and f"{shard}: tensor" in line
  assert "(truncated?)" in line


def test_init_from_a_misfit_esjax_checkpoint_is_one_line(tmp_path):
  """orbax's two read-only warnings came before every init_from error (issue 30 item 7)."""
  fixture = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_checkpoint")
  out = run_main(*SMALL, f"--config.checkpoint.init_from={fixture}",
                 workdir=str(tmp_path / "run"))
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith(f"esjax: error: checkpoint.init_from='{fixture}': parameter "
                             "'embed' has shape (256, 16) but the model expects (256, 64)")


@pytest.mark.parametrize("header, message", [
    (b'{"w": "\xff"}', "header does not parse: UnicodeDecodeError"),
    (b"\x00garbage", "header does not parse: JSONDecodeError"),
    (b'{"w": {"dtype": "F32", "shape": [2]}}', "header does not parse: KeyError"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}',
     "tensor 'w' spans bytes 0..8, but its shape [4] of F32 takes 16"),
    (b'{"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}}',
     "header does not parse: ValueError"),
])
def test_damaged_safetensors_header_is_one_line_naming_the_file(tmp_path, header, message):
  from esjax.interop import safetensors_io  # pylint: disable=g-import-not-at-top
  path = tmp_path / "model.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
  with pytest.raises(ValueError, match=re.escape(message)) as e:
    safetensors_io.read_header(path)
  assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("hidden_size"), "Hugging Face config: no hidden_size"),
    (lambda c: c.update(hidden_size="64"), "hidden_size='64': expected a positive integer"),
    (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers=0: expected a positive"),
    (lambda c: c.update(vocab_size=2.5), "vocab_size=2.5: expected a positive integer"),
    (None, "config.json: not JSON"),
])
def test_damaged_hf_config_is_one_line(hf_folder, edit, message):
  from esjax.interop import load  # pylint: disable=g-import-not-at-top
  path = hf_folder / "config.json"
  if edit is None:
    path.write_bytes(b'{"hidden_size": 6\xff')
  else:
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
  assert load.is_hf_folder(hf_folder)  # still taken for a Hugging Face folder, and refused
  with pytest.raises(ValueError, match=re.escape(message)) as e:
    load.read_config(hf_folder)
  assert "\n" not in str(e.value)


def test_resume_warning_names_a_huge_parameter_or_a_gradient_jump():
  from esjax.train import guard  # pylint: disable=g-import-not-at-top
  calm = [dict(loss=3.0, grad_norm=g, max_abs_param=2.0) for g in (1.0, 2.0, 3.0)]
  assert guard.resume_warning(9, dict(loss=2.9, grad_norm=2.5, max_abs_param=3.0), calm) is None
  assert guard.resume_warning(9, None, calm) is None  # saved before health was recorded
  huge = guard.resume_warning(9, dict(loss=2.9, grad_norm=2.5, max_abs_param=2.2e12), calm)
  assert huge.startswith("checkpoint step 9 may be close to a collapse: its largest "
                         "|parameter| is 2.2e+12 (above 1e+04)")
  jump = guard.resume_warning(9, dict(loss=2.9, grad_norm=41.0, max_abs_param=3.0), calm)
  assert "gradient norm 41 is 20x the median 2 of the 3 earlier checkpoints" in jump
  assert "lower optim.lr" in jump and "\n" not in jump
  # No earlier checkpoint: no jump to measure.
  assert guard.resume_warning(9, dict(loss=2.9, grad_norm=41.0, max_abs_param=3.0), []) is None


def test_a_save_the_disk_has_no_room_for_is_refused_before_writing(tmp_path, monkeypatch):
  states, engine, tx = _saved(tmp_path, steps=(1,))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=0)
  free = 1 << 20
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil_usage(free))
  with pytest.raises(ValueError, match=r"checkpoint step 2 needs about [\d.]+ MiB but .* has "
                     r"1.0 MiB free; the checkpoints of steps \[1\] are intact: free space"):
    ckpt.save(states[1].replace(step=jnp.asarray(2, jnp.int32)), {"position": 2}, CFG,
              engine.fmt)
  assert ckpt.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1"]
  ckpt.close()


def shutil_usage(free):
  import shutil  # pylint: disable=g-import-not-at-top
  return shutil._ntuple_diskusage(free * 4, free * 3, free)  # pylint: disable=protected-access


def _mount_tmpfs(path, options):
  path.mkdir()
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)
  if out.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()[:80]})")


def _fill_then_make_room(tmp_path, options, room, async_save, left):
  """The 6-step tiny run (checkpoints every 2 steps) on a tmpfs mounted with `options`, which
  holds step 2's checkpoint but not step 4's: the run must stop in one stderr line, leaving
  `left` in its checkpoints directory; remounted with `room`, the same command resumes from
  step 2 and finishes. Returns the line and the directory the checkpoints are in."""
  mnt = tmp_path / "small"
  _mount_tmpfs(mnt, options)
  args = (*SMALL, f"--config.checkpoint.async_save={str(async_save).lower()}")
  run = dict(config="esjax/configs/tiny.py:steps=6", workdir=str(mnt / "run"))
  try:
    out = run_main(*args, **run)
    lines = [l for l in re.split(r"[\r\n]", out.stderr) if l.strip() and "train:" not in l]
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
    saved = mnt / "run" / "checkpoints"
    assert sorted(os.listdir(saved)) == left
    subprocess.run(["mount", "-o", f"remount,{room}", str(mnt)], check=True)
    again = run_main(*args, **run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {saved}/2" in again.stdout
    assert sorted(os.listdir(saved)) == ["2", "4", "6"]
    return lines[0], saved
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_stops_in_one_line_and_the_run_resumes_once_there_is_room(tmp_path):
  """A real full filesystem: an 8 MB tmpfs holds the tiny run's first checkpoint (5 MB), not
  the second; the run stops in one line naming what is intact, and resumes from it."""
  line, _ = _fill_then_make_room(tmp_path, "size=8m", "size=32m", async_save=False,
                                 left=["2"])
  assert re.fullmatch(r"esjax: error: checkpoint step 4 needs about [\d.]+ MiB but .* has "
                      r"[\d.]+ MiB free; the checkpoints of steps \[2\] are intact: free "
                      r"space \(or move --workdir\) and rerun to resume", line), line


def test_a_disk_that_fills_during_an_async_save_is_one_line_and_the_run_resumes(tmp_path):
  """The filesystem runs out mid-save (out of inodes: a tmpfs with 95 holds the run, its data
  and step 2's checkpoint, not all of step 4's files; the free bytes pass the check before
  the save), in orbax's background writes: one line naming what is intact, not orbax's and
  tensorstore's ~200 lines of tracebacks (issue 30 item 7); room made, the run resumes."""
  line, saved = _fill_then_make_room(  # step 4's partial save is removed at the next start
      tmp_path, "size=64m,nr_inodes=95", "nr_inodes=100000", async_save=True,
      left=["2", "4.orbax-checkpoint-tmp"])
  assert line == (f"esjax: error: no space left on device while saving checkpoint step 4 in "
                  f"{saved}; the checkpoints of steps [2] are intact: free space (or move "
                  "--workdir) and rerun to resume")


def test_a_manifest_another_process_is_still_writing_is_not_checksummed(tmp_path):
  """Process 0 seals while process 1's manifest is a temporary file in the step (issue 30,
  item 3): it must not list it, or the step fails verification once the file is renamed."""
  step = tmp_path / "3"
  (step / "params/ocdbt.process_0/d").mkdir(parents=True)
  (step / "params/ocdbt.process_0/d/a").write_bytes(b"a" * 100)
  (step / "esjax_manifest.1.json.tmp8427").write_text("{")  # process 1, mid-write
  integrity.write(str(step), 0)
  listed = set(json.load(open(step / integrity.MANIFEST))["files"])
  assert listed == {"params/ocdbt.process_0/d/a"}
  os.replace(step / "esjax_manifest.1.json.tmp8427", step / "esjax_manifest.1.json")
  (step / "esjax_manifest.1.json").write_text(json.dumps({"format": 1, "process": 1,
                                                           "files": {}}))
  assert integrity.problem(str(step)) is None


def test_missing_optional_packages_are_one_line(tmp_path, monkeypatch):
  """Ray (DGS) and pyarrow (Parquet, saved datasets) are optional (requirements-optional.txt):
  without them the commands that need them stop in one line naming the install."""
  from esjax.data import sources  # pylint: disable=g-import-not-at-top
  from esjax.distributed import main as dgs_main  # pylint: disable=g-import-not-at-top
  for name in ("pyarrow", "pyarrow.parquet", "ray"):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` then raises ImportError
  monkeypatch.delitem(sys.modules, "esjax.distributed.runtime", raising=False)
  path = tmp_path / "data.parquet"
  path.write_bytes(b"PAR1")
  with pytest.raises(ValueError, match=rf"data.source: {path} needs pyarrow, which is not "
                                       r"installed: pip install -r requirements-optional.txt"):
    sources.pieces([str(path)], 1 << 20)
  with pytest.raises(SystemExit, match="DGS runs on Ray, which is not installed: pip install "
                                       "-r requirements-optional.txt"):
    dgs_main.runtime()


def test_prepare_refuses_a_negative_max_bytes(tmp_path):
  """`--max_bytes=-1` was accepted and read one file (issue 30 item 7)."""
  out = subprocess.run([sys.executable, "-m", "esjax.data.prepare", "--source=stdlib",
                        "--tokenizer=byte", f"--out={tmp_path / 'p'}", "--max_bytes=-1"],
                       cwd=ROOT, env=main_env(), capture_output=True, text=True, timeout=300)
  lines = [l for l in out.stderr.splitlines() if l.startswith("esjax")]
  assert out.returncode == 1 and lines == [
      "esjax.data.prepare: error: --max_bytes=-1: expected an integer >= 0"], out.stderr
  assert not (tmp_path / "p").exists()


def test_init_from_on_a_run_that_resumes_says_it_is_not_used(tmp_path):
  """A workdir with checkpoints resumes; checkpoint.init_from was silently ignored (issue
  30 item 7), now a warning says so."""
  first = run_main(*SMALL, config="esjax/configs/tiny.py:steps=2", workdir=str(tmp_path))
  assert first.returncode == 0, first.stderr[-2000:]
  again = run_main(*SMALL, "--config.checkpoint.init_from=/nonexistent/run",
                   config="esjax/configs/tiny.py:steps=3", workdir=str(tmp_path))
  assert again.returncode == 0, again.stderr[-2000:]
  lines = [l for l in again.stderr.splitlines() if l.startswith("esjax")]
  assert lines == ["esjax: warning: checkpoint.init_from='/nonexistent/run' is not used: this "
                   "run resumes from its own step 2"], again.stderr[-2000:]


def _immutable(path) -> bool:
  return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def test_a_save_that_cannot_create_its_directory_ends_the_run_in_one_line(tmp_path):
  """An immutable checkpoints directory (issue 30 item 5): the error line printed, then the
  process never exited (orbax's save threads wait for a signal that never comes) and 14
  tracebacks of orbax's logs came with it."""
  ckpts = tmp_path / "checkpoints"
  ckpts.mkdir()
  if not _immutable(ckpts):
    pytest.skip("chattr +i is not available here")
  try:  # the old code hung here: a bounded wait
    out = subprocess.run([sys.executable, "-m", "esjax.main",
                          "--config=esjax/configs/tiny.py:steps=6", f"--workdir={tmp_path}",
                          *SMALL, "--config.checkpoint.every=3"], cwd=ROOT, env=main_env(),
                         capture_output=True, text=True, timeout=240)
  finally:
    subprocess.run(["chattr", "-i", str(ckpts)], check=True)
  lines = [l for l in out.stderr.splitlines() if l.startswith("esjax")]
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines == [f"esjax: error: saving checkpoint step 3 in {ckpts} failed ([Errno 1] "
                   f"Operation not permitted: '{ckpts}/3.orbax-checkpoint-tmp'); no earlier "
                   "checkpoint exists"], lines


def test_a_state_too_big_for_host_memory_is_one_line_before_allocating(tmp_path):
  """`model.vocab_size=2000000000` sat idle without a word (issue 30 item 6): the state's
  bytes, from its abstract shapes, against the host's available memory."""
  from esjax.train import loop  # pylint: disable=g-import-not-at-top
  state = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}  # 4 MiB
  loop.check_host_memory(state, available=5 * 2**20)
  with pytest.raises(ValueError, match=r"needs 0.0 GiB of host memory, 0.0 GiB is available"):
    loop.check_host_memory(state, available=3 * 2**20)
  out = subprocess.run([sys.executable, "-m", "esjax.main", "--config=esjax/configs/tiny.py",
                        f"--workdir={tmp_path}", "--config.model.vocab_size=2000000000"],
                       cwd=ROOT, env=main_env(), capture_output=True, text=True, timeout=240)
  lines = [l for l in out.stderr.splitlines() if l.startswith("esjax")]
  assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
  # Embedding and head (untied) of 2e9 x d_model 64, float32 weights and two Adam moments;
  # the rest of the tiny model is a few MiB.
  want = 2 * 2_000_000_000 * 64 * 3 * 4 / 2**30
  assert re.fullmatch(rf"esjax: error: the train state \(weights and optimizer state\) needs "
                      rf"{want:,.1f} GiB of host memory, [\d,.]+ GiB is available: .*", lines[0])


def test_resume_that_turns_gradient_clipping_off_names_grad_clip(tmp_path):
  """`optim.grad_clip=0` on a run saved with clipping was refused with orbax's tree-mismatch
  text, which never names the setting (issue 30 item 7)."""
  first = run_main(*SMALL, config="esjax/configs/tiny.py:steps=2", workdir=str(tmp_path))
  assert first.returncode == 0, first.stderr[-2000:]
  again = run_main(*SMALL, "--config.optim.grad_clip=0", config="esjax/configs/tiny.py:steps=3",
                   workdir=str(tmp_path))
  lines = [l for l in again.stderr.splitlines() if l.startswith("esjax")]
  assert again.returncode == 1 and len(lines) == 1, again.stderr[-2000:]
  assert lines[0].startswith(f"esjax: error: cannot resume {tmp_path}/checkpoints/2 with "
                             "optim.grad_clip=0: its optimizer state was saved with grad_clip=")
