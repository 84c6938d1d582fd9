"""The train state's parameter layout: decoder layers stacked by pipeline stage.

The model's own tree (`nnx.to_pure_dict` of a `Transformer`, "canonical": `layers.{i}`) is
what growth, upcycling, evaluation and Hugging Face interop read and write. The train state
holds the same arrays stacked so each pipeline stage owns its layers (weights and optimizer
state resident on the stage, never moved) and a chunk's layers run as one `lax.scan`:

  {"embed", "final_norm", "lm_head", "stages": {p: block tree with leaves [pp, v, R, ...]}}

The model is cut into pp * v chunks of c = L / (pp * v) layers; stage s holds chunks
q = r * pp + s (r < v); inside a chunk the layers repeat a pattern of `period` layer kinds
(dense or MoE) R = c / period times. Leaf [s, r, j] of slot p is layer
(r * pp + s) * c + j * period + p. One device (pp = v = 1) is the same layout with a single
stage: a scan over all layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from esjax.models.config import ModelConfig

STAGES = "stages"
LAYERS = "layers"  # the model's own tree: {"layers": {i: block tree}, "embed", ...}


@dataclasses.dataclass(frozen=True)
class StageFormat:
  """How `stack` lays out the layers of a model for `pp` stages of `virtual` chunks each."""

  n_layers: int
  pp: int = 1
  virtual: int = 1
  period: int = 1

  @classmethod
  def of(cls, cfg: ModelConfig, pp: int = 1, virtual: int = 1) -> "StageFormat":
    """The format of `cfg`'s layers: the shortest repeating pattern of layer kinds within a
    chunk (all chunks must share it; `esjax.sharding.layout.check_model` says so)."""
    chunks = pp * virtual
    if cfg.n_layers % chunks:
      raise ValueError(f"n_layers={cfg.n_layers} is not divisible by pp*virtual_stages = "
                       f"{pp}*{virtual}")
    c = cfg.n_layers // chunks
    kinds = [[cfg.is_moe_layer(q * c + j) for j in range(c)] for q in range(chunks)]
    if any(k != kinds[0] for k in kinds):
      raise ValueError(f"pipeline chunks must hold the same layer kinds; MoE pattern per "
                       f"chunk {kinds}")
    period = next(p for p in range(1, c + 1)
                  if c % p == 0 and all(kinds[0][j] == kinds[0][j % p] for j in range(c)))
    return cls(cfg.n_layers, pp, virtual, period)

  @property
  def chunk_layers(self) -> int:
    return self.n_layers // (self.pp * self.virtual)

  @property
  def repeats(self) -> int:
    return self.chunk_layers // self.period

  def layer(self, stage: int, rnd: int, rep: int, slot: int) -> int:
    return (rnd * self.pp + stage) * self.chunk_layers + rep * self.period + slot

  def layer_index(self) -> np.ndarray:
    """[period, pp, v, R] int: the canonical layer of every stacked position."""
    out = np.zeros((self.period, self.pp, self.virtual, self.repeats), np.int64)
    for idx in np.ndindex(out.shape):
      p, s, r, j = idx
      out[idx] = self.layer(s, r, j, p)
    return out

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def map_dicts(fn, *trees):
  """Maps `fn` over the leaves of nested dicts (pure-dict parameter trees, or trees of specs
  or tuples that jax would treat as nodes), leaf by leaf."""
  first = trees[0]
  if isinstance(first, dict):
    return {k: map_dicts(fn, *(t[k] for t in trees)) for k in first}
  return fn(*trees)


def stack(params: dict[str, Any], fmt: StageFormat) -> dict[str, Any]:
  """Canonical model tree -> the train state's stacked tree (numpy or jax arrays). A tree
  that holds only some layers (buffers: MoE layers only) stacks the slots it has; the others
  are {}."""
  layers = params.get(LAYERS, {})
  index = fmt.layer_index()
  out = {k: v for k, v in params.items() if k != LAYERS}
  slots = {}
  for p in range(fmt.period):
    order = index[p].reshape(-1)
    if int(order[0]) not in layers:
      slots[p] = {}
      continue
    blocks = [layers[int(i)] for i in order]
    shape = (fmt.pp, fmt.virtual, fmt.repeats)
    slots[p] = map_dicts(lambda *xs: jnp.stack(xs).reshape(shape + xs[0].shape), *blocks)
  out[STAGES] = slots
  return out


def unstack(params: dict[str, Any], fmt: StageFormat) -> dict[str, Any]:
  """The train state's stacked tree -> the canonical model tree."""
  index = fmt.layer_index()
  out = {k: v for k, v in params.items() if k != STAGES}
  layers: dict[int, Any] = {}
  for p, tree in params[STAGES].items():
    if not tree:  # a slot this tree has nothing of
      continue
    for pos in np.ndindex(index.shape[1:]):
      layers[int(index[(int(p), *pos)])] = map_dicts(lambda x, pos=pos: x[pos], tree)
  if layers:
    out[LAYERS] = {i: layers[i] for i in sorted(layers)}
  return out
