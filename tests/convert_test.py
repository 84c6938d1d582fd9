"""`python -m esjax.convert`: Hugging Face folder -> esjax checkpoint -> Hugging Face folder
gives back transformers' tensors bit for bit, and the checkpoint starts runs and evaluations
like any esjax checkpoint."""

import os
import subprocess
import sys

import numpy as np
import safetensors.numpy

from esjax import convert, interop
from esjax.train import checkpoint
from interop_test import HF_CASES, TOL, _hf, _hf_logits, _hf_model, _logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(folder):
  out = {}
  for f in folder.glob("*.safetensors"):
    out.update(safetensors.numpy.load_file(f))
  return out


def test_hf_to_esjax_to_hf(tmp_path):
  _, transformers = _hf()
  hf_model = _hf_model(*HF_CASES["qwen2_moe_shared_first_dense"])
  hf_model.save_pretrained(tmp_path / "hf")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  cli = subprocess.run([sys.executable, "-m", "esjax.convert", f"--src={tmp_path / 'hf'}",
                        f"--dst={tmp_path / 'ckpt'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert str(tmp_path / "ckpt" / "checkpoints" / "0") in cli.stdout

  cfg, params = checkpoint.restore_params(str(tmp_path / "ckpt"))
  assert cfg == interop.read_config(tmp_path / "hf")
  np.testing.assert_allclose(_logits(interop.model_from_params(cfg, params)),
                             _hf_logits(hf_model), atol=TOL, rtol=0)

  written = convert.convert(str(tmp_path / "ckpt"), str(tmp_path / "back"), max_shard_gb=5e-5)
  assert "model.safetensors.index.json" in written
  ours, theirs = _tensors(tmp_path / "back"), _tensors(tmp_path / "hf")
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")) is type(
      hf_model)


def test_bad_source_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cli = subprocess.run([sys.executable, "-m", "esjax.convert", f"--src={tmp_path / 'none'}",
                        f"--dst={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert cli.returncode == 1
  assert cli.stderr.strip().splitlines()[-1].startswith("esjax.convert: error: ")
  assert "no such directory" in cli.stderr and not (tmp_path / "out").exists()


def test_export_of_a_byte_tokenizer_run_carries_its_tokenizer(tmp_path):
  """A run trained on bytes exports a folder that esjax.generate and transformers read: its
  tokenizer.json gives each byte its own id (issue 28 item 13: the folder had no tokenizer
  and esjax.generate failed on it). Greedy text from the folder equals the run's."""
  import json  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from esjax.configs import common, tiny  # pylint: disable=g-import-not-at-top
  from esjax.data.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  from esjax.eval import generation, loading  # pylint: disable=g-import-not-at-top
  from esjax.models import Transformer  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  config = tiny.get_config("dense")
  (run).mkdir()
  (run / "config.json").write_text(json.dumps(config.to_dict()))
  cfg = common.model_config(config)
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param))
  ckpt = checkpoint.Checkpointer(str(run / "checkpoints"), keep=0, async_save=False)
  ckpt.save_params(1, params, cfg)
  ckpt.close()
  written = convert.convert(str(run), str(tmp_path / "hf"))
  assert "tokenizer.json" in written
  text = "caf\u00e9 = 1\n\tdef"
  model, tok, _ = loading.load(str(tmp_path / "hf"))
  assert tok.encode(text).tolist() == ByteTokenizer().encode(text).tolist()
  assert tok.eos_id == ByteTokenizer.eos_id
  _, transformers = _hf()
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
  run_model, run_tok, _ = loading.load(str(run))
  want = generation.generate_text(run_model, run_tok, ["def "], max_new_tokens=8)
  assert generation.generate_text(model, tok, ["def "], max_new_tokens=8) == want
  # The command says what it wrote in one line, not under orbax's and jax's INFO lines
  # (issue 28 item 8: 41 lines).
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cli = subprocess.run([sys.executable, "-m", "esjax.convert", f"--src={run}",
                        f"--dst={tmp_path / 'hf2'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert cli.stdout.splitlines() == [f"{run} -> {tmp_path / 'hf2'}: model.safetensors, "
                                     "config.json, tokenizer.json, tokenizer_config.json"]
  assert "orbax" not in cli.stderr and "Unable to initialize backend" not in cli.stderr


def test_benchmark_export_offline_is_one_line(tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             HF_HOME=str(tmp_path / "hf_home"))
  cli = subprocess.run([sys.executable, "-m", "esjax.eval.export", "--benchmarks=hellaswag",
                        f"--out={tmp_path / 'tasks'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert cli.returncode == 1
  assert cli.stderr.strip().splitlines()[-1].startswith(
      "esjax.eval.export: error: hellaswag: could not download it")
  assert "Traceback" not in cli.stderr
