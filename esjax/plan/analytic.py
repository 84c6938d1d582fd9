"""What a layout must do at least, computed from the model and layout alone: FLOPs (the
ledger of `esjax.train.flops`, plus the recompute the step does) and the minimum bytes each
device sends per step per kind of communication. The planner prints these beside what the
compiled step does, and `--search` ranks layouts by them before compiling any.
"""

from __future__ import annotations

import dataclasses

from esjax.models.config import ModelConfig, count_params
from esjax.parallel.schedule import make_schedule
from esjax.sharding.layout import Layout
from esjax.train import flops as flops_lib

_BF16, _F32 = 2, 4


def ring(n: int) -> float:
  """Share of a buffer a device sends in a ring all-gather / reduce-scatter over n."""
  return (n - 1) / n if n > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Work:
  """One step of `cfg` on `layout` with global batch [batch, seq]."""

  cfg: ModelConfig
  layout: Layout
  batch: int
  seq: int

  @property
  def tokens(self) -> int:
    return self.batch * self.seq

  @property
  def model_flops(self) -> float:
    """Model FLOPs of the step (forward + backward, Megatron's accounting)."""
    return flops_lib.flops_per_token(self.cfg, self.seq) * self.tokens

  def model_parts(self) -> dict[str, float]:
    """`model_flops` by part: the ledger's, with the MLP split into dense MLPs and shared
    experts ('mlp') and routed experts ('experts')."""
    cfg = self.cfg
    parts = {k: v * self.tokens for k, v in flops_lib.flops_breakdown(cfg, self.seq).items()}
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    experts = 6.0 * self.tokens * n_moe * 3 * cfg.d_model * cfg.effective_d_ff_expert * (
        cfg.top_k if cfg.is_moe else 0)
    parts["mlp"] -= experts
    parts["experts"] = experts
    return parts

  @property
  def recomputed(self) -> tuple[str, ...]:
    """The ledger's parts whose forward the remat policy runs again in the backward (a
    pipeline stage stores its units' residuals and recomputes nothing itself). Core
    attention under every policy but 'none': none of them saves the kernel's softmax
    statistics (`tests/plan_flops_test.py` compiles it)."""
    layers = ("attn_proj", "core_attn", "mlp")
    return {"none": (), "dots": ("core_attn",), "dots_except_mlp": ("core_attn", "mlp"),
            "full": layers, "attn": layers, "offload_attn": layers}[self.cfg.remat]

  @property
  def attention_recompute(self) -> float:
    """Share of core attention forwards the step runs again in the backward."""
    return float("core_attn" in self.recomputed)

  @property
  def recompute_forwards(self) -> float:
    """Extra forward passes of the decoder layers the step runs, in units of one forward."""
    parts = flops_lib.flops_breakdown(self.cfg, self.seq, training=False)
    return sum(parts[k] for k in self.recomputed) / sum(parts.values())

  @property
  def hardware_flops(self) -> float:
    """FLOPs the devices execute: model FLOPs plus the recomputed forwards (a forward is a
    third of forward + backward)."""
    return self.model_flops * (1 + self.recompute_forwards / 3)

  @property
  def bubble(self) -> float:
    lay = self.layout
    if lay.pp == 1:
      return 0.0
    return make_schedule(lay.schedule, lay.pp, lay.microbatches, lay.virtual_stages).bubble

  def minimum_bytes(self) -> dict[str, float]:
    """Bytes each device sends per step at least, per kind (ring collectives, bf16
    activations, float32 gradients): the gradient reduction (and ZeRO-1 weight all-gather),
    TP/SP collectives, EP all-to-all of the routed top-k tokens, PP boundary activations and
    CP key/value gathers. Forward and backward count; recompute does not."""
    cfg, lay = self.cfg, self.layout
    pp, tp, cp, ep, etp = lay.pp, lay.tp, lay.cp, lay.ep, lay.etp
    d, hd = cfg.d_model, cfg.effective_head_dim
    layers_here = cfg.n_layers // pp
    moe_here = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers)) / pp
    # Tokens a device of a stage holds (batch over dp, sequence over cp then tp).
    per_device_tokens = self.tokens / (lay.dp * cp * tp)
    gathered = per_device_tokens * tp  # after the SP all-gather
    act = gathered * d * _BF16  # one [B_l, S_c, D] activation
    out: dict[str, float] = {}
    # Gradient reduction over the replicas of each weight, once per step.
    dense_params, expert_params = _params_per_device(cfg, lay)
    dp_dense, dp_expert = lay.dp * cp, lay.edp
    if lay.distributed_optimizer or lay.fsdp:
      grad = (dense_params * ring(dp_dense) + expert_params * ring(dp_expert)) * _F32
      weights = (dense_params * ring(dp_dense) + expert_params * ring(dp_expert)) * _BF16
      if lay.fsdp:  # gathered twice (forward, backward) per microbatch instead of once
        weights *= 2 * lay.microbatches
      out["data (gradients, weights)"] = grad + weights
    else:
      out["data (gradients)"] = 2 * (dense_params * ring(dp_dense)
                                     + expert_params * ring(dp_expert)) * _F32
    # TP with sequence parallelism: per layer an all-gather and a reduce-scatter around
    # attention and around the MLP (shared experts included), both ways.
    tp_layer = 2 * 2 * 2 * act * ring(tp)
    mlp_layers = layers_here - moe_here + (moe_here if cfg.n_shared_experts else 0)
    out["tp"] = (layers_here * tp_layer / 2 + mlp_layers * tp_layer / 2
                 + 4 * act * ring(tp))  # embedding and head
    # EP: each routed (token, expert) row goes out and comes back, forward and backward.
    rows = per_device_tokens * etp * cfg.top_k
    out["ep"] = moe_here * 4 * rows * d * _BF16 * ring(ep)
    if etp > 1:
      out["ep"] += moe_here * 2 * 2 * per_device_tokens * etp * d * _BF16 * ring(etp)
    # PP: a stage boundary activation per microbatch and chunk, forward and backward.
    if pp > 1:
      out["pp"] = 2 * lay.virtual_stages * per_device_tokens * d * _BF16
    # CP: keys and values of every layer from the other cp ranks, forward; their gradients
    # back.
    if cp > 1:
      kv_heads = max(cfg.n_kv_heads // tp, 1)
      kv = gathered * kv_heads * hd * 2 * _BF16
      out["cp"] = layers_here * 2 * kv * (cp - 1)
    return out


def _params_per_device(cfg: ModelConfig, lay: Layout) -> tuple[float, float]:
  """(dense, expert) parameters one device holds in the compute layout."""
  total = count_params(cfg)["total"]
  expert = 0
  if cfg.is_moe:
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    expert = n_moe * cfg.n_experts * 3 * cfg.d_model * cfg.effective_d_ff_expert
  dense = total - expert
  embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  layers_dense = dense - embed
  return (layers_dense / (lay.pp * lay.tp) + embed / lay.tp,
          expert / (lay.pp * lay.ep * lay.etp))
