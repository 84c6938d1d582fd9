"""Typed model configuration: one frozen dataclass covers dense Llama and every MoE flavour.

A dense model has `n_experts == 0`. An MoE model replaces the MLP of layer `i` by an MoE
block when `is_moe_layer(i)`: Mixtral (every layer), Qwen2-MoE / DeepSeek (fine-grained
experts, shared experts, first K layers dense, MoE every N layers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from esjax.routing.router import resolve_renormalize

SCORE_FNS = ("softmax", "sigmoid")
ROUTING_ORDERS = ("topk_softmax", "softmax_topk")
DROP_POLICIES = ("probs", "position")
MOE_IMPLS = ("auto", "ragged", "blocked", "gmm")
ROUTER_IMPLS = ("xla", "pallas")
DTYPES = ("float32", "bfloat16", "float16")
# Activation checkpointing per decoder layer (esjax.models.transformer.REMAT_POLICIES):
# none, full (keep only the layer input), dots (keep matmul outputs), dots_except_mlp (keep
# attention-side matmul outputs, recompute the MLP/experts), attn (keep the attention output),
# offload_attn (the attention output to pinned host memory, where XLA supports it).
REMAT = ("none", "full", "dots", "dots_except_mlp", "attn", "offload_attn")
SCOPES = ("batch", "rank")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")  # transformers' rope_type
QK_NORMS = ("none", "head", "full")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn")  # esjax.kernels.attention.ops
# ModelConfig.ep_buffer_factor's default: the exact bound. Measured on the tiny MoE (8 experts,
# ep=8, 150 steps, `python -m benchmarks.ep_overflow`), factors 1.25 / 2 / 3 drop 20% / 5.0% /
# 0.95% of the routed rows (33% / 15% / 3.4% in the first 15 steps): no factor that saves
# much is safe for every model, so a run opts in (and sees ep_overflow_fraction).
EP_BUFFER_FACTOR = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape and MoE routing. Validated on construction."""

  vocab_size: int = 256
  # Embedding and head rows padded to a multiple of this (Megatron's make_vocab_size_divisible_by;
  # esjax.configs.common sets it when tp does not divide vocab_size); padded logits are masked.
  vocab_multiple: int = 1
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // n_heads
  d_ff: int = 256
  rope_theta: float = 10_000.0
  # RoPE scaling, as transformers' modeling_rope_utils (see layers.rope_frequencies).
  rope_type: str = "default"
  rope_factor: float = 1.0  # linear, dynamic, yarn, llama3
  rope_original_max_len: int = 0  # dynamic, yarn, llama3: pretraining context; 0: max_seq_len
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_beta_fast: float = 32.0  # yarn
  rope_beta_slow: float = 1.0  # yarn
  rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0: 0.1 * ln(rope_factor) + 1
  rope_truncate: bool = True  # yarn: integer correction range
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  qk_norm: str = "none"  # RMSNorm of q and k: "head" per head (Qwen3), "full" whole width (OLMoE)
  sliding_window: int = 0  # key j visible to query i iff 0 <= q_pos[i] - k_pos[j] < window; 0: off
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
  param_dtype: str = "float32"
  remat: str = "none"
  # Attention kernel (esjax.kernels.attention.ops): "xla" (plain), "chunked" (memory linear
  # in the sequence), "cudnn" (flash on NVIDIA GPUs), "auto" (by backend and length). Batches
  # without positions (the training loop's) are plain 0..S-1: "xla" then skips the causal
  # upper triangle and "cudnn" runs without checking the order on the device.
  attention_impl: str = "auto"

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
  # softmax_topk only: divide the k weights by their sum. None: sigmoid with top_k > 1 does
  # (Megatron, DeepSeek-V3), softmax does not (Qwen2-MoE's norm_topk_prob default).
  renormalize: bool | None = None
  routed_scaling: float = 1.0  # multiplies the routed weights (DeepSeek's scaling factor)
  # Group-limited routing (DeepSeek-V3 n_group / topk_group): experts in n_expert_groups
  # groups of consecutive experts, each token chooses among its best top_k_groups groups.
  n_expert_groups: int = 1
  top_k_groups: int = 1
  # DeepSeek-V3 e_score_correction_bias (sigmoid only): a per-expert bias added to the
  # scores for selection only, a non-trainable variable (`moe.ExpertBias`). After each
  # optimizer step bias += expert_bias_rate * sign(mean load - load); 0: kept as loaded.
  expert_bias: bool = False
  expert_bias_rate: float = 1e-3
  router_init_std: float = 0.02
  aux_loss_coef: float = 0.0  # Switch load balancing (see balance_scope)
  seq_aux_loss_coef: float = 0.0  # the same, per sequence (DeepSeek-V2)
  z_loss_coef: float = 0.0  # ST-MoE router z-loss
  max_z_loss_coef: float = 0.0  # Baichuan-2 max-z loss on the LM-head logits
  capacity_factor: float = 0.0  # 0: dropless; > 0: capacity ceil(T*k/E*cf), tokens beyond it dropped
  drop_policy: str = "probs"
  # Over which tokens capacity and the balance loss are computed: the whole micro-batch
  # ("batch": what one device computes; routing is all-gathered over the data ranks) or each
  # rank's share ("rank": Megatron's semantics, capacity per device and the balance loss per
  # data-parallel rank, which scales without gathering routing).
  capacity_scope: str = "batch"
  balance_scope: str = "batch"
  # Dropping only: every expert computes exactly `capacity` rows. Under EP with
  # capacity_scope="batch" each source's block holds the stage's whole capacity (Mixtral-8x7B
  # @64, cf 1: experts 21x the model's FLOPs, 3,731 GiB of collectives per step); with "rank",
  # 1.33x (the remat recompute alone). Deviceless plans, `python -m esjax.plan`.
  pad_to_capacity: bool = False
  # Dropless EP: each source's block of rows for one EP rank holds factor x its balanced share
  # (T k / ep rows; MaxText's ragged_buffer_factor) instead of the worst case T min(k, E/ep);
  # rows past it are dropped and counted (ep_overflow_fraction). 0: the worst case, exact.
  ep_buffer_factor: float = EP_BUFFER_FACTOR
  # Grouped matmul: "ragged" (lax.ragged_dot, GPU/TPU; XLA:GPU multiplies whole buffers),
  # "blocked" (tiles, fast on CPU), "gmm" (esjax.kernels.gmm: kernels whose work is the
  # routed rows; Mosaic GPU on Hopper, Triton on other GPUs, megablox on TPUs), "auto"
  # (blocked on the CPU backend; gmm on GPUs and TPUs where it applies - bf16/f16, expert
  # widths in whole tiles - and passes its check on the run's devices, ragged otherwise:
  # esjax.models.moe). Same numbers each way.
  moe_impl: str = "auto"
  # Smallest chunk of moe_impl="blocked": each expert's rows are padded to a multiple of it,
  # then cut into chunks (esjax.routing.grouped: one per expert up to 8 blocks for large
  # experts, binary chunks for small ones). 64, not 128: the tiny MoEs' padded rows fall
  # from 1.16-1.37x to 1.06-1.19x of the routed ones; in one run of `benchmarks.moe_step
  # --impls blocked:128,blocked:64` the MoE step / dense step went 0.99 -> 0.99 (d 256) and
  # 1.36 -> 1.22 (d 512). 32 (chunks up to 256 rows) ran the ~100M MoE step 4% faster and
  # the 4-layer vs_maxtext MoE 4% slower: not taken.
  moe_block_size: int = 64
  router_impl: str = "xla"

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ValueError(f"ModelConfig: {msg}")

    for name in ("vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads",
                 "n_kv_heads", "d_ff"):
      need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
    need(self.n_heads % self.n_kv_heads == 0,
         f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    need(self.head_dim > 0 or self.d_model % self.n_heads == 0,
         f"d_model={self.d_model} not divisible by n_heads={self.n_heads}; set head_dim")
    need(self.effective_head_dim % 2 == 0,
         f"head_dim={self.effective_head_dim} must be even for RoPE")
    for name, allowed in (("score_fn", SCORE_FNS), ("routing_order", ROUTING_ORDERS),
                          ("drop_policy", DROP_POLICIES), ("moe_impl", MOE_IMPLS),
                          ("router_impl", ROUTER_IMPLS), ("dtype", DTYPES),
                          ("param_dtype", DTYPES), ("remat", REMAT),
                          ("capacity_scope", SCOPES), ("balance_scope", SCOPES),
                          ("rope_type", ROPE_TYPES), ("qk_norm", QK_NORMS),
                          ("attention_impl", ATTENTION_IMPLS)):
      need(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r}, expected one of {allowed}")
    for name in ("init_std", "norm_eps", "rope_theta", "max_seq_len", "routed_scaling"):
      value = getattr(self, name)
      need(math.isfinite(value) and value > 0, f"{name}={value} must be a finite number > 0")
    for name in ("router_init_std", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
                 "max_z_loss_coef", "ep_buffer_factor"):
      value = getattr(self, name)
      need(math.isfinite(value) and value >= 0, f"{name}={value} must be a finite number >= 0")
    need(self.rope_factor > 0, f"rope_factor={self.rope_factor} must be > 0")
    need(self.rope_original_max_len >= 0,
         f"rope_original_max_len={self.rope_original_max_len} must be >= 0")
    if self.rope_type == "llama3":
      need(self.rope_high_freq_factor > self.rope_low_freq_factor,
           f"rope_high_freq_factor={self.rope_high_freq_factor} must be > "
           f"rope_low_freq_factor={self.rope_low_freq_factor}")
    if self.rope_type == "dynamic":
      need(self.effective_head_dim > 2,
           f"rope_type='dynamic' needs head_dim > 2, got {self.effective_head_dim}")
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
      need(self.ep_buffer_factor == 0 or self.ep_buffer_factor >= 1,
           f"ep_buffer_factor={self.ep_buffer_factor} must be 0 (exact) or >= 1")
      need(not (self.score_fn == "sigmoid" and self.routing_order == "topk_softmax"),
           "score_fn='sigmoid' needs routing_order='softmax_topk' (scores first, then top-k)")
      need(not (self.routing_order == "topk_softmax" and self.top_k == 1),
           "routing_order='topk_softmax' with top_k=1 gives every weight 1 and the router no "
           "gradient from the LM loss; use routing_order='softmax_topk'")
      need(self.renormalize in (None, True, False),
           f"renormalize={self.renormalize!r}, expected None, True or False")
      g = self.n_expert_groups
      need(g >= 1 and self.n_experts % g == 0,
           f"n_expert_groups={g} must be >= 1 and divide n_experts={self.n_experts}")
      need(1 <= self.top_k_groups <= g
           and 1 <= self.top_k // self.top_k_groups <= self.n_experts // g,
           f"top_k_groups={self.top_k_groups} must be in [1, n_expert_groups={g}] with "
           f"top_k // top_k_groups (top_k={self.top_k}) in [1, {self.n_experts // g}]")
      need(self.top_k <= self.top_k_groups * (self.n_experts // g),
           f"top_k={self.top_k} exceeds the {self.top_k_groups * (self.n_experts // g)} "
           f"experts of top_k_groups={self.top_k_groups} groups")
      need(not self.expert_bias or self.score_fn == "sigmoid",
           f"expert_bias needs score_fn='sigmoid', got {self.score_fn!r}")
      need(self.expert_bias_rate >= 0, f"expert_bias_rate={self.expert_bias_rate} must be >= 0")
      need(self.router_impl == "xla" or (not self.expert_bias and g == 1),
           "router_impl='pallas' has no expert_bias or group-limited routing; use 'xla'")
      need(self.moe_impl != "gmm" or self.dtype in ("bfloat16", "float16"),
           f"moe_impl='gmm' multiplies in bfloat16 or float16, got dtype="
           f"{self.dtype!r}")

  # Derived shapes.
  @property
  def effective_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def effective_rope_original_max_len(self) -> int:
    return self.rope_original_max_len or self.max_seq_len

  @property
  def effective_d_ff_expert(self) -> int:
    return self.d_ff_expert or self.d_ff

  @property
  def effective_d_ff_shared(self) -> int:
    return self.d_ff_shared or self.effective_d_ff_expert

  @property
  def renormalize_(self) -> bool:
    return resolve_renormalize(self.renormalize, self.score_fn, self.top_k)

  @property
  def padded_vocab(self) -> int:
    """Rows of the embedding and the head: vocab_size rounded up to vocab_multiple."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

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
  d, hd = cfg.d_model, cfg.effective_head_dim
  attn = d * hd * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.n_heads * hd * d
  if cfg.qkv_bias:
    attn += hd * (cfg.n_heads + 2 * cfg.n_kv_heads)
  if cfg.qk_norm != "none":
    attn += 2 * hd if cfg.qk_norm == "head" else hd * (cfg.n_heads + cfg.n_kv_heads)
  norms = 2 * d
  dense_mlp = 3 * d * cfg.d_ff
  expert = 3 * d * cfg.effective_d_ff_expert
  shared = (cfg.n_shared_experts * 3 * d * cfg.effective_d_ff_shared
            + (d if cfg.shared_expert_gate else 0))
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
