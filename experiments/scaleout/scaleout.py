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
# # Scale-Out: upcycled MoE vs dense continued training vs MoE from scratch
#
# Sparse upcycling (Komatsuzaki et al.; AquilaMoE's Scale-Out) at CPU size. The dense model
# is the EfficientScale Scale-Up result: M(2, 32) pretrained, grown with AKI-Pro to M(4, 64)
# and trained on. From it, on the same number of new tokens:
# - `upcycled`: every MLP copied into 8 experts, top-2 (top-k then softmax), random router,
#   load balancing 0.001, max-z 0.01 (the `scaleout` stage);
# - `dense`: the dense model trained on with the same schedule;
# - `moe_scratch`: the same MoE from random init.
#
# Upcycling with top-k then softmax is function preserving, so the upcycled model starts at
# exactly the dense model's validation loss.
#
# Run headless: `python -m pytest -m slow tests/notebooks_test.py -k scaleout`.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
from matplotlib import ticker

from experiments.efficientscale import recipe

ROOT = os.environ.get("ESJAX_NOTEBOOK_ROOT") or tempfile.mkdtemp(prefix="scaleout_")
STEPS = 300  # new tokens: STEPS * batch * seq_len
print("workdirs under", ROOT)

# %% [markdown]
# ## The dense source: pretrain small, grow (AKI-Pro), train on

# %%
for stage in ("dense", "scaleup"):
  summary = recipe.train(recipe.stage_config(stage, root=ROOT), os.path.join(ROOT, stage))
  print(stage, "val loss", round(summary["val_loss"], 4))

# %% [markdown]
# ## Three continuations on the same tokens

# %%
upcycled = recipe.stage_config("scaleout", root=ROOT, steps=STEPS)
dense = recipe.stage_config("scaleup", root=ROOT, steps=STEPS)
dense.checkpoint.init_from = os.path.join(ROOT, "scaleup")  # same shapes: plain init_from
dense.train.seed = upcycled.train.seed  # the same batches as the upcycled run
dense.optim.lr, dense.optim.warmup_steps = upcycled.optim.lr, upcycled.optim.warmup_steps
scratch = recipe.stage_config("scratch", root=ROOT, steps=STEPS)
scratch.train.seed = upcycled.train.seed
configs = {"upcycled": upcycled, "dense": dense, "moe_scratch": scratch}

init_loss = {name: recipe.val_loss_at_init(c) for name, c in configs.items()}
print("val loss right after init:", {k: round(v, 4) for k, v in init_loss.items()})
assert abs(init_loss["upcycled"] - init_loss["dense"]) < 1e-4  # function preserving

# %%
final = {}
for name, config in configs.items():
  final[name] = recipe.train(config, os.path.join(ROOT, f"cont_{name}"))["val_loss"]

# %%
fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4))
for name, config in configs.items():
  tokens, val = recipe.val_curve(os.path.join(ROOT, f"cont_{name}"), config)
  ax.plot([0] + tokens, [init_loss[name]] + val, marker="o", ms=3, label=name)
  if name != "moe_scratch":
    zoom.plot(tokens, val, marker="o", ms=3, label=name)
for a in (ax, zoom):
  a.xaxis.set_major_formatter(ticker.EngFormatter())
  a.set_xlabel("new tokens")
  a.set_ylabel("validation loss")
  a.legend()
ax.set_title("Scale-Out: M(4, 64) dense -> 8 experts, top-2")
zoom.set_title("without the from-scratch run, after init")
fig.savefig(os.path.join(ROOT, "scaleout.png"), dpi=120, bbox_inches="tight")

# %%
print(f"{'run':12s} {'val@init':>9s} {'val@end':>8s}")
for name in configs:
  print(f"{name:12s} {init_loss[name]:9.4f} {final[name]:8.4f}")
