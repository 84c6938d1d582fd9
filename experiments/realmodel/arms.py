"""The arms of the real-model study (README.md beside this file): one pretrained dense model
(SmolLM2-135M-Instruct, converted from GGUF to a Hugging Face folder), six ways to spend the
same new tokens on it.

  dense       the dense model, continued
  upcycle     sparse upcycling: every MLP copied into 8 experts, top-2 (top-k then softmax)
  vgroup      virtual-group upcycling (He et al. 2024, NVIDIA): 64 experts of 1/8 of the MLP,
              top-8, so each token's active FLOPs are the dense model's
  drop        drop-upcycling (Nakamura et al. 2025): `upcycle` with half of each expert's
              hidden units re-initialized from its weights' statistics
  scratch     `upcycle`'s MoE from random init
  fpi         the dense model grown 1.5x wide with FPI (d_model 576 -> 864, d_ff 1536 -> 2304,
              9 -> 12 query heads), continued

`python -m esjax.main --config=experiments/realmodel/arms.py:arm=upcycle,root=/tmp/realmodel`
trains one arm in `<root>/<arm>`; `experiments.realmodel.run` runs them all.
"""

from __future__ import annotations

import os

import ml_collections

from esjax.configs import common

PRESET = "smollm2-135m"  # esjax.models.presets; run.py checks the converted folder against it
ARMS = ("dense", "upcycle", "vgroup", "drop", "scratch", "fpi")
# Every other MLP becomes an MoE (layers 1, 3, ..., 29), as sparse upcycling (Komatsuzaki et
# al. 2023) and V-MoE do; the blocked dropless path is the fast one on CPU.
MOE = dict(n_experts=8, top_k=2, first_k_dense=1, moe_every=2, aux_loss_coef=0.001,
           moe_impl="blocked", moe_block_size=128)
CHANGES = {
    "dense": {},
    "upcycle": MOE,
    "vgroup": dict(MOE, n_experts=64, top_k=8, d_ff_expert=192),
    "drop": MOE,
    "scratch": MOE,
    "fpi": dict(d_model=864, d_ff=2304, n_heads=12, head_dim=64),
}
# The budget (every arm): STEPS x BATCH sequences of SEQ_LEN tokens, one learning-rate
# schedule (continued pretraining: short warmup, cosine to 10%).
STEPS, BATCH, SEQ_LEN = 40, 4, 256
LR, WARMUP = 3e-4, 10


def hf_folder(root: str) -> str:
  return os.path.join(root, "hf")


def arm_config(arm: str, root: str, steps: int = 0) -> ml_collections.ConfigDict:
  if arm not in ARMS:
    raise ValueError(f"realmodel: arm={arm!r}, expected one of {ARMS}")
  c = common.base_config()
  c.model = common.model_section(PRESET, **CHANGES[arm])
  c.data.source = "stdlib"
  c.data.tokenizer = os.path.join(hf_folder(root), "tokenizer.json")
  c.train.steps = steps or STEPS
  c.train.batch_size = BATCH
  c.train.seq_len = SEQ_LEN
  c.train.seed = 0  # every arm sees the same batches
  c.train.log_every = 1
  c.train.eval_every = 10
  c.train.eval_batches = 4
  c.optim.lr = LR
  c.optim.warmup_steps = WARMUP
  c.checkpoint.every = 0
  c.checkpoint.keep = 1
  c.checkpoint.async_save = False
  c.checkpoint.init_from = "" if arm == "scratch" else hf_folder(root)
  c.checkpoint.grow = "fpi"
  c.checkpoint.upcycle_drop = 0.5 if arm == "drop" else 0.0
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arm=upcycle,root=/tmp/realmodel,steps=0` (steps 0: the study's budget)."""
  a = common.parse_arg(arg, arm="dense", root="/tmp/realmodel", steps=0)
  return arm_config(a.arm, a.root, a.steps)
