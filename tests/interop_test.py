"""Hugging Face interop: esjax logits equal transformers' (float32, 1e-4) in both directions,
and greedy generation gives the same tokens, for every supported architecture.

Tiny random models are built with transformers on the CPU (no hub); tests that need torch
skip with a message when it is not installed. Config-mapping and error tests need neither.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from esjax import interop
from esjax.eval import generation
from esjax.models import layers, presets
from esjax.models.config import ModelConfig

TOL = 1e-4
TOKENS = np.random.RandomState(0).randint(0, 128, (2, 9)).astype(np.int32)
PROMPT_LEN, NEW_TOKENS = 4, 8  # generation crosses the short contexts of the RoPE cases


def _hf():
  torch = pytest.importorskip("torch", reason="torch not installed: HF interop tests skipped "
                              "(pip install -r requirements-dev.txt)")
  transformers = pytest.importorskip("transformers", reason="transformers not installed: HF "
                                     "interop tests skipped (pip install -r requirements-dev.txt)")
  torch.set_num_threads(1)
  return torch, transformers


def _hf_model(name, kw):
  torch, transformers = _hf()
  common = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
  common.update(kw)
  cfg = getattr(transformers, name)(**common)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # weights large enough that logits and routing are far from trivial
    for pname, p in model.named_parameters():
      p.normal_(0.0, 0.2)
      if pname.endswith("norm.weight"):
        p.add_(1.0)
  return model


def _hf_logits(model):
  torch, _ = _hf()
  with torch.no_grad():
    return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _hf_greedy(model):
  """transformers' greedy generate (fresh cache, no early stop) of the TOKENS prompts."""
  torch, _ = _hf()
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    out = model.generate(torch.tensor(TOKENS[:, :PROMPT_LEN], dtype=torch.long),
                         attention_mask=torch.ones((2, PROMPT_LEN), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
  return out[:, PROMPT_LEN:].numpy().tolist()


def _greedy(model):
  """esjax's cached greedy decoding; the prompt too goes in one token at a time, so one
  compiled step serves all (the same function: the prompts are shorter than any context)."""
  return generation.generate(model, TOKENS[:, :PROMPT_LEN].tolist(), max_new_tokens=NEW_TOKENS,
                             max_len=64, prefill_chunk=1)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)[0]


def _logits(model):
  return np.asarray(_forward(model, jnp.asarray(TOKENS)))


ROPE = {"rope_theta": 10_000.0}
HF_CASES = {
    "llama_gqa_tied": ("LlamaConfig", dict(
        intermediate_size=96, num_hidden_layers=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    "llama_mha_head_dim": ("LlamaConfig", dict(
        intermediate_size=96, num_hidden_layers=2, num_key_value_heads=4, head_dim=32)),
    # RoPE scaling: contexts short enough that 9 tokens and generation feel every branch.
    "llama3_rope": ("LlamaConfig", dict(intermediate_size=96, num_hidden_layers=2, rope_parameters={
        **ROPE, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_linear_rope": ("LlamaConfig", dict(intermediate_size=96, num_hidden_layers=2,
                                              rope_parameters={**ROPE, "rope_type": "linear",
                                                               "factor": 4.0})),
    "llama_dynamic_rope": ("LlamaConfig", dict(
        intermediate_size=96, num_hidden_layers=2, max_position_embeddings=6,
        rope_parameters={**ROPE, "rope_type": "dynamic", "factor": 4.0})),
    "llama_yarn_rope": ("LlamaConfig", dict(
        intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
        rope_parameters={**ROPE, "rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "mistral_window": ("MistralConfig", dict(intermediate_size=96, num_hidden_layers=2,
                                             sliding_window=4)),
    "qwen2_dense": ("Qwen2Config", dict(intermediate_size=96, num_hidden_layers=2)),
    "qwen2_window": ("Qwen2Config", dict(intermediate_size=96, num_hidden_layers=2,
                                         use_sliding_window=True, sliding_window=3,
                                         max_window_layers=0)),
    "qwen3_head_dim": ("Qwen3Config", dict(intermediate_size=96, num_hidden_layers=2,
                                           head_dim=32)),
    "mixtral_window": ("MixtralConfig", dict(
        intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=5)),
    "mixtral": ("MixtralConfig", dict(
        intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_top1": ("MixtralConfig", dict(  # esjax: softmax_topk, renormalised (weight 1)
        intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=1)),
    "qwen2_moe_shared_first_dense": ("Qwen2MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])),
    "qwen2_moe_sparse_step_norm_topk": ("Qwen2MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
        norm_topk_prob=True, qkv_bias=False)),
    "qwen3_moe_first_dense_yarn": ("Qwen3MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True, head_dim=32,
        max_position_embeddings=64, rope_parameters={
            **ROPE, "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
            "mscale": 0.8, "mscale_all_dim": 1.0})),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_hidden_layers=2, num_experts=4,
                                  num_experts_per_tok=2)),
}
# Greedy generation for every architecture and RoPE type (the rest only vary the shapes).
GENERATE = {"llama3_rope", "llama_linear_rope", "llama_dynamic_rope", "llama_yarn_rope",
            "mistral_window", "qwen2_window", "qwen3_head_dim", "mixtral_window",
            "qwen2_moe_shared_first_dense", "qwen3_moe_first_dense_yarn", "olmoe"}

# (q/k norms with random scales matter by construction; RoPE scaling and windows might not
# on 9 tokens, so those cases check that they do.)
FEATURES = {"llama3_rope", "llama_linear_rope", "llama_dynamic_rope", "llama_yarn_rope",
            "mistral_window"}


def _check_feature_matters(model, out):
  """The feature a case checks is no no-op on its tiny config: without its RoPE scaling
  or sliding window, the logits move far beyond TOL."""
  plain = model.cfg.replace(rope_type="default", sliding_window=0)
  assert plain != model.cfg
  changed = interop.model_from_params(plain, nnx.state(model, nnx.Param))
  assert np.abs(_logits(changed) - out).max() > 100 * TOL


SLOW_CASES = {"olmoe", "mixtral_window"}  # the longest; qwen3_moe covers MoE in the default run


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES
                                  else c for c in sorted(HF_CASES)])
