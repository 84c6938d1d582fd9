"""Model shapes of the published models, and tiny CPU variants of each family.

Real shapes follow each model's Hugging Face config.json; AquilaMoE follows the paper's
Table 3 with the choices in shared/reference/methods.md section 3.5 (KV groups 8, FFN 20480).
"""

from __future__ import annotations

from esjax.models.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=500_000.0, norm_eps=1e-5, max_seq_len=8192),
    # NVIDIA's upcycling recipe (He et al. 2024, "Upcycling Large Language Models into
    # Mixture of Experts"): Llama-3-8B's MLP copied into 8 experts, top-2, softmax then top-k.
    "llama3-8b-8e2": ModelConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=500_000.0, norm_eps=1e-5, max_seq_len=8192, n_experts=8, top_k=2,
        routing_order="softmax_topk", aux_loss_coef=0.01),
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=1e6, norm_eps=1e-5, max_seq_len=32768, n_experts=8, top_k=2,
        aux_loss_coef=0.02),
    "mixtral-8x22b": ModelConfig(
        vocab_size=32768, d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8, d_ff=16384,
        rope_theta=1e6, norm_eps=1e-5, max_seq_len=65536, n_experts=8, top_k=2,
        aux_loss_coef=0.001),
    "qwen2-57b-a14b": ModelConfig(
        vocab_size=151936, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
        rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, max_seq_len=32768, n_experts=64,
        top_k=8, d_ff_expert=2560, n_shared_experts=1, d_ff_shared=20480,
        shared_expert_gate=True, routing_order="softmax_topk", renormalize=False,
        aux_loss_coef=0.001),
    "aquila-dense-7b": ModelConfig(
        vocab_size=151851, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=1e6, norm_eps=1e-5, qkv_bias=True, max_seq_len=4096),
    "aquila-dense-16b": ModelConfig(
        vocab_size=151851, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=8, d_ff=20480,
        rope_theta=1e6, norm_eps=1e-5, qkv_bias=True, max_seq_len=4096),
    "aquila-moe-8x16b": ModelConfig(
        vocab_size=151851, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=8, d_ff=20480,
        rope_theta=1e6, norm_eps=1e-5, qkv_bias=True, max_seq_len=4096, n_experts=8,
        top_k=2, aux_loss_coef=0.001, max_z_loss_coef=0.01),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the real model of experiments/realmodel.
    "smollm2-135m": ModelConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192),
    # Tiny CPU variants: the same families at a size that trains in seconds.
    "tiny-llama": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=256),
    "tiny-mixtral": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=256, n_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3),
    "tiny-qwen2-moe": ModelConfig(
        vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128,
        qkv_bias=True, max_seq_len=256, n_experts=8, top_k=4, d_ff_expert=32,
        n_shared_experts=1, d_ff_shared=64, shared_expert_gate=True,
        routing_order="softmax_topk", first_k_dense=1, aux_loss_coef=0.001),
    # DeepSeek-V3's routing (sigmoid, selection-only expert bias, 4 of 16 experts within
    # 2 of 4 groups, routed scaling, an ungated shared expert) on the esjax decoder.
    "tiny-deepseek-v3": ModelConfig(
        vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=256, n_experts=16, top_k=4, d_ff_expert=32, n_shared_experts=1,
        score_fn="sigmoid", routing_order="softmax_topk", routed_scaling=2.5,
        n_expert_groups=4, top_k_groups=2, expert_bias=True, first_k_dense=1),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
