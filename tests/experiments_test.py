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
