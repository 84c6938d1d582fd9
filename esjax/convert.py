"""Converts a Hugging Face folder to an esjax checkpoint and back.

  python -m esjax.convert --src=/models/Meta-Llama-3.1-8B --dst=/ckpt/llama31   # HF -> esjax
  python -m esjax.convert --src=/runs/moe --dst=/export/moe-hf [--dtype=bfloat16]  # esjax -> HF
  python -m esjax.convert --src=/models/smollm2.Q4_1.gguf --dst=/models/smollm2   # GGUF -> HF

The direction follows `--src`. A GGUF file (llama.cpp's, Llama architecture) becomes a
Hugging Face folder of its dequantized weights and tokenizer (esjax/interop/gguf_file.py),
which eval, generate and init_from read. A Hugging Face folder (config.json + safetensors of a
supported architecture, see esjax/interop) becomes the esjax checkpoint `DST/checkpoints/0`:
parameters and model config, no optimizer state, so runs start from it with
`checkpoint.init_from=DST` (and eval / generate read it), but none resumes from it. An esjax
run (its workdir, checkpoints/ or one step) becomes a Hugging Face folder that transformers
loads, with the run's tokenizer (the byte tokenizer as an equivalent `tokenizer.json`), so
esjax.generate and esjax.eval run on it too (`--dtype` casts the exported tensors;
`--max_shard_gb` sizes the files).

Parameters are spread over every device (each parameter split along its first dimension the
device count divides), so the model needs only its share of each device's memory and the
host holds one tensor at a time. Under a multi-process launch (ESJAX_COORDINATOR, see
esjax/parallel/multihost.py) every process reads its own shards; the destination must then
be on a file system all processes share.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P

from esjax import interop
from esjax.interop import gguf_file
from esjax.data import tokenizer
from esjax.eval import loading
from esjax.parallel import multihost
from esjax.train import checkpoint

_SRC = flags.DEFINE_string("src", None, "Hugging Face folder or esjax run / checkpoint.")
_DST = flags.DEFINE_string("dst", None, "Output: esjax checkpoint dir or Hugging Face folder.")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype of the output (default: kept).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors file (HF output).")
flags.mark_flags_as_required(["src", "dst"])


def spread(abstract: Any, mesh: Any) -> Any:
  """ShapeDtypeStructs of `abstract` split along their first dimension `mesh` divides."""
  n = mesh.size

  def one(a):
    dims = [d for d, size in enumerate(a.shape) if size % n == 0][:1]
    spec = P(*([None] * dims[0] + ["all"])) if dims else P()
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree.map(one, abstract)


def convert(src: str, dst: str, dtype: str | None = None, max_shard_gb: float = 5.0
            ) -> list[str]:
  """Converts `src` into `dst` (see module docstring); returns what was written."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
  overrides = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
  if gguf_file.is_gguf(src):
    folder = gguf_file.to_hf_folder(src, dst)
    return sorted(os.listdir(folder))
  if interop.is_hf_folder(src):
    placed = lambda cfg: spread(interop.abstract_params(cfg), mesh)  # noqa: E731
    cfg, params = interop.read_params(src, placed, **overrides)
    out = os.path.join(os.path.abspath(dst), checkpoint.CHECKPOINT_DIR)
    ckpt = checkpoint.Checkpointer(out, keep=0, async_save=False)
    try:
      ckpt.save_params(0, params, cfg)
      ckpt.wait()
    finally:
      ckpt.close()
    return [os.path.join(out, "0")]
  cfg, params = checkpoint.restore_params(
      src, lambda c: jax.tree.map(lambda a: a.sharding, spread(interop.abstract_params(c), mesh)))
  written = interop.save_pretrained_params(cfg, params, dst, dtype=dtype,
                                           max_shard_bytes=int(max_shard_gb * 2**30))
  if jax.process_index() == 0:
    written += export_tokenizer(src, dst)
  return written


def export_tokenizer(src: str, dst: str) -> list[str]:
  """The tokenizer the run at `src` trained with, written into the Hugging Face folder `dst`
  (`esjax.data.tokenizer.write_hf_files`): the run's config names it; a checkpoint without
  one is the byte tokenizer's, as esjax.eval reads it."""
  config = loading.run_config(src)
  spec = config.data.tokenizer if config is not None and "data" in config else "byte"
  try:
    return [os.path.basename(p) for p in tokenizer.write_hf_files(spec, dst)]
  except FileNotFoundError:
    print(f"esjax.convert: warning: the run's tokenizer {spec!r} is gone; {dst} has none "
          "(copy its tokenizer.json there)", file=sys.stderr, flush=True)
    return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.config_with_absl()
  if not flags.FLAGS["verbosity"].present:  # orbax's and jax's INFO lines bury the result
    logging.set_verbosity(logging.ERROR)     # (--verbosity=0 shows them)
  try:
    multihost.initialize_from_env()
    written = convert(_SRC.value, _DST.value, _DTYPE.value, _MAX_SHARD_GB.value)
  except (ValueError, FileNotFoundError) as e:
    logging.debug("full traceback (shown with --verbosity=1):", exc_info=True)
    sys.exit(f"esjax.convert: error: {e}")
  if jax.process_index() == 0:
    print(f"{_SRC.value} -> {_DST.value}: {', '.join(written)}")


if __name__ == "__main__":
  app.run(main)
