"""The sections every experiment config has, with their defaults, and how `model` becomes a
typed `ModelConfig`.

An experiment file builds on `base_config()` and changes what it needs:

- `model`: `preset` (a name from `esjax.models.presets`, '' for the ModelConfig defaults)
  and every `ModelConfig` field as a typed placeholder: a field left at None takes the
  preset's value, a field set (in the file or with `--config.model.d_model=128`) overrides
  it. `model_config(config)` applies that rule.
- `data`: `source` (a prepared directory, raw text: 'stdlib' or files / directories /
  globs, comma-separated, or a blend '0.7:dirA,0.3:dirB'; esjax/data/dataset.py),
  `tokenizer` ('byte', or a SentencePiece .model / tokenizers .json path), `max_bytes` (cap
  on the raw text read, 0: none), `val_fraction` (every 1/val_fraction-th document held out).
- `optim`: AdamW with linear warmup then cosine (or constant) decay, global-norm clipping.
- `train`: `steps`, `batch_size`, `seq_len`, `seed`, `log_every`, `eval_every`,
  `eval_batches`, and the collapse guard (`spike_factor`, `spike_window`).
- `checkpoint`: `every`, `keep`, `init_from` (another run's workdir or checkpoint, or a
  Hugging Face folder: its weights, without optimizer state, start this run; a smaller
  dense source is grown with the recipe `grow`, a dense source of an MoE run is upcycled:
  esjax.transforms.online, with its output scale placed by `upcycle_scale`),
  `async_save`.
- `parallel`: the mesh sizes (`dp`, `tp`, `cp`, `pp`, `ep`, `etp`; dp=0 fills the devices),
  `fsdp` / `distributed_optimizer` (ZeRO-3 / ZeRO-1), `microbatches`, the pipeline
  `schedule` and `virtual_stages`, the CP attention (`cp_impl`, `cp_load_balance`) and the
  EP exchange (`ep_dispatch`): `esjax.sharding.layout.Layout`.
- `eval`: benchmark tasks scored every `every` steps while training (`tasks`, `limit`,
  `num_fewshot`, `batch_size`); their metrics go to metrics.jsonl as `eval/<task>/<metric>`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from esjax.models.config import ModelConfig
from esjax.models.presets import get_preset

# ModelConfig field annotations -> placeholder types ("bool | None": None means the
# preset's value here, which for `renormalize` may itself be None, the rule by score_fn).
_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "bool | None": bool}


def model_section(preset: str = "", **fields: Any) -> ml_collections.ConfigDict:
  """`model` section: a preset name plus every ModelConfig field (None: from the preset)."""
  section = ml_collections.ConfigDict()
  section.preset = preset
  for f in dataclasses.fields(ModelConfig):
    section[f.name] = config_dict.placeholder(_FIELD_TYPES[str(f.type)])
  for name, value in fields.items():
    if name not in section:
      raise ValueError(f"model_section: unknown ModelConfig field {name!r}")
    section[name] = value
  return section


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The typed ModelConfig of an experiment config: preset (or defaults) + set fields."""
  section = config.model
  overrides = {k: v for k, v in section.items() if k != "preset" and v is not None}
  base = get_preset(section.preset) if section.preset else ModelConfig()
  cfg = base.replace(**overrides)
  tp = config.parallel.tp if "parallel" in config else 1
  if cfg.padded_vocab % tp and section.get("vocab_multiple") is None:
    # Megatron pads the vocabulary to a multiple of 128 x tp; lcm(128, tp) is the same for
    # every power-of-two tp up to 128, so the checkpoint's shapes outlive a change of tp.
    cfg = cfg.replace(vocab_multiple=math.lcm(128, tp))
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every section; an experiment file changes what it needs."""
  c = ml_collections.ConfigDict()
  c.model = model_section()

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"
  c.data.tokenizer = "byte"
  c.data.max_bytes = 4_000_000
  c.data.val_fraction = 0.02

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.schedule = "cosine"  # or "constant" (after warmup)
  c.optim.warmup_steps = 100
  c.optim.final_lr_fraction = 0.1  # cosine ends at lr * final_lr_fraction
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1  # decoupled (AdamW), matrices only; norms are not decayed
  c.optim.grad_clip = 1.0  # global norm; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.seed = 0
  c.train.log_every = 10
  c.train.eval_every = 100  # 0: no validation
  c.train.eval_batches = 8
  c.train.spike_factor = 0.0  # > 0: stop when loss > factor * running mean of recent losses
  c.train.spike_window = 50

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500  # 0: only at the end
  c.checkpoint.keep = 3
  c.checkpoint.init_from = ""
  c.checkpoint.grow = "aki_pro"  # init_from a smaller dense model: esjax.transforms.growth.METHODS
  # init_from a dense model into an MoE: where the upcycling output scale s goes, "down" (all
  # on w_down: exact) or "balanced" (s^(1/3) on gate, up and down: Megatron's rule).
  c.checkpoint.upcycle_scale = "down"
  # ... and drop-upcycling: the fraction of each expert's hidden units re-initialized from
  # the replaced weights' statistics, a different set per expert (0: sparse upcycling).
  c.checkpoint.upcycle_drop = 0.0
  c.checkpoint.async_save = True

  c.parallel = ml_collections.ConfigDict()
  c.parallel.dp = 0  # 0: every device the other sizes leave
  for axis in ("tp", "cp", "pp", "ep", "etp"):
    c.parallel[axis] = 1  # etp=0: etp = tp (Megatron's default)
  c.parallel.fsdp = False  # ZeRO-3: weights split over the data axes, gathered per use
  c.parallel.distributed_optimizer = False  # ZeRO-1: master weights and moments split
  c.parallel.microbatches = 1
  c.parallel.schedule = "1f1b"  # pipeline schedule (pp > 1): gpipe, 1f1b, interleaved
  c.parallel.virtual_stages = 1  # model chunks per pipeline stage (interleaved)
  c.parallel.cp_impl = "allgather"  # or "ring" (esjax/models/context_parallel.py)
  c.parallel.cp_load_balance = True
  c.parallel.ep_dispatch = "auto"  # EP exchange: padded all_to_all, ragged_all_to_all

  c.eval = ml_collections.ConfigDict()  # benchmark tasks during training (esjax/eval/hook.py)
  c.eval.tasks = ""  # comma-separated task folders / groups (esjax/eval/README.md); '': off
  c.eval.every = 1000  # steps between task evaluations (and at the last step)
  c.eval.limit = 0  # > 0: score only the first items of each task
  c.eval.num_fewshot = -1  # >= 0 overrides every task's n-shot
  c.eval.batch_size = 8
  return c


# (field, test, what it must be): the ranges of the base sections' fields, checked before a
# run writes anything. A NaN fails every test (comparisons with NaN are false).
_RANGES = (
    ("optim.lr", lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.final_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: 0 < v < float("inf"), "a finite number > 0"),
    ("optim.weight_decay", lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    ("optim.grad_clip", lambda v: 0 <= v < float("inf"), "a finite number >= 0 (0: off)"),
    ("data.max_bytes", lambda v: v >= 0, ">= 0 (0: no cap)"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.steps", lambda v: v > 0, "> 0"),
    ("train.batch_size", lambda v: v > 0, "> 0"),
    ("train.seq_len", lambda v: v > 0, "> 0"),
    ("train.seed", lambda v: -1 << 63 <= v < 1 << 63, "a 64-bit signed integer"),
    ("train.log_every", lambda v: v > 0, "> 0"),
    ("train.eval_every", lambda v: v >= 0, ">= 0 (0: no validation)"),
    ("train.eval_batches", lambda v: v >= 0, ">= 0"),
    ("train.spike_factor", lambda v: v == 0 or 1 < v < float("inf"), "0 (off) or > 1"),
    ("train.spike_window", lambda v: v > 0, "> 0"),
    ("checkpoint.every", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("checkpoint.keep", lambda v: v >= 0, ">= 0 (0: keep all)"),
    ("checkpoint.upcycle_drop", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("eval.every", lambda v: v > 0, "> 0"),
    ("eval.limit", lambda v: v >= 0, ">= 0 (0: every item)"),
    ("eval.batch_size", lambda v: v > 0, "> 0"),
)


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError naming the first base-section field out of its range
  (a section or field an experiment config dropped is not checked). The `parallel` section
  is checked where it is read, by `esjax.sharding.layout.Layout.resolve`."""
  for name, ok, expected in _RANGES:
    section, field = name.split(".")
    if section not in config or field not in config[section]:
      continue
    value = config[section][field]
    if not ok(value):
      raise ValueError(f"{name}={value!r}, expected {expected}")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`"moe"` or `"variant=moe,steps=50"` -> ConfigDict over `defaults` (big_vision style).

  A bare word sets the first default; values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  first = next(iter(defaults))
  for part in arg.split(","):
    key, sep, value = part.partition("=")
    if not sep:
      key, value = first, part
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config arg {part!r}: unknown key {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      value = value.strip().lower() in ("1", "true", "yes")
    out[key] = kind(value)
  return out
