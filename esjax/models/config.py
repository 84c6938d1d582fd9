"""Typed model configuration: one frozen dataclass covers dense Llama and every MoE flavour.

A dense model has `n_experts == 0`. An MoE model replaces the MLP of layer `i` by an MoE
block when `is_moe_layer(i)`: Mixtral (every layer), Qwen2-MoE / DeepSeek (fine-grained
experts, shared experts, first K layers dense, MoE every N layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

SCORE_FNS = ("softmax", "sigmoid")
ROUTING_ORDERS = ("topk_softmax", "softmax_topk")
DROP_POLICIES = ("probs", "position")
MOE_IMPLS = ("auto", "ragged", "blocked")
ROUTER_IMPLS = ("xla", "pallas")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn")  # esjax.kernels.attention.ops


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape and MoE routing. Validated on construction."""

  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // n_heads
  d_ff: int = 256
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
  param_dtype: str = "float32"
  remat: str = "none"
  # Attention kernel (esjax.kernels.attention.ops): "xla" (plain), "chunked" (memory linear
  # in the sequence), "cudnn" (flash on NVIDIA GPUs), "auto" (by backend and length).
  attention_impl: str = "auto"
  sliding_window: int = 0  # > 0: a query sees keys fewer than this many positions back

  # MoE (n_experts == 0: dense).
  n_experts: int = 0
  top_k: int = 2
  d_ff_expert: int = 0  # 0: d_ff
  n_shared_experts: int = 0
  d_ff_shared: int = 0  # width of each shared expert; 0: d_ff_expert
  shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared output
  moe_every: int = 1  # layer i (i >= first_k_dense) is MoE when (i - first_k_dense) % moe_every == 0
  first_k_dense: int = 0
  score_fn: str = "softmax"
  routing_order: str = "topk_softmax"  # Mixtral; "softmax_topk": scores over all experts first
  renormalize: bool = False  # softmax_topk only: divide the k weights by their sum
  routed_scaling: float = 1.0  # multiplies the routed weights (DeepSeek's scaling factor)
  router_init_std: float = 0.02
  aux_loss_coef: float = 0.0  # Switch load balancing, over the whole batch
  seq_aux_loss_coef: float = 0.0  # the same, per sequence (DeepSeek-V2)
  z_loss_coef: float = 0.0  # ST-MoE router z-loss
  max_z_loss_coef: float = 0.0  # Baichuan-2 max-z loss on the LM-head logits
  capacity_factor: float = 0.0  # 0: dropless; > 0: capacity ceil(T*k/E*cf), tokens beyond it dropped
  drop_policy: str = "probs"
  pad_to_capacity: bool = False  # dropping only: every expert computes exactly `capacity` rows
  # Grouped matmul: "ragged" (lax.ragged_dot, GPU/TPU), "blocked" (tiles, fast on CPU),
  # "auto" (blocked on the CPU backend, ragged elsewhere). Same numbers either way.
  moe_impl: str = "auto"
  moe_block_size: int = 128  # tile rows for moe_impl="blocked"
  router_impl: str = "xla"

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ValueError(f"ModelConfig: {msg}")

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
      need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
    need(self.n_heads % self.n_kv_heads == 0,
         f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    need(self.head_dim > 0 or self.d_model % self.n_heads == 0,
         f"d_model={self.d_model} not divisible by n_heads={self.n_heads}; set head_dim")
    need(self.head_dim_ % 2 == 0, f"head_dim={self.head_dim_} must be even for RoPE")
    for name, allowed in (("score_fn", SCORE_FNS), ("routing_order", ROUTING_ORDERS),
                          ("drop_policy", DROP_POLICIES), ("moe_impl", MOE_IMPLS),
                          ("router_impl", ROUTER_IMPLS), ("dtype", DTYPES),
                          ("param_dtype", DTYPES), ("remat", REMAT),
                          ("attention_impl", ATTENTION_IMPLS)):
      need(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r}, expected one of {allowed}")
    need(self.sliding_window >= 0, f"sliding_window={self.sliding_window} must be >= 0")
    need(self.n_experts >= 0, f"n_experts={self.n_experts} must be >= 0")
    if self.n_experts:
      need(1 <= self.top_k <= self.n_experts,
           f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
      need(self.moe_every >= 1, f"moe_every={self.moe_every} must be >= 1")
      need(0 <= self.first_k_dense <= self.n_layers,
           f"first_k_dense={self.first_k_dense} must be in [0, n_layers={self.n_layers}]")
      need(self.moe_block_size >= 1, f"moe_block_size={self.moe_block_size} must be >= 1")
      need(self.capacity_factor >= 0, f"capacity_factor={self.capacity_factor} must be >= 0")
      need(not (self.score_fn == "sigmoid" and self.routing_order == "topk_softmax"),
           "score_fn='sigmoid' needs routing_order='softmax_topk' (scores first, then top-k)")

  # Derived shapes.
  @property
  def head_dim_(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def d_ff_expert_(self) -> int:
    return self.d_ff_expert or self.d_ff

  @property
  def d_ff_shared_(self) -> int:
    return self.d_ff_shared or self.d_ff_expert_

  @property
  def is_moe(self) -> bool:
    return self.n_experts > 0

  def is_moe_layer(self, i: int) -> bool:
    return (self.is_moe and i >= self.first_k_dense
            and (i - self.first_k_dense) % self.moe_every == 0)

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"ModelConfig: unknown keys {unknown}; known keys are {sorted(fields)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Total and active (per token) parameter counts, embeddings included."""
  d, hd = cfg.d_model, cfg.head_dim_
  attn = d * hd * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.n_heads * hd * d
  if cfg.qkv_bias:
    attn += hd * (cfg.n_heads + 2 * cfg.n_kv_heads)
  norms = 2 * d
  dense_mlp = 3 * d * cfg.d_ff
  expert = 3 * d * cfg.d_ff_expert_
  shared = cfg.n_shared_experts * 3 * d * cfg.d_ff_shared_ + (d if cfg.shared_expert_gate else 0)
  router = d * cfg.n_experts
  total = active = 0
  for i in range(cfg.n_layers):
    total += attn + norms
    active += attn + norms
    if cfg.is_moe_layer(i):
      total += router + cfg.n_experts * expert + shared
      active += router + cfg.top_k * expert + shared
    else:
      total += dense_mlp
      active += dense_mlp
  embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d
  return {"total": total + embed, "active": active + embed}
