"""A model and its tokenizer from a checkpoint path, for the eval and generate commands.

Two kinds of path:
- an esjax run: its workdir, `workdir/checkpoints` or `workdir/checkpoints/<step>` (the model
  config is saved with the checkpoint; the tokenizer is the run's `data.tokenizer`, read from
  the `--config` given or from the `config.json` the run wrote into its workdir);
- a Hugging Face folder (`config.json` + `*.safetensors`, with `tokenizer.json` alongside),
  e.g. one written by `esjax.interop` or `save_pretrained`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from esjax.data.tokenizer import Tokenizer, load_tokenizer
from esjax.interop import load as hf_load
from esjax.models.config import ModelConfig
from esjax.models import params as params_lib
from esjax.models.transformer import Transformer
from esjax.train import checkpoint as ckpt_lib


build_model = params_lib.model_from_params  # (cfg, params[, buffers]) -> Transformer


def load_hf(folder: str) -> tuple[Transformer, Tokenizer]:
  """A Hugging Face folder of a supported architecture (`esjax.interop`) and its tokenizer
  (`tokenizer.json`, or a SentencePiece `tokenizer.model` when that is all the folder has)."""
  for name in ("tokenizer.json", "tokenizer.model"):  # tokenizers, else SentencePiece
    tok_path = os.path.join(folder, name)
    if os.path.isfile(tok_path):
      return build_model(*hf_load.read_params(folder)), load_tokenizer(tok_path)
  raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model next to the weights")


def run_dir(checkpoint: str) -> str:
  """The folder `checkpoint` belongs to: the first of itself and the two folders above it that
  holds a config.json (a run's workdir, or a Hugging Face folder), else its own folder."""
  path = os.path.abspath(checkpoint)
  for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  return path if os.path.isdir(path) else os.path.dirname(path)


def run_config(checkpoint: str) -> ml_collections.ConfigDict | None:
  """The experiment config a run wrote to its workdir (looked for above `checkpoint`)."""
  path = os.path.join(run_dir(checkpoint), "config.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def load(checkpoint: str, config: ml_collections.ConfigDict | None = None
         ) -> tuple[Transformer, Tokenizer, ml_collections.ConfigDict | None]:
  """(model, tokenizer, experiment config or None) of an esjax run or a Hugging Face folder."""
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint!r}: no such file or directory")
  if hf_load.is_hf_folder(checkpoint):
    model, tokenizer = load_hf(checkpoint)
    return model, tokenizer, config
  cfg, params = ckpt_lib.restore_params(checkpoint)
  buffers = ckpt_lib.restore_buffers(checkpoint) if cfg.expert_bias else None
  config = config if config is not None else run_config(checkpoint)
  spec = config.data.tokenizer if config is not None and "data" in config else "byte"
  return build_model(cfg, params, buffers), load_tokenizer(spec), config
