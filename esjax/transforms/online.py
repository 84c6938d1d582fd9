"""Load-time conversion of a checkpoint into this run's model (`checkpoint.init_from`):
identity, growth, upcycling, or growth then upcycling, decided by the two configs.

- Same parameter shapes: the checkpoint is used as is (continued pretraining).
- Dense source, dense larger target: grown with the `grow` recipe (growth.METHODS).
- Dense source, MoE target: upcycled (online upcycling); if the target's dense shape is
  larger, grown first to `target.replace(n_experts=0)`.

The conversion runs as one jit whose output shardings are the target's, so each device
computes only its own shards of the target and the target never exists whole on one device.
"""

from __future__ import annotations

from typing import Any

import jax

from esjax.models import params as params_lib
from esjax.models.config import ModelConfig
from esjax.transforms import build, growth, upcycle

Params = dict[str, Any]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params_lib.shapes(cfg))
  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}


def plan(src: ModelConfig, dst: ModelConfig) -> tuple[str, ...]:
  """The steps that turn a `src` checkpoint into `dst` parameters: () when shapes match, else
  a subsequence of ("grow", "upcycle"). Raises ValueError for an impossible conversion."""
  if _shapes(src) == _shapes(dst):
    return ()
  if src.is_moe:
    raise ValueError(f"init_from: an MoE checkpoint (n_experts={src.n_experts}) converts only to "
                     "the same parameter shapes; growth and upcycling start from a dense one")
  dense_dst = dst.replace(n_experts=0) if dst.is_moe else dst
  steps = () if _shapes(src) == _shapes(dense_dst) else ("grow",)
  return steps + (("upcycle",) if dst.is_moe else ())


def convert(src: ModelConfig, params: Params, dst: ModelConfig, *, grow: str = "aki_pro",
            seed: int = 0, shardings: Any = None, zero_new_layers: bool = False,
            scale_placement: str = "down", drop: float = 0.0) -> Params:
  """`dst` parameters from a `src` checkpoint's `params` (see module docstring).

  `shardings`: pure dict of the target parameters' shardings (None: default device).
  `scale_placement`: where upcycling puts the output scale, `upcycle.SCALE_PLACEMENTS`;
  `drop`: drop-upcycling's re-initialized fraction of each expert's hidden units.
  """
  if scale_placement not in upcycle.SCALE_PLACEMENTS:
    raise ValueError(f"upcycle scale_placement={scale_placement!r}, expected one of "
                     f"{upcycle.SCALE_PLACEMENTS}")
  steps = plan(src, dst)
  if not steps:
    return params
  if "grow" in steps:
    dense_dst = dst.replace(n_experts=0) if dst.is_moe else dst
    width, depth = growth.resolve_method(grow)
    maps = growth.width_maps(src, dense_dst)
  key = jax.random.key(seed)

  def fn(p, k):
    cfg = src
    if "grow" in steps:
      p = growth.grow_params(cfg, p, dense_dst, width=width, depth=depth, maps=maps,
                             zero_new_layers=zero_new_layers)
      cfg = dense_dst
    if "upcycle" in steps:
      p = upcycle.upcycle_params(cfg, p, dst, k, scale_placement=scale_placement, drop=drop)
    return p

  return build.jit_transform(dst, fn, shardings)(params, key)
