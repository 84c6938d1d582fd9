"""Compute ledger: model FLOPs per token, and tokens, FLOPs and wall time per training stage,
with the savings of a staged recipe over training from scratch.

FLOPs per token follow Megatron's `num_floating_point_operations` (shared/reference/
megatron.md 6.2): matmuls only, 2 FLOPs per multiply-add, x3 for training (forward, weight
and input gradients), causal core attention counted at half of S x S. Not counted: the router
GEMM, embedding lookup, norms, softmax, padding and dropped tokens.

Savings follow AquilaMoE's Table 6 (methods.md 3.6): the from-scratch run trains the final
model on all the staged tokens at the final stage's throughput, and
  time savings    = scratch wall time / sum of stage wall times,
  compute savings = scratch (devices x peak x time) / sum of stages' (devices x peak x time),
i.e. cluster peak FLOPs x wall-clock time ("GFLOPS-days"), not model FLOPs. The ratio of
model FLOPs (6ND-style) is reported beside them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from esjax.models.config import ModelConfig


def flops_breakdown(cfg: ModelConfig, seq_len: int, training: bool = True) -> dict[str, float]:
  """Per-token FLOPs of each part: attention projections, core attention, MLP/experts, logits."""
  h, d, nq, nkv = cfg.d_model, cfg.effective_head_dim, cfg.n_heads, cfg.n_kv_heads
  mult = 6.0 if training else 2.0
  mlp = 0.0
  for i in range(cfg.n_layers):
    if cfg.is_moe_layer(i):
      shared = cfg.n_shared_experts * cfg.effective_d_ff_shared if cfg.n_shared_experts else 0
      mlp += 3 * h * (cfg.effective_d_ff_expert * cfg.top_k + shared)
    else:
      mlp += 3 * h * cfg.d_ff
  return {
      "attn_proj": mult * cfg.n_layers * (h * (nq * d + 2 * nkv * d) + nq * d * h),
      "core_attn": mult * cfg.n_layers * nq * d * seq_len,
      "mlp": mult * mlp,
      "logits": mult * h * cfg.vocab_size,
  }


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
  """Model FLOPs per token (training: forward + backward) at sequence length `seq_len`."""
  return sum(flops_breakdown(cfg, seq_len, training).values())


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: tokens seen, wall time, and what one token costs.

  `flops_per_token` is the model's training FLOPs per token (0: unknown); `devices` and
  `peak_flops` (per device) give the cluster peak used by the Table-6 compute savings.
  """

  name: str
  tokens: float
  wall_s: float
  flops_per_token: float = 0.0
  devices: int = 1
  peak_flops: float = 1.0

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / self.wall_s

  @property
  def model_flops(self) -> float:
    return self.tokens * self.flops_per_token

  @property
  def cluster_flops(self) -> float:
    """Cluster peak x wall time: what AquilaMoE's Table 6 calls GFLOPS-days."""
    return self.devices * self.peak_flops * self.wall_s

  @classmethod
  def from_rate(cls, name: str, tokens: float, tokens_per_s: float, **kw: Any) -> "Stage":
    return cls(name, tokens, tokens / tokens_per_s, **kw)

  @classmethod
  def measured(cls, name: str, cfg: ModelConfig, seq_len: int, tokens: float, wall_s: float,
               **kw: Any) -> "Stage":
    return cls(name, tokens, wall_s, flops_per_token(cfg, seq_len), **kw)


def scratch_stage(stages: Sequence[Stage], like: Stage | None = None,
                  name: str = "from scratch") -> Stage:
  """AquilaMoE's baseline: all the staged tokens at `like`'s (default: the last stage's)
  throughput, hardware and FLOPs per token."""
  like = like or stages[-1]
  tokens = sum(s.tokens for s in stages)
  return Stage.from_rate(name, tokens, like.tokens_per_s, flops_per_token=like.flops_per_token,
                         devices=like.devices, peak_flops=like.peak_flops)


def savings(stages: Sequence[Stage], scratch: Stage | None = None) -> dict[str, float]:
  """Time, compute (Table 6) and model-FLOP savings of `stages` over `scratch`."""
  if not stages:
    raise ValueError("savings: no stages")
  scratch = scratch or scratch_stage(stages)
  out = {
      "time": scratch.wall_s / sum(s.wall_s for s in stages),
      "compute": scratch.cluster_flops / sum(s.cluster_flops for s in stages),
  }
  if scratch.flops_per_token and all(s.flops_per_token for s in stages):
    out["model_flops"] = scratch.model_flops / sum(s.model_flops for s in stages)
  return out


class Ledger:
  """Stages of one recipe, saved as JSON; `summary()` adds totals and savings."""

  def __init__(self, stages: Sequence[Stage] = ()):
    self.stages = list(stages)

  def add(self, stage: Stage) -> None:
    self.stages.append(stage)

  def summary(self, scratch: Stage | None = None) -> dict[str, Any]:
    rows = [{**dataclasses.asdict(s), "tokens_per_s": s.tokens_per_s,
             "model_flops": s.model_flops} for s in self.stages]
    return {
        "stages": rows,
        "total": {"tokens": sum(s.tokens for s in self.stages),
                  "wall_s": sum(s.wall_s for s in self.stages),
                  "model_flops": sum(s.model_flops for s in self.stages)},
        "scratch": dataclasses.asdict(scratch) if scratch else None,
        "savings": savings(self.stages, scratch) if self.stages else {},
    }

  def save(self, path: str, scratch: Stage | None = None) -> None:
    with open(path, "w") as f:
      json.dump(self.summary(scratch), f, indent=1)

  @classmethod
  def load(cls, path: str) -> "Ledger":
    fields = {f.name for f in dataclasses.fields(Stage)}
    with open(path) as f:
      rows = json.load(f)["stages"]
    return cls([Stage(**{k: v for k, v in r.items() if k in fields}) for r in rows])
