"""The CPU default: a tiny model trained on the default corpus (the Python standard
library's sources, byte-level) in a few minutes on a laptop CPU.

  python -m esjax.main --config=esjax/configs/tiny.py --workdir=/tmp/esjax_tiny
  python -m esjax.main --config=esjax/configs/tiny.py:dense --workdir=/tmp/esjax_tiny_dense

Variants (`tiny.py:ARG`): `moe` (default; tiny-mixtral: 8 experts, top-2), `dense`
(tiny-llama, the same attention and width), `qwen2` (tiny-qwen2-moe: fine-grained and
shared experts), `deepseek` (tiny-deepseek-v3: sigmoid routing balanced by an expert bias
instead of an auxiliary loss, group-limited). `tiny.py:moe,steps=50` also sets the number of steps.
"""

from esjax.configs import common

VARIANTS = {"moe": "tiny-mixtral", "dense": "tiny-llama", "qwen2": "tiny-qwen2-moe",
            "deepseek": "tiny-deepseek-v3"}
TEST_ARGS = tuple(VARIANTS)  # tests/configs_test.py builds each variant


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, variant="moe", steps=600)
  if arg.variant not in VARIANTS:
    raise ValueError(f"tiny.py: variant {arg.variant!r}, expected one of {sorted(VARIANTS)}")
  c = common.base_config()
  c.model = common.model_section(VARIANTS[arg.variant], max_seq_len=128)
  c.train.steps = arg.steps
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.checkpoint.every = 200
  return c
