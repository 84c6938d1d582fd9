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
