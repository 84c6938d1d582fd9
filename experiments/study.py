"""What the ablation notebooks share: train a config in this process, read its validation
curve, the validation loss of a model right after its init, and the two-panel figure.

The notebooks (experiments/{scaleup,scaleout,routing}/*.py, jupytext) only import esjax and
this module; configs come from `experiments.efficientscale.recipe`.
"""

from __future__ import annotations

from typing import Callable

import jax
import ml_collections
import numpy as np

from esjax.configs import common
from esjax.data import dataset
from esjax.models import loss, params as params_lib
from esjax.sharding import layout, plan as plan_lib
from esjax.train import init_from, loop, metrics, state as state_lib


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` in this process (a finished run resumes as a no-op)."""
  return loop.train_and_evaluate(config, workdir)


def val_curve(workdir: str, config: ml_collections.ConfigDict
              ) -> tuple[list[int], list[float]]:
  """(tokens seen in this run, validation loss) at every evaluation of the run."""
  per_step = config.train.batch_size * config.train.seq_len
  rows = [r for r in metrics.read_metrics(workdir) if "val_loss" in r]
  return [r["step"] * per_step for r in rows], [r["val_loss"] for r in rows]


def train_runs(configs: dict[str, ml_collections.ConfigDict], workdir: Callable[[str], str]
               ) -> tuple[dict[str, float], dict[str, tuple[list[int], list[float]]]]:
  """Trains every config in `workdir(name)`: (final validation loss, `val_curve`) by name."""
  final = {name: train(c, workdir(name))["val_loss"] for name, c in configs.items()}
  return final, {name: val_curve(workdir(name), c) for name, c in configs.items()}


def val_loss_at_init(config: ml_collections.ConfigDict) -> float:
  """Validation loss of `config`'s model right after its init: loaded and converted from
  config.checkpoint.init_from (a run, a Hugging Face folder or a GGUF file) by the training
  loop's own `init_from.load`, else random."""
  cfg, tc = common.model_config(config), config.train
  if config.checkpoint.init_from:
    plan = plan_lib.make_plan(layout.Layout(dp=1), jax.devices()[:1])
    params = init_from.load(config, cfg, plan)
  else:
    params = state_lib.init_params(cfg, jax.random.key(tc.seed))
  data = dataset.build(config.data, tc.seq_len, tc.batch_size, tc.seed, tc.eval_batches)
  ce = jax.jit(lambda p, b: loss.lm_loss(params_lib.model_from_params(cfg, p), b)[1]["ce_loss"])
  return float(np.mean([ce(params, jax.device_put(b)) for b in data.val]))


def plot_runs(curves: dict[str, tuple[list[int], list[float]]], init_loss: dict[str, float],
              path: str, title: str, zoom_title: str, xlabel: str,
              zoomed: Callable[[str, list, list], tuple[list, list] | None],
              baseline: tuple[float, str] | None = None) -> None:
  """Validation loss against tokens for each run (starting at its loss after init), beside a
  zoomed panel of what `zoomed(name, tokens, val)` keeps (None: left out); saved at `path`."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (optional, heavy)
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4))
  for name, (tokens, val) in curves.items():
    ax.plot([0] + tokens, [init_loss[name]] + val, marker="o", ms=3, label=name)
    kept = zoomed(name, tokens, val)
    if kept is not None:
      zoom.plot(*kept, marker="o", ms=3, label=name)
  if baseline is not None:
    ax.axhline(baseline[0], color="gray", ls=":", label=baseline[1])
  for a in (ax, zoom):
    a.xaxis.set_major_formatter(ticker.EngFormatter())
    a.set_xlabel(xlabel)
    a.set_ylabel("validation loss")
    a.legend()
  ax.set_title(title)
  zoom.set_title(zoom_title)
  fig.savefig(path, dpi=120, bbox_inches="tight")
