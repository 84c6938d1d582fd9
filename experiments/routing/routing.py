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
# # Routing order and granularity of upcycled MoEs
#
# NVIDIA's upcycling ablations (He et al., arXiv 2410.07524) at CPU size, from the same dense
# model M(4, 64) (pretrained small, grown with AKI-Pro, trained on). Notation E{e}G{g}T{t}:
# e = expansion (experts / g), g = granularity (dense FFN / expert FFN), t = top-k; all runs
# activate the FFN width of two dense MLPs per token (iso-FLOP).
# - `E8G1T2 topk-softmax`: Mixtral order, exact at init for any router.
# - `E8G1T2 softmax-topk`: Switch order, weights scaled by E*G^2/T = 4 (on w_down), exact at
#   init only for equal router logits, so it starts above the dense loss.
# - `E8G2T4`, `E16G2T4`: virtual-group (granular) upcycling, 16 / 32 experts of half the FFN,
#   router columns tied in pairs, top-k then softmax: exact at init.
#
# Run headless: `python -m pytest -m slow tests/notebooks_test.py -k routing`.

# %%
import os
import tempfile

from experiments import study
from experiments.efficientscale import recipe

ROOT = os.environ.get("ESJAX_NOTEBOOK_ROOT") or tempfile.mkdtemp(prefix="routing_")
STEPS = 300
print("workdirs under", ROOT)

# %%
for stage in ("dense", "scaleup"):
  summary = study.train(recipe.stage_config(stage, root=ROOT), os.path.join(ROOT, stage))
  print(stage, "val loss", round(summary["val_loss"], 4))
d_ff = recipe.stage_config("scaleup").model.d_ff

# %%
VARIANTS = {  # n_experts, granularity, top_k, routing order
    "E8G1T2 topk-softmax": (8, 1, 2, "topk_softmax"),
    "E8G1T2 softmax-topk": (8, 1, 2, "softmax_topk"),
    "E8G2T4": (16, 2, 4, "topk_softmax"),
    "E16G2T4": (32, 2, 4, "topk_softmax"),
}
configs = {}
for name, (n, g, k, order) in VARIANTS.items():
  c = recipe.stage_config("scaleout", root=ROOT, steps=STEPS)
  c.model.n_experts, c.model.top_k, c.model.routing_order = n, k, order
  c.model.d_ff_expert = d_ff // g
  configs[name] = c

init_loss = {name: study.val_loss_at_init(c) for name, c in configs.items()}
print("val loss right after upcycling:", {k: round(v, 4) for k, v in init_loss.items()})
for name in ("E8G2T4", "E16G2T4"):  # virtual groups with top-k then softmax: exact
  assert abs(init_loss[name] - init_loss["E8G1T2 topk-softmax"]) < 1e-4

# %%
final, curves = study.train_runs(configs,
                                lambda name: os.path.join(ROOT, name.replace(" ", "_")))

# %%
study.plot_runs(curves, init_loss, os.path.join(ROOT, "routing.png"),
                "Upcycled M(4, 64): routing order and granularity",
                "last three evaluations",
                "tokens after upcycling",
                zoomed=lambda name, t, v: (t[-3:], v[-3:]))

# %%
print(f"{'variant':22s} {'val@init':>9s} {'val@end':>8s}")
for name in configs:
  print(f"{name:22s} {init_loss[name]:9.4f} {final[name]:8.4f}")
