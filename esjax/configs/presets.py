"""A published model's shape (`esjax.models.presets`) with a GPU training setup.

  python -m esjax.main --config=esjax/configs/presets.py:mixtral-8x7b --workdir=DIR \
      --config.data.source='/data/corpus/*.txt' --config.data.tokenizer=/data/tokenizer.model \
      --config.parallel.tp=8 --config.parallel.ep=8 --config.parallel.fsdp=True

Arg: a preset name (`llama3-8b`, `mixtral-8x7b`, `mixtral-8x22b`, `qwen2-57b-a14b`,
`aquila-dense-7b`, `aquila-dense-16b`, `aquila-moe-8x16b`, or a tiny one), optionally
`,steps=N`. bf16 compute with float32 parameters and optimizer state, full remat, sequence
length 4096, 4M tokens per batch. The mesh (`parallel.*`) is left to the command line.
"""

from esjax.configs import common
from esjax.models.presets import PRESETS

# tests/configs_test.py builds these (shapes only; tracing a 56-layer model costs ~10 s on
# CPU, so one MoE beside the default dense arg; every preset's shape is tested with the models).
TEST_ARGS = ("qwen2-57b-a14b",)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, preset="llama3-8b", steps=100_000)
  if arg.preset not in PRESETS:
    raise ValueError(f"presets.py: preset {arg.preset!r}, expected one of {sorted(PRESETS)}")
  c = common.base_config()
  seq_len = min(4096, PRESETS[arg.preset].max_seq_len)
  c.model = common.model_section(arg.preset, dtype="bfloat16", remat="full")
  c.data.max_bytes = 0
  c.data.val_fraction = 0.001
  c.train.steps = arg.steps
  c.train.seq_len = seq_len
  c.train.batch_size = max(1, 4 * 1024 * 1024 // seq_len)
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.spike_factor = 3.0
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 2000
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  return c
