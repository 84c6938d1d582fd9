"""Hugging Face config.json <-> ModelConfig, for Llama, Mistral, Qwen2, Qwen3, Mixtral,
Qwen2-MoE, Qwen3-MoE and OLMoE.

Reading rejects what esjax cannot represent (RoPE types other than default / linear /
dynamic / yarn / llama3, sliding windows on some layers only, biases other than Qwen2's
q/k/v, layer patterns that are not "first K dense, then every N-th MoE"). Writing picks the
Hugging Face architecture that computes exactly what the esjax model computes, or raises:

  dense, no q/k norm: q/k/v bias          -> Qwen2ForCausalLM
                      sliding window      -> MistralForCausalLM
                      otherwise           -> LlamaForCausalLM
  dense, q/k norm per head, no bias       -> Qwen3ForCausalLM
  MoE, q/k norm over the whole width,     -> OlmoeForCausalLM
    every layer, no shared expert, no bias or window
  MoE, q/k norm per head, no shared       -> Qwen3MoeForCausalLM
    expert, no bias
  MoE, no q/k norm, every layer, no       -> MixtralForCausalLM
    shared expert, no bias, top-k then softmax (or softmax, top-k, renormalise)
  any other softmax-routed MoE            -> Qwen2MoeForCausalLM (shared experts need the
    without a window                         sigmoid gate; none: a zero-width shared expert)

Routing: HF Mixtral does softmax over all experts, top-k, renormalise, which equals esjax's
`topk_softmax` (for top-1, `softmax_topk` renormalised: weight 1); HF Qwen2-MoE / Qwen3-MoE / OLMoE do softmax, top-k and renormalise only if
`norm_topk_prob`, which is esjax's `softmax_topk` with `renormalize=norm_topk_prob`. Router
loss coefficients are not mapped (HF's `router_aux_loss_coef` scales a loss defined
differently: concatenated over layers and k times esjax's); pass `aux_loss_coef=...` as an
override instead.

RoPE: `rope_parameters` (transformers 5) or `rope_scaling` (older configs, which wins when
both are there, as in transformers) map to the `rope_*` fields with every default that
transformers would fill in resolved (yarn's attention factor, the original context length),
so the exported config states them all explicitly.
"""

from __future__ import annotations

import math
from typing import Any

from esjax.models.config import DTYPES, ModelConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}
_ARCH_OF_MODEL_TYPE = {v: k for k, v in ARCHITECTURES.items()}
# transformers' defaults per model type for keys a config.json may leave out.
_DEFAULT_THETA = {"mixtral": 1e6}  # others: 10_000
_DEFAULT_EPS = {"mixtral": 1e-5, "olmoe": 1e-5}  # others: 1e-6
_DEFAULT_MAX_POS = {"llama": 2048, "mistral": 131072, "mixtral": 131072, "olmoe": 4096}
_SPARSE = ("qwen2_moe", "qwen3_moe")  # mlp_only_layers + decoder_sparse_step decide MoE layers


def _fail(msg: str):
  raise ValueError(f"Hugging Face config: {msg}")


