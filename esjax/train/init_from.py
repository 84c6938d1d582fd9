"""Starting a run from another run's weights (`checkpoint.init_from`), without its optimizer
state: continued pretraining, and the hook where a checkpoint is converted while it loads.

The path: `checkpoint.restore_params` (an esjax run) or `interop.load.read_params` (a Hugging
Face folder, or a GGUF file dequantized into one first: `interop.gguf_file`) reads the
source's model config and params, `convert` turns them into
parameters of this run's model config (identity when the two configs have the same parameter
shapes), and `check_fit` refuses anything whose tree or shapes do not match the model, naming
the parameter.

`convert` is the one place for load-time conversions. `esjax.transforms` plugs in here: e.g.
a dense source checkpoint and an MoE target config are upcycled while loading (online
upcycling), a smaller source is grown. Its contract: pure function of
(source config, params, target config, experiment config), returning target params; it may
run under jit with the target's shardings.
"""

from __future__ import annotations

import tempfile
from typing import Any

import jax

from esjax.interop import gguf_file, load as hf_load
from esjax.models import params as params_lib
from esjax.models.config import ModelConfig
from esjax.parallel import rules, stages
from esjax.sharding.plan import ParallelPlan
from esjax.train import checkpoint
from esjax.transforms import online


def check_fit(params: Any, abstract_params: Any, source: str) -> None:
  """Raises ValueError naming the first parameter that is missing, extra or mis-shaped."""
  problem = params_lib.misfit(params, abstract_params)
  if problem:
    raise ValueError(f"checkpoint.init_from={source!r}: {problem}")


def convert(src_cfg: ModelConfig, params: Any, dst_cfg: ModelConfig, config: Any,
            shardings: Any = None) -> Any:
  """Load-time conversion hook (see module docstring). `shardings`: pure dict of the target
  parameters' shardings (None on one device). `esjax.transforms.online.convert`: identity when
  the shapes match, else growth (recipe `checkpoint.grow`) and/or upcycling (its output
  scale placed by `checkpoint.upcycle_scale`, a fraction `checkpoint.upcycle_drop` of each
  expert's hidden units re-initialized: drop-upcycling), built by one jit with the target
  shardings;
  `check_fit` verifies the result."""
  grow = config.checkpoint.get("grow", "aki_pro")
  scale = config.checkpoint.get("upcycle_scale", "down")
  drop = float(config.checkpoint.get("upcycle_drop", 0.0))
  return online.convert(src_cfg, params, dst_cfg, grow=grow, seed=config.train.seed,
                        shardings=shardings, scale_placement=scale, drop=drop)


def source_shardings(src_cfg: ModelConfig, plan: ParallelPlan) -> Any:
  """Shardings of a source checkpoint's parameters on this run's mesh, by this run's rules,
  so every device reads only its shards of it (a dimension the rule's axes do not divide,
  e.g. a smaller source's heads, is replicated instead)."""
  specs = rules.model_specs(plan, src_cfg)
  fitted = stages.map_dicts(lambda sp, a: rules.fit_to_shape(plan, sp, a.shape), specs,
                            params_lib.shapes(src_cfg))
  return rules.named(plan, fitted)


def load(config: Any, model_cfg: ModelConfig, plan: ParallelPlan) -> Any:
  """Parameters of the model's own tree for this run from `config.checkpoint.init_from` (an
  esjax run, a Hugging Face folder or a GGUF file), cast to the model's parameter dtypes and
  placed by the plan's model specs; the source is read sharded over the same mesh, tensor by
  tensor."""
  source = config.checkpoint.init_from
  if gguf_file.is_gguf(source):
    with tempfile.TemporaryDirectory(prefix="esjax_gguf_") as tmp:
      folder = gguf_file.to_hf_folder(source, tmp)
      src_cfg, params = hf_load.read_params(folder, lambda c: source_shardings(c, plan))
      jax.block_until_ready(params)  # read before the folder goes
  else:
    reader = hf_load.read_params if hf_load.is_hf_folder(source) else checkpoint.restore_params
    src_cfg, params = reader(source, lambda c: source_shardings(c, plan))
  abstract = params_lib.shapes(model_cfg)
  shardings = rules.named(plan, rules.model_specs(plan, model_cfg))
  try:
    params = convert(src_cfg, params, model_cfg, config, shardings)
  except ValueError as e:  # No conversion fits: say also which parameter differs.
    raise ValueError(f"checkpoint.init_from={source!r}: "
                     f"{params_lib.misfit(params, abstract)}; {e}") from None
  check_fit(params, abstract, source)
  return jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract)
