"""A published model's shape (`esjax.models.presets`) with a GPU training setup for the cluster
it is laid out for.

  python -m esjax.plan --config=esjax/configs/presets.py:mixtral-8x7b --devices=64 --target=h100
  sbatch --nodes=8 launch/slurm/train.sbatch esjax/configs/presets.py:mixtral-8x7b /runs/mixtral \
      data.source=/data/prepared data.tokenizer=/data/tokenizer.json

Arg: a preset name (below, or any in `esjax.models.presets`), optionally `,steps=N`. bf16
compute with float32 master weights and Adam moments split over the data-parallel replicas
(ZeRO-1, `parallel.distributed_optimizer`), sequence length 4096, the global batch and the
parallel layout of `CLUSTERS` (dp fills the devices the other sizes leave; one sequence per
microbatch and data-parallel rank). `python -m esjax.plan` with the preset's device count
shows each fitting an 80 GB H100 with headroom (README, "Planning a cluster run").
"""

from esjax.configs import common
from esjax.models.presets import PRESETS

# tests/configs_test.py builds these (shapes only; tracing a 56-layer model costs ~10 s on
# CPU, so one MoE beside the default dense arg; every preset's shape is tested with the models).
TEST_ARGS = ("qwen2-57b-a14b",)

# preset -> (devices, global batch in sequences, parallel section, remat policy). The MoE
# presets recompute each layer in its backward (remat="full"): the pipeline stores what a
# unit's backward reads for every in-flight microbatch, and at remat="none" with exact EP
# buffers that is 98 GiB per device for Mixtral-8x7B (deviceless plan on H100). With
# remat="none" and ep_buffer_factor=1.25 all four fit at 1.03-1.11x the model's FLOPs
# (README, "Planning a cluster run"); the presets move there once a buffer factor is chosen
# from a real run's overflow (ep_overflow_fraction).
CLUSTERS = {
    "llama3-8b": (8, 256, dict(tp=2), "dots_except_mlp"),
    "llama3-8b-8e2": (64, 1024, dict(pp=4, tp=2, ep=8, etp=1), "full"),
    "mixtral-8x7b": (64, 1024, dict(pp=4, tp=2, ep=8, etp=1), "full"),
    # Megatron's published layouts (folding paper / NVIDIA's MoE model zoo): TP2 PP8 EP8 on 128
    # GPUs, batch 256 (virtual stages here keep the bubble at 3% instead of 1F1B's 18%), and
    # TP2 PP4 EP4 with 7 virtual stages on 64.
    "mixtral-8x22b": (128, 256, dict(pp=8, tp=2, ep=8, etp=1, schedule="interleaved",
                                     virtual_stages=7), "full"),
    "qwen2-57b-a14b": (64, 256, dict(pp=4, tp=2, ep=4, etp=1, schedule="interleaved",
                                     virtual_stages=7), "full"),
    "aquila-dense-7b": (8, 256, dict(tp=2), "dots_except_mlp"),
    # pp4 or pp2 x dp2 plan at the same FLOPs (1.19x): pp4 at 29.92 GiB and 49.7% MFU, pp2 at
    # 38.22 GiB and 50.2% (deviceless on H100); pp4 keeps the headroom.
    "aquila-dense-16b": (16, 256, dict(pp=4, tp=4), "dots_except_mlp"),
    "aquila-moe-8x16b": (64, 1024, dict(pp=4, tp=4, ep=8, etp=1), "full"),
}
SEQ_LEN = 4096


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, preset="llama3-8b", steps=100_000)
  if arg.preset not in PRESETS:
    raise ValueError(f"presets.py: preset {arg.preset!r}, expected one of {sorted(PRESETS)}")
  c = common.base_config()
  seq_len = min(SEQ_LEN, PRESETS[arg.preset].max_seq_len)
  # Presets without a cluster here: 4M tokens per batch over 8 devices, full remat.
  devices, batch, parallel, remat = CLUSTERS.get(
      arg.preset, (8, max(1, 4 * 1024 * 1024 // seq_len), {}, "full"))
  c.model = common.model_section(arg.preset, dtype="bfloat16", remat=remat)
  c.data.max_bytes = 0
  c.data.val_fraction = 0.001
  c.train.steps = arg.steps
  c.train.seq_len = seq_len
  c.train.batch_size = batch
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.spike_factor = 3.0
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 2000
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.parallel.update(parallel)
  c.parallel.distributed_optimizer = True
  model_parallel = c.parallel.pp * c.parallel.tp * c.parallel.cp
  c.parallel.microbatches = max(1, batch // (devices // model_parallel))
  return c
