"""Hugging Face config.json <-> ModelConfig, for Llama, Qwen2, Mixtral and Qwen2-MoE.

Reading rejects what esjax cannot represent (RoPE scaling, sliding windows, biases other
than Qwen2's q/k/v, layer patterns that are not "first K dense, then every N-th MoE").
Writing picks the Hugging Face architecture that computes exactly what the esjax model
computes, or raises:

  dense, no q/k/v bias                  -> LlamaForCausalLM
  dense with q/k/v bias                 -> Qwen2ForCausalLM
  MoE, every layer, no shared expert,   -> MixtralForCausalLM
    no bias, top-k then softmax (or softmax, top-k, renormalise)
  any other softmax-routed MoE          -> Qwen2MoeForCausalLM (shared experts need the
                                           sigmoid gate; none: a zero-width shared expert)

Routing: HF Mixtral does softmax over all experts, top-k, renormalise, which equals esjax's
`topk_softmax`; HF Qwen2-MoE does softmax, top-k and renormalises only if `norm_topk_prob`,
which is esjax's `softmax_topk` with `renormalize=norm_topk_prob`. Router loss coefficients
are not mapped (HF's `router_aux_loss_coef` scales a loss defined differently: concatenated
over layers and k times esjax's); pass `aux_loss_coef=...` as an override instead.
"""

from __future__ import annotations

from typing import Any

from esjax.models.config import DTYPES, ModelConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
_ARCH_OF_MODEL_TYPE = {v: k for k, v in ARCHITECTURES.items()}
# transformers' default RoPE base per model type, used when config.json names none.
_DEFAULT_THETA = {"llama": 10_000.0, "qwen2": 10_000.0, "mixtral": 1e6, "qwen2_moe": 10_000.0}


def _fail(msg: str):
  raise ValueError(f"Hugging Face config: {msg}")


def architecture(hf: dict[str, Any]) -> str:
  """The supported architecture name of an HF config dict, or a ValueError."""
  archs = hf.get("architectures") or []
  if archs:
    arch = archs[0]
  elif hf.get("model_type") in _ARCH_OF_MODEL_TYPE:
    arch = _ARCH_OF_MODEL_TYPE[hf["model_type"]]
  else:
    arch = f"model_type={hf.get('model_type')!r}"
  if arch not in ARCHITECTURES:
    _fail(f"architecture {arch!r} is not supported; expected one of {sorted(ARCHITECTURES)}")
  return arch


def _rope_theta(hf: dict[str, Any], model_type: str) -> float:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  if params and not isinstance(params.get("rope_theta", 0.0), (int, float)):
    _fail(f"rope_parameters={params!r}: per-layer-type RoPE is not supported")
  rope_type = (params.get("rope_type") or params.get("type") or scaling.get("rope_type")
               or scaling.get("type") or "default")
  if rope_type != "default":
    _fail(f"rope_type={rope_type!r} is not implemented in esjax (only 'default' RoPE); "
          f"rope_parameters={params or scaling!r}")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    _fail(f"partial_rotary_factor={partial} is not supported (esjax rotates the whole head)")
  return float(params.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA[model_type])))


def _check_full_attention(hf: dict[str, Any], model_type: str):
  if model_type == "mixtral":
    window = hf.get("sliding_window")
    if window is not None and window < hf.get("max_position_embeddings", 0):
      _fail(f"sliding_window={window} is not supported (esjax attends to the whole causal "
            "context)")
  if hf.get("use_sliding_window"):
    _fail("use_sliding_window=True is not supported (esjax attends to the whole context)")
  kinds = set(hf.get("layer_types") or ["full_attention"])
  if kinds != {"full_attention"}:
    _fail(f"layer_types {sorted(kinds)} are not supported; expected only 'full_attention'")