def test_hf_to_esjax_and_back(case, tmp_path):
  _, transformers = _hf()
  hf_model = _hf_model(*HF_CASES[case])
  hf_model.save_pretrained(tmp_path / "hf")
  ref = _hf_logits(hf_model)
  assert ref.std() > 0.1  # logits far from zero, so 1e-4 is a real bound

  model = interop.from_pretrained(tmp_path / "hf")
  out = _logits(model)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
  if case in GENERATE:
    assert _greedy(model) == _hf_greedy(hf_model)
  if case in FEATURES:
    _check_feature_matters(model, out)

  # esjax -> HF: transformers loads what save_pretrained writes and computes the same logits.
  interop.save_pretrained(model, tmp_path / "esjax")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "esjax").eval()
  assert type(back).__name__ == type(hf_model).__name__
  np.testing.assert_allclose(_hf_logits(back), out, atol=TOL, rtol=0)
  # ... and writes the same tensors, under the same names, as transformers itself.
  ours = safetensors.numpy.load_file(tmp_path / "esjax" / "model.safetensors")
  theirs = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  assert {p.stat().st_mode & 0o777 for p in (tmp_path / "esjax").iterdir()} == {0o644}


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=32),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.7,
         mscale_all_dim=1.0, beta_fast=16, beta_slow=2, truncate=False),
    dict(rope_type="yarn", factor=3.0, original_max_position_embeddings=16,
         attention_factor=0.9),
    dict(rope_type="dynamic", factor=4.0)], ids=lambda r: "-".join(map(str, r.values())))
def test_rope_frequencies_equal_transformers(rope):
  """layers.rope_frequencies of the imported config = transformers' ROPE_INIT_FUNCTIONS
  (modeling_rope_utils), inverse frequencies and cos/sin scale; dynamic at several lengths."""
  torch, transformers = _hf()
  init_fn = pytest.importorskip("transformers.modeling_rope_utils").ROPE_INIT_FUNCTIONS[
      rope["rope_type"]]
  hf = transformers.LlamaConfig(vocab_size=32, hidden_size=64, num_attention_heads=4,
                                head_dim=16, num_hidden_layers=1, intermediate_size=32,
                                max_position_embeddings=8 if rope["rope_type"] == "dynamic"
                                else 64, rope_parameters={**ROPE, **rope})
  cfg = interop.config_from_hf(hf.to_dict())
  for seq_len in ([None] if rope["rope_type"] != "dynamic" else [None, 5, 9, 40]):
    want, want_scale = init_fn(hf, None, seq_len=None if seq_len is None
                               else torch.tensor(seq_len))
    got, scale = layers.rope_frequencies(cfg, None if seq_len is None else np.int32(seq_len))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)
  # ... and the export states the same parameters: transformers computes the same again.
  back = transformers.LlamaConfig.from_dict(interop.config_to_hf(cfg))
  np.testing.assert_array_equal(init_fn(back, None)[0].numpy(), init_fn(hf, None)[0].numpy())