def _count(hf: dict[str, Any], key: str) -> int:
  """A required field that counts something: a positive integer."""
  if key not in hf:
    _fail(f"no {key}")
  value = hf[key]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    _fail(f"{key}={value!r}: expected a positive integer")
  return value


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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_fields(hf: dict[str, Any], model_type: str, max_pos: int) -> dict[str, Any]:
  """The ModelConfig `rope_*` fields of an HF config (transformers' standardize_rope_params
  and ROPE_INIT_FUNCTIONS defaults)."""
  params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  if params and not isinstance(params.get("rope_theta", 0.0), (int, float)):
    _fail(f"rope_parameters={params!r}: per-layer-type RoPE is not supported")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    _fail(f"partial_rotary_factor={partial} is not supported (esjax rotates the whole head)")
  kind = params.get("rope_type") or params.get("type") or "default"
  theta = float(params.get("rope_theta", hf.get("rope_theta",
                                                _DEFAULT_THETA.get(model_type, 10_000.0))))
  out: dict[str, Any] = dict(rope_theta=theta, rope_type=kind)
  if kind == "default":
    return out
  if kind not in ("linear", "dynamic", "yarn", "llama3"):
    _fail(f"rope_type={kind!r} is not implemented in esjax; expected one of 'default', "
          f"'linear', 'dynamic', 'yarn', 'llama3' (rope_parameters={params!r})")
  orig = hf.get("original_max_position_embeddings",
                params.get("original_max_position_embeddings", max_pos))
  factor = params.get("factor")
  if factor is None and kind == "yarn":
    factor = max_pos / orig
  if factor is None:
    _fail(f"rope_type={kind!r} needs a 'factor' (rope_parameters={params!r})")
  out.update(rope_factor=float(factor), rope_original_max_len=int(orig))
  if kind == "dynamic":  # transformers scales against max_position_embeddings
    out["rope_original_max_len"] = int(max_pos)
  elif kind == "llama3":
    for key in ("low_freq_factor", "high_freq_factor"):
      if key not in params:
        _fail(f"rope_type='llama3' needs {key!r} (rope_parameters={params!r})")
    out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]))
  elif kind == "yarn":
    attention = params.get("attention_factor")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None:
      attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                   if mscale and mscale_all else _yarn_mscale(factor))
    out.update(rope_beta_fast=float(params.get("beta_fast") or 32),
               rope_beta_slow=float(params.get("beta_slow") or 1),
               rope_attention_factor=float(attention),
               rope_truncate=bool(params.get("truncate", True)))
  return out


def _sliding_window(hf: dict[str, Any], model_type: str, n_layers: int) -> int:
  """esjax's `sliding_window` (0: none) of an HF config; windows on some layers only fail."""
  if model_type in ("mistral", "mixtral"):  # transformers' defaults: 4096 and None
    return int(hf.get("sliding_window", 4096 if model_type == "mistral" else None) or 0)
  if model_type in ("llama", "olmoe"):
    return 0
  window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
  if model_type == "qwen3_moe":
    return int(window or 0)
  if model_type == "qwen2_moe":
    if window or set(hf.get("layer_types") or ["full_attention"]) != {"full_attention"}:
      _fail("use_sliding_window / sliding layer_types of Qwen2-MoE (alternate layers) are not "
            "supported; esjax has one attention kind for all layers")
    return 0
  kinds = hf.get("layer_types") or [
      "sliding_attention" if window and i >= hf.get("max_window_layers", 28) else
      "full_attention" for i in range(n_layers)]
  if len(set(kinds)) > 1:
    _fail(f"layer_types {sorted(set(kinds))} mix sliding and full attention; esjax has one "
          "attention kind for all layers")
  return int(window or 0) if kinds[0] == "sliding_attention" else 0


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


