"""`from_pretrained` / `save_pretrained`: local Hugging Face folders <-> esjax models.

No hub access and no torch: config.json is mapped by `hf_config`, tensors are read through
memory maps into the devices' shards (`load`) and written as a stream, one tensor at a time.
A model sharded over several processes is exported by gathering one tensor at a time on
every process (all must call `save_pretrained`); process 0 writes the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.experimental import multihost_utils

from esjax.interop import hf_config, hf_params, load, safetensors_io
from esjax.models import moe
from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
read_config = load.read_config


def load_pretrained_params(folder: str | os.PathLike, *, shardings: Any = None,
                           **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """(config, parameter tree) of a local HF folder; `overrides` replace config fields."""
  return load.read_params(folder, shardings, **overrides)


def model_from_params(cfg: ModelConfig, params: Any) -> Transformer:
  """A Transformer holding `params` (a pure dict or nnx.State), without a random init."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(state, hf_params.to_pure_dict(params))
  return nnx.merge(graphdef, state)


def from_pretrained(folder: str | os.PathLike, *, shardings: Any = None,
                    **overrides: Any) -> Transformer:
  """An esjax model from a local HF folder of a supported architecture (`hf_config`).

  `model.cfg` is the config read from config.json with `overrides` applied (e.g.
  `dtype="float32"`, `aux_loss_coef=0.01`, `capacity_factor=1.25`). Parameters keep the
  checkpoint's dtype unless `param_dtype` is overridden. With moe_impl='auto' the
  grouped-matmul kernels are checked on this device first (`moe.checked`).
  """
  cfg, params = load_pretrained_params(folder, shardings=shardings, **overrides)
  return model_from_params(moe.checked(cfg), params)


def _replace_files(tmp: Path, folder: Path, files: list[str]):
  """Moves `files` from `tmp` into `folder`, first removing an earlier save's stale shards."""
  for old in list(folder.glob("model*.safetensors")) + [folder / safetensors_io.INDEX]:
    if old.name not in files and old.is_file():
      old.unlink()
  for name in files:
    os.replace(tmp / name, folder / name)


def save_pretrained_params(cfg: ModelConfig, params: Any, folder: str | os.PathLike, *,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           dtype: str | None = None) -> list[str]:
  """Writes config.json and safetensors of (cfg, params) that transformers loads.

  Files (mode 0644) are written to a temporary folder inside `folder` and moved in only
  when complete, so a failure leaves no half-written checkpoint; stale `model*.safetensors`
  files and index of an earlier save are removed. With parameters sharded over several
  processes, every process calls this: each tensor is gathered in turn and process 0
  writes it (host memory: one tensor); all return once the folder is complete. Returns the
  names of the files written.
  """
  hf = hf_config.config_to_hf(cfg, dtype)  # raises before anything touches the disk
  specs = hf_params.tensor_specs(cfg, dtype)
  tensors = (t for _, t in hf_params.iter_hf_tensors(cfg, params, dtype))
  folder, writer = Path(folder), jax.process_index() == 0
  if not writer:
    files = safetensors_io.write_safetensors(specs, tensors, folder, max_shard_bytes, write=False)
  else:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".esjax-save-", dir=folder))
    try:
      files = safetensors_io.write_safetensors(specs, tensors, tmp, max_shard_bytes)
      (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
      os.chmod(tmp / "config.json", 0o644)
      _replace_files(tmp, folder, files + ["config.json"])
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("esjax.interop.save_pretrained")
  return files + ["config.json"]


def save_pretrained(model: Transformer, folder: str | os.PathLike, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    dtype: str | None = None) -> list[str]:
  """Writes `model` as a Hugging Face folder (`transformers.AutoModelForCausalLM` loads it).

  The architecture is the one that computes what the model computes (`hf_config.
  architecture_for`); configs with no HF equivalent raise ValueError. Training-only settings
  (router loss coefficients, token dropping) are not part of the export.
  """
  return save_pretrained_params(model.cfg, nnx.state(model, nnx.Param), folder,
                                max_shard_bytes=max_shard_bytes, dtype=dtype)