def test_routing_maps_to_esjax_orders(tmp_path):
  _hf_model(*HF_CASES["mixtral_window"]).save_pretrained(tmp_path / "m")
  _hf_model(*HF_CASES["qwen2_moe_sparse_step_norm_topk"]).save_pretrained(tmp_path / "q")
  mixtral, qwen = interop.read_config(tmp_path / "m"), interop.read_config(tmp_path / "q")
  assert (mixtral.routing_order, mixtral.n_experts, mixtral.top_k) == ("topk_softmax", 4, 2)
  assert (qwen.routing_order, qwen.renormalize, qwen.qkv_bias) == ("softmax_topk", True, False)
  assert qwen.moe_layers == (1, 3) and qwen.shared_expert_gate


def _random_esjax(cfg, seed=0):
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    value = 0.2 * rng.randn(*leaf.shape) + ("scale" in jax.tree_util.keystr(path))
    return jnp.asarray(value, leaf.dtype)

  params = jax.tree_util.tree_map_with_path(draw, interop.abstract_params(cfg))
  return interop.model_from_params(cfg, params)


ESJAX_CASES = {
    # name: (config, the HF architecture that must represent it)
    "llama_qkv_bias": (presets.get_preset("tiny-llama", vocab_size=128, qkv_bias=True),
                       "Qwen2ForCausalLM"),
    "llama_window_llama3_rope": (presets.get_preset(
        "tiny-llama", vocab_size=128, sliding_window=3, rope_type="llama3", rope_factor=4.0,
        rope_original_max_len=16), "MistralForCausalLM"),
    "qk_norm_head_dense": (presets.get_preset("tiny-llama", vocab_size=128, qk_norm="head"),
                           "Qwen3ForCausalLM"),
    "mixtral_softmax_topk_renorm": (presets.get_preset(
        "tiny-mixtral", vocab_size=128, n_experts=4, routing_order="softmax_topk",
        renormalize=True), "MixtralForCausalLM"),
    "qwen2_moe_preset": (presets.get_preset("tiny-qwen2-moe", vocab_size=128),
                         "Qwen2MoeForCausalLM"),
    "aquila_like_moe": (presets.get_preset(  # qkv bias + dense first layer, no shared expert
        "tiny-mixtral", vocab_size=128, n_experts=4, n_layers=3, qkv_bias=True,
        first_k_dense=1), "Qwen2MoeForCausalLM"),
    "qk_norm_head_moe_window": (presets.get_preset(
        "tiny-mixtral", vocab_size=128, n_experts=4, n_layers=3, qk_norm="head",
        first_k_dense=1, sliding_window=4, rope_type="dynamic", rope_factor=2.0,
        rope_original_max_len=6), "Qwen3MoeForCausalLM"),
    "qk_norm_full_moe": (presets.get_preset(
        "tiny-mixtral", vocab_size=128, n_experts=4, qk_norm="full",
        routing_order="softmax_topk"), "OlmoeForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(ESJAX_CASES))
def test_esjax_to_hf_and_back(case, tmp_path):
  _, transformers = _hf()
  cfg, arch = ESJAX_CASES[case]
  model = _random_esjax(cfg)
  out = _logits(model)
  assert out.std() > 0.1
  interop.save_pretrained(model, tmp_path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == arch
  np.testing.assert_allclose(_hf_logits(hf_model), out, atol=TOL, rtol=0)

  cfg_back, params = interop.load_pretrained_params(tmp_path)
  assert cfg_back.moe_layers == cfg.moe_layers
  jax.tree.map(np.testing.assert_array_equal, params,
               nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_sharded_read_and_write(tmp_path):
  _, transformers = _hf()
  hf_model = _hf_model(*HF_CASES["mixtral_window"])
  hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  model = interop.from_pretrained(tmp_path / "hf")
  out = _logits(model)
  np.testing.assert_allclose(out, _hf_logits(hf_model), atol=TOL, rtol=0)

  files = interop.save_pretrained(model, tmp_path / "esjax", max_shard_bytes=40_000)
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 1 and "model.safetensors.index.json" in files
  for shard in shards:  # no shard above the limit unless it holds a single larger tensor
    tensors = safetensors.numpy.load_file(tmp_path / "esjax" / shard)
    assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 40_000
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "esjax").eval()
  np.testing.assert_allclose(_hf_logits(back), out, atol=TOL, rtol=0)

  # Saving unsharded into the same folder removes the old shards and index.
  interop.save_pretrained(model, tmp_path / "esjax")
  assert sorted(p.name for p in (tmp_path / "esjax").iterdir()) == [
      "config.json", "model.safetensors"]
  np.testing.assert_allclose(_logits(interop.from_pretrained(tmp_path / "esjax")), out,
                             atol=0, rtol=0)


@pytest.mark.parametrize("case", ["mixtral_window", "qwen3_moe_first_dense_yarn"])
def test_reads_fused_expert_tensors(case, tmp_path):
  """transformers 5 holds experts fused (gate_up_proj [E, 2F, D]); those names load too."""
  hf_model = _hf_model(*HF_CASES[case])
  hf_model.save_pretrained(tmp_path)
  cfg, from_file = interop.load_pretrained_params(tmp_path)
  in_memory = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  assert any(k.endswith("experts.gate_up_proj") for k in in_memory)
  from_fused = interop.hf_to_esjax_params(cfg, in_memory)
  jax.tree.map(np.testing.assert_array_equal, from_fused, from_file)


def test_bfloat16_checkpoint(tmp_path):
  torch, transformers = _hf()
  hf_model = _hf_model(*HF_CASES["qwen2_moe_shared_first_dense"]).to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path / "hf")
  model = interop.from_pretrained(tmp_path / "hf")
  assert model.cfg.param_dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(model.embed[...], np.float32),
      hf_model.model.embed_tokens.weight.detach().float().numpy())
  interop.save_pretrained(model, tmp_path / "esjax")
  ours = safetensors.numpy.load_file(tmp_path / "esjax" / "model.safetensors")
  theirs = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    assert ours[name].dtype == value.dtype, name
    np.testing.assert_array_equal(ours[name].view(np.uint16), value.view(np.uint16), name)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "esjax")
  assert back.dtype == torch.bfloat16


