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

from experiments import study
from experiments.efficientscale import recipe

ROOT = os.environ.get("ESJAX_NOTEBOOK_ROOT") or tempfile.mkdtemp(prefix="scaleout_")
STEPS = 300  # new tokens: STEPS * batch * seq_len
print("workdirs under", ROOT)

# %% [markdown]
# ## The dense source: pretrain small, grow (AKI-Pro), train on

# %%
for stage in ("dense", "scaleup"):
  summary = study.train(recipe.stage_config(stage, root=ROOT), os.path.join(ROOT, stage))
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

init_loss = {name: study.val_loss_at_init(c) for name, c in configs.items()}
print("val loss right after init:", {k: round(v, 4) for k, v in init_loss.items()})
assert abs(init_loss["upcycled"] - init_loss["dense"]) < 1e-4  # function preserving

# %%
final, curves = study.train_runs(configs, lambda name: os.path.join(ROOT, f"cont_{name}"))

# %%
study.plot_runs(curves, init_loss, os.path.join(ROOT, "scaleout.png"),
                "Scale-Out: M(4, 64) dense -> 8 experts, top-2",
                "without the from-scratch run, after init",
                "new tokens",
                zoomed=lambda name, t, v: (t, v) if name != "moe_scratch" else None)

# %%
print(f"{'run':12s} {'val@init':>9s} {'val@end':>8s}")
for name in configs:
  print(f"{name:12s} {init_loss[name]:9.4f} {final[name]:8.4f}")