def _moe_fields(hf: dict[str, Any], model_type: str, n_layers: int) -> dict[str, Any]:
  n_experts = hf.get("num_experts", hf.get("num_local_experts", 0))
  if model_type == "mixtral":
    # top-1: weight 1, which softmax_topk renormalised is
    top_k = _count(hf, "num_experts_per_tok")
    if top_k == 1:
      return dict(n_experts=n_experts, top_k=1, routing_order="softmax_topk", renormalize=True)
    return dict(n_experts=n_experts, top_k=top_k, routing_order="topk_softmax")
  kw: dict[str, Any] = dict(routing_order="softmax_topk",
                            renormalize=bool(hf.get("norm_topk_prob")))
  if model_type == "olmoe":
    return dict(kw, n_experts=n_experts, top_k=_count(hf, "num_experts_per_tok"))
  if not n_experts:
    return {}
  step, dense_only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
  moe = {i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0}
  first_k_dense, moe_every = moe_layer_pattern(moe, n_layers)
  kw.update(n_experts=n_experts, top_k=_count(hf, "num_experts_per_tok"),
            d_ff_expert=_count(hf, "moe_intermediate_size"), first_k_dense=first_k_dense,
            moe_every=moe_every)
  shared = hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
  if shared:
    kw.update(n_shared_experts=1, d_ff_shared=shared, shared_expert_gate=True)
  return kw


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
  if hf.get("clip_qkv") is not None:
    _fail(f"clip_qkv={hf['clip_qkv']} is not supported (esjax does not clamp q/k/v)")
  d, n_heads, n_layers = (_count(hf, k) for k in ("hidden_size", "num_attention_heads",
                                                   "num_hidden_layers"))
  head_dim = hf.get("head_dim") or d // n_heads
  if model_type == "olmoe" and head_dim * n_heads != d:
    _fail(f"OLMoE with head_dim={head_dim} * num_attention_heads={n_heads} != hidden_size={d}: "
          "its q/k norms are hidden_size wide")
  max_pos = hf.get("max_position_embeddings", _DEFAULT_MAX_POS.get(model_type, 32768))
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  dtype = dtype if dtype in DTYPES else "float32"
  kw: dict[str, Any] = dict(
      vocab_size=_count(hf, "vocab_size"), d_model=d, n_layers=n_layers, n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=0 if head_dim * n_heads == d else head_dim, d_ff=_count(hf, "intermediate_size"),
      norm_eps=hf.get("rms_norm_eps", _DEFAULT_EPS.get(model_type, 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), max_seq_len=max_pos,
      init_std=hf.get("initializer_range", 0.02), dtype=dtype, param_dtype=dtype,
      sliding_window=_sliding_window(hf, model_type, n_layers),
      qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(model_type, "none"),
      **_rope_fields(hf, model_type, max_pos))
  if model_type == "qwen2":
    kw["qkv_bias"] = True
  elif model_type == "qwen2_moe":
    kw["qkv_bias"] = bool(hf.get("qkv_bias", True))
  if model_type in ("mixtral", "olmoe") + _SPARSE:
    kw.update(_moe_fields(hf, model_type, n_layers))
  kw.update(overrides)
  return ModelConfig.from_dict(kw)


def _cannot(cfg_says: str, why: str):
  raise ValueError(f"cannot export {cfg_says} to Hugging Face: {why}")


def architecture_for(cfg: ModelConfig) -> str:
  """The HF architecture that computes what `cfg` computes, or a ValueError saying why none."""
  if not cfg.is_moe:
    if cfg.qk_norm == "full":
      _cannot("a dense model with qk_norm='full'", "OLMoE, the architecture with whole-width "
              "q/k norms, is an MoE")
    if cfg.qk_norm == "head":
      if cfg.qkv_bias:
        _cannot("qkv_bias with qk_norm='head'", "Qwen3's attention_bias also biases o_proj")
      return "Qwen3ForCausalLM"
    if cfg.qkv_bias:
      return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"
  if cfg.score_fn != "softmax" or cfg.routed_scaling != 1.0:
    _cannot(f"score_fn={cfg.score_fn!r}, routed_scaling={cfg.routed_scaling}", "its MoE "
            "architectures route by softmax with no scaling")
  every_layer = len(cfg.moe_layers) == cfg.n_layers
  if cfg.qk_norm == "full":
    if not every_layer or cfg.n_shared_experts or cfg.qkv_bias or cfg.sliding_window:
      _cannot("qk_norm='full' with dense layers, shared experts, qkv_bias or a sliding window",
              "OLMoE has none of them")
    if cfg.effective_head_dim * cfg.n_heads != cfg.d_model:
      _cannot(f"qk_norm='full' with head_dim={cfg.effective_head_dim}", "OLMoE needs head_dim * "
              "n_heads == d_model")
    return "OlmoeForCausalLM"
  if cfg.qk_norm == "head":
    if cfg.n_shared_experts or cfg.qkv_bias:
      _cannot("qk_norm='head' with shared experts or qkv_bias", "Qwen3-MoE has neither")
    return "Qwen3MoeForCausalLM"
  if cfg.n_expert_groups > 1:
    _cannot(f"n_expert_groups={cfg.n_expert_groups}", "its MoE architectures have no "
            "group-limited routing")
  renormalised = cfg.routing_order == "topk_softmax" or cfg.renormalize_
  if renormalised and not cfg.qkv_bias and not cfg.n_shared_experts and every_layer:
    return "MixtralForCausalLM"
  if cfg.sliding_window:
    _cannot(f"sliding_window={cfg.sliding_window} with this MoE", "it needs Qwen2-MoE, whose "
            "sliding window covers alternate layers only")
  if cfg.n_shared_experts and not cfg.shared_expert_gate:
    _cannot("shared experts without shared_expert_gate", "Qwen2-MoE always gates its shared "
            "expert with a sigmoid")
  return "Qwen2MoeForCausalLM"


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  params: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    params["factor"] = cfg.rope_factor
  if cfg.rope_type in ("llama3", "yarn"):
    params["original_max_position_embeddings"] = cfg.effective_rope_original_max_len
  if cfg.rope_type == "llama3":
    params.update(low_freq_factor=cfg.rope_low_freq_factor,
                  high_freq_factor=cfg.rope_high_freq_factor)
  elif cfg.rope_type == "yarn":
    params.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                  truncate=cfg.rope_truncate, attention_factor=float(
                      cfg.rope_attention_factor or _yarn_mscale(cfg.rope_factor)))
  return params


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
  """config.json dict for `cfg` (see `architecture_for`); `dtype` defaults to param_dtype."""
  arch = architecture_for(cfg)
  model_type = ARCHITECTURES[arch]
  rope = _rope_to_hf(cfg)
  # Dynamic NTK scales against max_position_embeddings: that is its original length.
  max_pos = cfg.effective_rope_original_max_len if cfg.rope_type == "dynamic" else cfg.max_seq_len
  hf: dict[str, Any] = dict(
      architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.effective_head_dim, hidden_act="silu", max_position_embeddings=max_pos,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_parameters=rope,
      tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
      dtype=dtype or cfg.param_dtype)
  if cfg.rope_type != "default":
    hf["rope_scaling"] = dict(rope)  # what transformers 4 reads; 5 reads either
  window = cfg.sliding_window or None
  if model_type in ("llama", "qwen3", "qwen3_moe", "olmoe"):
    hf.update(attention_bias=False, mlp_bias=False)
  if model_type in ("mistral", "mixtral"):
    hf["sliding_window"] = window
  elif model_type in ("qwen2", "qwen3"):
    kind = "sliding_attention" if window else "full_attention"
    hf.update(use_sliding_window=bool(window), sliding_window=window, max_window_layers=0,
              layer_types=[kind] * cfg.n_layers)
  elif model_type == "qwen3_moe":
    hf.update(use_sliding_window=bool(window), sliding_window=window)
  renormalise = cfg.routing_order == "topk_softmax" or cfg.renormalize_
  if model_type == "mixtral":
    hf.update(intermediate_size=cfg.effective_d_ff_expert, num_local_experts=cfg.n_experts,
              num_experts_per_tok=cfg.top_k)
  elif model_type == "olmoe":
    hf.update(intermediate_size=cfg.effective_d_ff_expert, num_experts=cfg.n_experts,
              num_experts_per_tok=cfg.top_k, norm_topk_prob=renormalise, clip_qkv=None)
  elif model_type in _SPARSE:
    hf.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
              moe_intermediate_size=cfg.effective_d_ff_expert, norm_topk_prob=renormalise,
              decoder_sparse_step=1,
              mlp_only_layers=[i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)])
  if model_type == "qwen2_moe":
    hf.update(shared_expert_intermediate_size=cfg.n_shared_experts * cfg.effective_d_ff_shared,
              qkv_bias=cfg.qkv_bias, use_sliding_window=False)
  return hf
