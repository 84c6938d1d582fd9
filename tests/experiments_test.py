"""The notebooks' shared helpers (experiments/study.py) on a tiny config."""

import math

from esjax.configs import common
from experiments import study
from experiments.efficientscale import recipe


def test_val_loss_at_random_init_is_about_log_vocab(tmp_path):
  """Near-zero logits at init (init_std 0.02) give a cross-entropy of about ln(vocab)."""
  config = recipe.stage_config("dense", root=str(tmp_path))
  config.data.max_bytes = 100_000
  config.train.eval_batches = 1
  vocab = common.model_config(config).vocab_size
  assert abs(study.val_loss_at_init(config) - math.log(vocab)) < 0.05


def test_val_loss_at_init_loads_and_converts_init_from_as_the_loop_does(tmp_path):
  """A Hugging Face folder holding the seed-7 init: the dense config at seed 0 reads it (its
  loss is the seed-7 model's, not its own random init's), and an MoE config upcycles it
  (top-k then softmax keeps the function)."""
  import jax  # pylint: disable=g-import-not-at-top
  from esjax.interop import hf  # pylint: disable=g-import-not-at-top
  from esjax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  def config(stage, seed, init_from=""):
    c = recipe.stage_config(stage, root=str(tmp_path))
    c.data.max_bytes, c.train.eval_batches, c.train.seed = 100_000, 1, seed
    c.checkpoint.init_from = init_from
    return c

  dense = config("scaleup", 7)
  cfg = common.model_config(dense)
  hf.save_pretrained_params(cfg, state_lib.init_params(cfg, jax.random.key(7)),
                            tmp_path / "hf")
  seed7 = study.val_loss_at_init(dense)
  assert abs(study.val_loss_at_init(config("scaleup", 0)) - seed7) > 1e-4
  assert abs(study.val_loss_at_init(config("scaleup", 0, str(tmp_path / "hf"))) - seed7) < 1e-6
  upcycled = study.val_loss_at_init(config("scaleout", 0, str(tmp_path / "hf")))
  assert abs(upcycled - seed7) < 1e-5
