# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Scale-Up: FPI vs AKI vs AKI-Pro vs stacking vs scratch
#
# AquilaMoE's 1.3B -> 7B study (its Table 1 and Fig. 3), at CPU size: a small dense model
# M(2 layers, d 32) is pretrained, grown to M(4, 64) (heads 4 -> 8 in 2 KV groups, FFN
# 96 -> 192) by each recipe, and trained on; a model of the large shape trained from random
# init on the same tokens is the baseline. Recipes (`esjax.transforms.growth.METHODS`):
# `fpi` = FPI + stacking, `fpi_interp` = FPI + interpolation, `aki` = AKI + stacking,
# `aki_pro` = AKI + interpolation (AquilaMoE's choice). We report the validation loss right
# after growth, and validation loss against tokens during continued training.
#
# Run headless: `python -m pytest -m slow tests/notebooks_test.py -k scaleup`.

# %%
import os
import tempfile

from experiments import study
from experiments.efficientscale import recipe

ROOT = os.environ.get("ESJAX_NOTEBOOK_ROOT") or tempfile.mkdtemp(prefix="scaleup_")
STEPS = 300  # continued training of each grown model
METHODS = ["fpi", "fpi_interp", "aki", "aki_pro"]
print("workdirs under", ROOT)

# %% [markdown]
# ## Pretrain the small dense model

# %%
dense = recipe.stage_config("dense", root=ROOT)
dense_summary = study.train(dense, os.path.join(ROOT, "dense"))
print("small dense: val loss", round(dense_summary["val_loss"], 4))

# %% [markdown]
# ## Grow with each recipe, and a from-scratch baseline of the large shape

# %%
configs = {}
for method in METHODS:
  configs[method] = recipe.stage_config("scaleup", root=ROOT, steps=STEPS, grow=method)
scratch = recipe.stage_config("scaleup", root=ROOT, steps=STEPS)
scratch.checkpoint.init_from = ""
scratch.optim.lr, scratch.optim.warmup_steps = dense.optim.lr, dense.optim.warmup_steps
configs["scratch"] = scratch

init_loss = {name: study.val_loss_at_init(c) for name, c in configs.items()}
print("val loss right after init:", {k: round(v, 4) for k, v in init_loss.items()})

# %%
final, curves = study.train_runs(configs, lambda name: os.path.join(ROOT, f"scaleup_{name}"))

# %%
study.plot_runs(curves, init_loss, os.path.join(ROOT, "scaleup.png"),
                "Scale-Up M(2, 32) -> M(4, 64)",
                "without the from-scratch run, after init",
                "tokens of continued training",
                zoomed=lambda name, t, v: (t, v) if name != "scratch" else None,
                baseline=(dense_summary["val_loss"], "small dense (source)"))

# %%
print(f"{'recipe':12s} {'val@init':>9s} {'val@end':>8s}")
for name in configs:
  print(f"{name:12s} {init_loss[name]:9.4f} {final[name]:8.4f}")
