"""The EfficientScale recipe (AquilaMoE, arXiv 2408.06567): shapes, token budgets and learning
rates of each stage, at a CPU size (`tiny`) and at the paper's (`aquila`).

Stages, each starting from the previous one's checkpoint with `checkpoint.init_from`:
  dense     pretrain a small dense model
  scaleup   grow it (AKI-Pro: AKI width + interpolated depth) and continue pretraining
  scaleout  upcycle it into an MoE (8 experts, top-2, load balancing 0.001, max-z 0.01)
            and continue pretraining
  scratch   the same MoE from random init, on as many tokens as the three stages together

The conversion happens while loading (`esjax.transforms.online`): the stage's model config
says what to build and `checkpoint.grow` names the growth recipe. Workdirs are
`<root>/<stage>`; the per-stage files (dense.py, ...) are what `esjax.main` loads.
"""

from __future__ import annotations

import os

import ml_collections

from esjax.configs import common

STAGES = ("dense", "scaleup", "scaleout", "scratch")
PREVIOUS = {"scaleup": "dense", "scaleout": "scaleup"}

# Model shapes. `big` is reached from `small` by growth; `moe` adds experts to `big`.
SHAPES = {
    "tiny": {
        "small": dict(preset="tiny-llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=96, max_seq_len=64),
        "big": dict(preset="tiny-llama", d_model=64, n_layers=4, n_heads=8, n_kv_heads=2,
                    head_dim=8, d_ff=192, max_seq_len=64),
    },
    # Paper Table 3 with methods.md 3.5's choices (KV groups 8, FFN 20480): 7B -> 16B -> 8x16B.
    "aquila": {
        "small": dict(preset="aquila-dense-7b"),
        "big": dict(preset="aquila-dense-16b"),
    },
}
MOE = dict(n_experts=8, top_k=2, aux_loss_coef=0.001, max_z_loss_coef=0.01)

# Steps, batch (sequences), sequence length, peak learning rate per stage. The paper's peak
# LRs are 1.2e-3, 4e-4, 1.5e-4 with 12M/12M/24M-token batches; tiny keeps their order.
BUDGET = {
    "tiny": dict(batch_size=dict(dense=8, scaleup=8, scaleout=8, scratch=8), seq_len=64,
                 steps=dict(dense=400, scaleup=300, scaleout=300),
                 lr=dict(dense=3e-3, scaleup=1.5e-3, scaleout=1e-3, scratch=3e-3),
                 warmup=dict(dense=40, scaleup=10, scaleout=10, scratch=40), eval_every=50),
    "aquila": dict(batch_size=dict(dense=2930, scaleup=2930, scaleout=5860, scratch=5860),
                   seq_len=4096,
                   steps=dict(dense=300_000, scaleup=100_000, scaleout=22_700),
                   lr=dict(dense=1.2e-3, scaleup=4e-4, scaleout=1.5e-4, scratch=1.5e-4),
                   warmup=dict(dense=2000, scaleup=1000, scaleout=1000, scratch=2000),
                   eval_every=1000),
}


def model_fields(size: str, stage: str) -> dict:
  shapes = SHAPES[size]
  if stage == "dense":
    return dict(shapes["small"])
  fields = dict(shapes["big"])
  if stage in ("scaleout", "scratch"):
    fields.update(MOE)
    if size == "tiny":
      fields.update(moe_impl="blocked", moe_block_size=32)  # the fast dropless path on CPU
  return fields


def stage_steps(size: str, stage: str) -> int:
  """The stage's steps; scratch: as many tokens as the three stages together."""
  b = BUDGET[size]
  if stage != "scratch":
    return b["steps"][stage]
  tokens = sum(n * b["batch_size"][s] for s, n in b["steps"].items())
  return -(-tokens // b["batch_size"]["scratch"])


def stage_config(stage: str, size: str = "tiny", root: str = "/tmp/efficientscale",
                 steps: int = 0, grow: str = "aki_pro") -> ml_collections.ConfigDict:
  """The experiment config of one stage; `steps` > 0 overrides the budget."""
  if stage not in STAGES:
    raise ValueError(f"efficientscale: stage={stage!r}, expected one of {STAGES}")
  if size not in SHAPES:
    raise ValueError(f"efficientscale: size={size!r}, expected one of {sorted(SHAPES)}")
  b = BUDGET[size]
  c = common.base_config()
  fields = model_fields(size, stage)
  c.model = common.model_section(fields.pop("preset"), **fields)
  c.train.steps = steps or stage_steps(size, stage)
  c.train.batch_size = b["batch_size"][stage]
  c.train.seq_len = b["seq_len"]
  c.train.seed = STAGES.index(stage)  # a fresh data order per stage
  c.train.log_every = 10
  c.train.eval_every = b["eval_every"]
  c.train.eval_batches = 4
  c.optim.lr = b["lr"][stage]
  c.optim.warmup_steps = b["warmup"][stage]
  c.checkpoint.every = 0
  c.checkpoint.keep = 1
  c.checkpoint.async_save = False
  c.checkpoint.init_from = os.path.join(root, PREVIOUS[stage]) if stage in PREVIOUS else ""
  c.checkpoint.grow = grow
  return c


def get_config_for(stage: str, arg: str | None) -> ml_collections.ConfigDict:
  """`get_config` of the per-stage files: arg `size=tiny,root=/tmp/efficientscale,steps=0`."""
  a = common.parse_arg(arg, size="tiny", root="/tmp/efficientscale", steps=0, grow="aki_pro")
  return stage_config(stage, a.size, a.root, a.steps, a.grow)
