"""Tiny byte-level LM (tiny-llama) trained by 4 asynchronous workers on local Ray, on the
default corpus: dense ASGD, one-way sparsification, or DGS (dual-way, SAMomentum).

  python -m esjax.distributed.main --config=experiments/dgs/tiny_lm.py:dgs --workdir=/tmp/dgs
  python -m esjax.distributed.main --config=experiments/dgs/tiny_lm.py:oneway --workdir=...
  python -m esjax.distributed.main --config=experiments/dgs/tiny_lm.py:dense --workdir=...

Arg: `MODE[,test=1][,steps=N]`. `test=1` is a seconds-long variant (2 workers, a smaller model
and corpus) used by the tests. `--config.ray.address=auto` joins a running Ray cluster.
"""

import ml_collections

from esjax.configs import common

MODES = ("dense", "oneway", "dgs")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, mode="dgs", test=False, steps=500)
  if arg.mode not in MODES:
    raise ValueError(f"tiny_lm.py: mode {arg.mode!r}, expected one of {MODES}")
  c = ml_collections.ConfigDict()
  c.model = common.model_section("tiny-llama", max_seq_len=128)

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"
  c.data.tokenizer = "byte"
  c.data.max_bytes = 4_000_000
  c.data.val_fraction = 0.02

  # Worker optimizer: SGD with heavy-ball momentum (dense) or SAMomentum (oneway, dgs).
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.02
  c.optim.momentum = 0.9
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0  # global norm of each worker's gradient; 0 disables
  c.optim.warmup_steps = 20  # per worker
  c.optim.schedule = "constant"  # or "cosine" (after warmup)
  c.optim.decay_steps = 0  # cosine: per-worker steps to decay over; 0: steps_per_worker
  c.optim.final_lr_fraction = 0.0

  c.dgs = ml_collections.ConfigDict()
  c.dgs.mode = arg.mode
  c.dgs.ratio = 0.01  # uplink: entries sent per tensor at the peak lr (oneway, dgs)
  c.dgs.ratio_follows_lr = True  # uplink density ratio * lr / optim.lr (the authors' worker)
  c.dgs.down_ratio = 0.01  # downlink: entries of the model difference sent per tensor (dgs)
  c.dgs.resync_every = 150  # dgs: dense resync every this many server updates (0: never)
  c.dgs.resync = "snapshot"  # the snapshot, accumulator zeroed (authors); "current": fresher

  c.train = ml_collections.ConfigDict()
  c.train.num_workers = 4
  c.train.steps_per_worker = arg.steps
  c.train.batch_size = 16  # per worker
  c.train.seq_len = 64
  c.train.seed = 0
  c.train.eval_every = 50  # server updates between evaluations of the server's model
  c.train.eval_batches = 4

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True  # the server model at every evaluation; resumed from workdir
  c.checkpoint.keep = 2

  c.ray = ml_collections.ConfigDict()
  c.ray.address = ml_collections.config_dict.placeholder(str)  # None: a local Ray instance
  c.ray.num_cpus = 0  # local Ray only; 0: this machine's cores (at least one per actor)
  c.ray.ship_code = True  # cluster: send the esjax package to the nodes
  c.ray.cpus_per_worker = 1.0
  c.ray.cpus_per_server = 1.0
  # One XLA thread per process: N + 1 JAX processes share this machine's cores.
  c.ray.worker_env = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1"}

  if arg.test:
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
    c.data.max_bytes = 300_000
    c.data.val_fraction = 0.05
    c.train.batch_size, c.train.seq_len = 8, 32
    c.train.num_workers, c.train.steps_per_worker = 2, 30
    c.train.eval_every, c.train.eval_batches = 0, 2
    c.optim.lr = 0.05
    c.ray.cpus_per_worker = c.ray.cpus_per_server = 0.25
  return c