# Config mapping and errors: no torch needed.

def _qwen2_moe_json(**kw):
  hf = dict(architectures=["Qwen2MoeForCausalLM"], vocab_size=128, hidden_size=64,
            intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=48)
  hf.update(kw)
  return hf


def test_qwen2_moe_layer_patterns():
  """esjax's MoE layers equal transformers' rule: i not in mlp_only_layers, (i+1) % step == 0."""
  represented = 0
  for n_layers in range(1, 7):
    for step in range(1, 4):
      for dense_only in ([], [0], [0, 1], [n_layers - 1]):
        hf_rule = {i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0}
        hf = _qwen2_moe_json(num_hidden_layers=n_layers, decoder_sparse_step=step,
                             mlp_only_layers=dense_only)
        try:
          cfg = interop.config_from_hf(hf)
        except ValueError as e:
          assert "first K dense" in str(e)
          continue
        represented += 1
        assert set(cfg.moe_layers) == hf_rule, (n_layers, step, dense_only)
        # ... and the exported config describes the same layers.
        back = interop.config_to_hf(cfg)
        assert {i for i in range(n_layers) if i not in back["mlp_only_layers"]} == hf_rule
  assert represented > 40


@pytest.mark.parametrize("kw, match", [
    (dict(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 8.0}), "longrope"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "needs 'low_freq_factor'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "needs a 'factor'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(hidden_act="gelu"), "gelu"),
    (dict(use_sliding_window=True), "sliding"),
    (dict(mlp_only_layers=[2]), "first K dense"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    interop.config_from_hf(_qwen2_moe_json(**kw))


def test_rope_and_window_mapping():
  """Legacy `rope_scaling` wins over `rope_parameters` (as in transformers), defaults are
  resolved, and the windows of each architecture map to one `sliding_window`."""
  hf = _qwen2_moe_json(rope_theta=5e5, rope_parameters={"rope_type": "default"},
                       rope_scaling={"rope_type": "yarn", "factor": 4.0})
  cfg = interop.config_from_hf(dict(hf, max_position_embeddings=4096))
  assert (cfg.rope_type, cfg.rope_theta, cfg.rope_original_max_len) == ("yarn", 5e5, 4096)
  assert cfg.rope_attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
  dynamic = interop.config_from_hf(dict(hf, max_position_embeddings=512, rope_scaling={
      "type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}))
  assert (dynamic.rope_type, dynamic.rope_original_max_len) == ("dynamic", 512)

  llama = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64,
               intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
  assert interop.config_from_hf(llama).n_kv_heads == 4
  with pytest.raises(ValueError, match="attention_bias"):
    interop.config_from_hf(dict(llama, attention_bias=True))
  mixtral = dict(llama, architectures=["MixtralForCausalLM"], num_local_experts=4,
                 num_experts_per_tok=2, max_position_embeddings=4096)
  assert interop.config_from_hf(dict(mixtral, sliding_window=None)).rope_theta == 1e6
  assert interop.config_from_hf(dict(mixtral, sliding_window=1024)).sliding_window == 1024
  qwen2 = dict(llama, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
               sliding_window=16)
  assert interop.config_from_hf(dict(qwen2, max_window_layers=0)).sliding_window == 16
  assert interop.config_from_hf(dict(qwen2, use_sliding_window=False)).sliding_window == 0
  with pytest.raises(ValueError, match="mix sliding and full"):
    interop.config_from_hf(dict(qwen2, max_window_layers=1))
  olmoe = dict(llama, architectures=["OlmoeForCausalLM"], num_experts=4, num_experts_per_tok=2)
  assert interop.config_from_hf(olmoe).qk_norm == "full"
  with pytest.raises(ValueError, match="clip_qkv=8"):
    interop.config_from_hf(dict(olmoe, clip_qkv=8.0))
  with pytest.raises(ValueError, match="unknown keys"):
    interop.config_from_hf(llama, not_a_field=1)


def test_export_errors_leave_nothing_on_disk(tmp_path):
  bad = {
      "sigmoid": ModelConfig(n_experts=4, top_k=2, score_fn="sigmoid",
                             routing_order="softmax_topk"),
      "scaling": ModelConfig(n_experts=4, top_k=2, routed_scaling=2.0),
      "ungated shared": ModelConfig(n_experts=4, top_k=2, n_shared_experts=1),
      "dense full qk norm": ModelConfig(qk_norm="full"),
      "bias and head qk norm": ModelConfig(qk_norm="head", qkv_bias=True),
      "qwen2-moe window": ModelConfig(n_experts=4, top_k=2, n_shared_experts=1,
                                      shared_expert_gate=True, sliding_window=8),
      "olmoe dense layer": ModelConfig(n_experts=4, top_k=2, qk_norm="full", first_k_dense=1),
      "groups": ModelConfig(n_experts=4, top_k=2, n_expert_groups=2),
  }
  for name, cfg in bad.items():
    with pytest.raises(ValueError, match="cannot export"):
      interop.save_pretrained(_random_esjax(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists(), name


def test_missing_files_and_tensors(tmp_path):
  cfg = presets.get_preset("tiny-llama", vocab_size=128)
  with pytest.raises(FileNotFoundError, match="config.json"):
    interop.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(interop.config_to_hf(cfg)))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    interop.from_pretrained(tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
    interop.from_pretrained(tmp_path)

  tensors = interop.esjax_to_hf_tensors(cfg, nnx.state(_random_esjax(cfg), nnx.Param))
  missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    interop.hf_to_esjax_params(cfg, missing)
  wrong = dict(tensors, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64))})
  with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(64, 64\), expected \(32, 64\)"):
    interop.hf_to_esjax_params(cfg, wrong)
  extra = dict(tensors, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(64)})
  with pytest.raises(ValueError, match="o_proj.bias"):
    interop.hf_to_esjax_params(cfg, extra)
  with pytest.raises(ValueError, match="missing tensor 'model.layers.2.input_layernorm"):
    interop.hf_to_esjax_params(cfg.replace(n_layers=3), tensors)


def test_load_onto_shardings():
  cfg = presets.get_preset("tiny-llama", vocab_size=128)
  tensors = interop.esjax_to_hf_tensors(cfg, nnx.state(_random_esjax(cfg), nnx.Param))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  spec = jax.sharding.PartitionSpec
  shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, spec()),
                           interop.abstract_params(cfg))
  shardings["embed"] = jax.sharding.NamedSharding(mesh, spec("x", None))
  params = interop.hf_to_esjax_params(cfg, tensors, shardings=shardings)
  assert params["embed"].sharding == shardings["embed"]
  np.testing.assert_array_equal(np.asarray(params["embed"]), tensors["model.embed_tokens.weight"])