def moe_layer_pattern(moe_layers: set[int], n_layers: int) -> tuple[int, int]:
  """(first_k_dense, moe_every) whose MoE layers are exactly `moe_layers`, or a ValueError."""
  if not moe_layers:
    return n_layers, 1
  for first in range(n_layers):
    for every in range(1, n_layers + 1):
      if {i for i in range(first, n_layers) if (i - first) % every == 0} == moe_layers:
        return first, every
  _fail(f"MoE layers {sorted(moe_layers)} of {n_layers} are not 'first K dense, then every "
        "N-th layer MoE', which is all esjax represents")


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig of an HF config.json dict; `overrides` replace any resulting field."""
  arch = architecture(hf)
  model_type = ARCHITECTURES[arch]
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    _fail(f"hidden_act={act!r} is not supported; esjax MLPs are SwiGLU ('silu')")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    _fail(f"attention_bias={hf.get('attention_bias')}, mlp_bias={hf.get('mlp_bias')}: "
          "esjax has no output-projection or MLP biases")
  _check_full_attention(hf, model_type)
  d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // n_heads
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  dtype = dtype if dtype in DTYPES else "float32"
  kw: dict[str, Any] = dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=0 if head_dim * n_heads == d else head_dim, d_ff=hf["intermediate_size"],
      rope_theta=_rope_theta(hf, model_type), norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=hf.get("max_position_embeddings", 2048),
      init_std=hf.get("initializer_range", 0.02), dtype=dtype, param_dtype=dtype)
  if model_type == "qwen2":
    kw["qkv_bias"] = True
  elif model_type == "mixtral":
    kw.update(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
              routing_order="topk_softmax")
  elif model_type == "qwen2_moe":
    kw["qkv_bias"] = bool(hf.get("qkv_bias", True))
    n_experts = hf.get("num_experts", 0)
    if n_experts:
      step, dense_only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
      moe = {i for i in range(kw["n_layers"]) if i not in dense_only and (i + 1) % step == 0}
      first_k_dense, moe_every = moe_layer_pattern(moe, kw["n_layers"])
      shared = hf.get("shared_expert_intermediate_size", 0)
      kw.update(n_experts=n_experts, top_k=hf["num_experts_per_tok"],
                d_ff_expert=hf["moe_intermediate_size"], n_shared_experts=1 if shared else 0,
                d_ff_shared=shared, shared_expert_gate=bool(shared),
                first_k_dense=first_k_dense, moe_every=moe_every,
                routing_order="softmax_topk", renormalize=bool(hf.get("norm_topk_prob")))
  kw.update(overrides)
  return ModelConfig.from_dict(kw)


def architecture_for(cfg: ModelConfig) -> str:
  """The HF architecture that computes what `cfg` computes, or a ValueError saying why none."""
  if not cfg.is_moe:
    return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
  if cfg.score_fn != "softmax" or cfg.routed_scaling != 1.0:
    raise ValueError(f"cannot export score_fn={cfg.score_fn!r}, routed_scaling="
                     f"{cfg.routed_scaling} to Hugging Face: Mixtral and Qwen2-MoE route by "
                     "softmax with no scaling")
  renormalised = cfg.routing_order == "topk_softmax" or cfg.renormalize
  if (renormalised and not cfg.qkv_bias and not cfg.n_shared_experts
      and len(cfg.moe_layers) == cfg.n_layers):
    return "MixtralForCausalLM"
  if cfg.n_shared_experts and not cfg.shared_expert_gate:
    raise ValueError("cannot export shared experts without shared_expert_gate to Hugging "
                     "Face: Qwen2-MoE always gates its shared expert with a sigmoid")
  return "Qwen2MoeForCausalLM"


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
  """config.json dict for `cfg` (see `architecture_for`); `dtype` defaults to param_dtype."""
  arch = architecture_for(cfg)
  model_type = ARCHITECTURES[arch]
  hf: dict[str, Any] = dict(
      architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.effective_head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
      dtype=dtype or cfg.param_dtype)
  if model_type == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  elif model_type == "qwen2":
    hf.update(use_sliding_window=False)
  elif model_type == "mixtral":
    hf.update(intermediate_size=cfg.effective_d_ff_expert, num_local_experts=cfg.n_experts,
              num_experts_per_tok=cfg.top_k, sliding_window=None)
  else:
    hf.update(
        num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.effective_d_ff_expert,
        shared_expert_intermediate_size=cfg.n_shared_experts * cfg.effective_d_ff_shared,
        norm_topk_prob=cfg.routing_order == "topk_softmax" or cfg.renormalize,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
        qkv_bias=cfg.qkv_bias, use_sliding_window=False)
  return hf
