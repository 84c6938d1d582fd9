"""Generates text from a checkpoint.

  python -m esjax.generate --checkpoint=/tmp/esjax_tiny --prompt="def main(" \
      [--prompt="import "] [--max_new_tokens=64] [--temperature=0.8 --top_p=0.95] [--stop=...]

`--checkpoint` is an esjax run (workdir, checkpoints/ or one step; the tokenizer is the run's)
or a Hugging Face folder with tokenizer.json. Several `--prompt`s decode as one batch.
Temperature 0 (the default) is greedy.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (optional: the run's config.json is used).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "esjax run or Hugging Face folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop strings (cut from the output).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Context length (default: the model's).")
flags.mark_flags_as_required(["checkpoint", "prompt"])


def _check_flags() -> None:
  for name, value, ok, expected in (
      ("max_new_tokens", _MAX_NEW.value, _MAX_NEW.value > 0, "> 0"),
      ("temperature", _TEMPERATURE.value, 0 <= _TEMPERATURE.value < float("inf"), ">= 0"),
      ("top_p", _TOP_P.value, 0 < _TOP_P.value <= 1, "in (0, 1]"),
      ("top_k", _TOP_K.value, _TOP_K.value >= 0, ">= 0 (0: all)"),
      ("max_len", _MAX_LEN.value, _MAX_LEN.value is None or _MAX_LEN.value > 0, "> 0")):
    if not ok:
      raise ValueError(f"--{name}={value}, expected {expected}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  from esjax.eval import generation, loading, sampling  # pylint: disable=g-import-not-at-top

  jax.config.config_with_absl()
  if not flags.FLAGS["verbosity"].present:  # orbax's lines on opening a checkpoint to read
    logging.set_verbosity(logging.ERROR)     # it are noise here (--verbosity=-1 shows them)
  try:
    _check_flags()
    model, tokenizer, _ = loading.load(_CHECKPOINT.value, _CONFIG.value)
    if _MAX_LEN.value and _MAX_LEN.value > model.cfg.max_seq_len:
      raise ValueError(f"--max_len={_MAX_LEN.value} exceeds the model's max_seq_len="
                       f"{model.cfg.max_seq_len}")
    how = sampling.Sampling(_TEMPERATURE.value, _TOP_P.value, _TOP_K.value)
    texts = generation.generate_text(
        model, tokenizer, _PROMPT.value, max_new_tokens=_MAX_NEW.value, sampling=how,
        stop=_STOP.value, batch_size=len(_PROMPT.value), seed=_SEED.value,
        max_len=_MAX_LEN.value)
  except (ValueError, FileNotFoundError) as e:
    logging.debug("full traceback (shown with --verbosity=1):", exc_info=True)
    sys.exit(f"esjax.generate: error: {e}")
  for prompt, text in zip(_PROMPT.value, texts):
    print(prompt + text)
    if len(texts) > 1:
      print("-" * 40)


if __name__ == "__main__":
  app.run(main)
