"""Tiny byte-level LM trained by 4 asynchronous workers on Ray: dense ASGD, one-way, or DGS.

  python -m esjax.distributed.main --config=experiments/dgs/tiny_lm.py:dgs --workdir=/tmp/dgs
  python -m esjax.distributed.main --config=experiments/dgs/tiny_lm.py:oneway --workdir=...
  python -m esjax.distributed.main --config=experiments/dgs/tiny_lm.py:dense --workdir=...

The argument is the mode, optionally followed by `,test` for a seconds-long CPU variant.
"""

import ml_collections

from esjax.models.presets import get_preset

MODES = ("dense", "oneway", "dgs")


def get_config(arg: str = "dgs") -> ml_collections.ConfigDict:
  mode, *opts = (arg or "dgs").split(",")
  if mode not in MODES or any(o != "test" for o in opts):
    raise ValueError(f"config arg {arg!r}: expected one of {MODES}, optionally ',test'")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = get_preset("tiny-llama").to_dict()

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # or a path to a text file (byte-level tokens)
  c.data.synthetic_bytes = 1_000_000
  c.data.seed = 0
  c.data.val_fraction = 0.05
  c.data.batch_size = 16
  c.data.seq_len = 64

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.optim.warmup_steps = 20
  c.optim.cosine = False
  c.optim.decay_steps = 0
  c.optim.final_lr_frac = 0.0

  c.dgs = ml_collections.ConfigDict()
  c.dgs.mode = mode
  c.dgs.ratio = 0.01  # uplink: entries sent per tensor (oneway, dgs)
  c.dgs.down_ratio = 0.01  # downlink: entries of the model difference sent per tensor (dgs)
  c.dgs.resync_every = 150  # dgs: dense resync every this many server updates (0: never)

  c.train = ml_collections.ConfigDict()
  c.train.num_workers = 4
  c.train.steps_per_worker = 300

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 50  # server updates between evaluations of the server's model
  c.eval.batches = 4

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True
  c.checkpoint.max_to_keep = 2

  c.ray = ml_collections.ConfigDict()
  c.ray.address = ml_collections.config_dict.placeholder(str)  # None: local Ray
  c.ray.num_cpus = 0  # local Ray only; 0: all of this machine's
  c.ray.ship_code = True  # cluster: send the esjax package to the nodes
  c.ray.cpus_per_worker = 1.0
  c.ray.cpus_per_server = 1.0
  # One XLA thread per process: N+1 JAX processes share this machine's cores.
  c.ray.worker_env = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1"}

  if "test" in opts:
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
    c.data.synthetic_bytes = 100_000
    c.data.batch_size, c.data.seq_len = 8, 32
    c.train.num_workers, c.train.steps_per_worker = 2, 30
    c.eval.every, c.eval.batches = 0, 2
    c.ray.cpus_per_worker = c.ray.cpus_per_server = 0.25
  return c
