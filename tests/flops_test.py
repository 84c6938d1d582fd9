"""Compute ledger: FLOPs per token against Megatron's worked numbers and XLA's own count, and
the AquilaMoE Table 6 savings factors from the paper's inputs."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from esjax.models import ModelConfig, Transformer
from esjax.models.presets import PRESETS
from esjax.train import flops


def test_megatron_worked_numbers():
  """megatron.md 6.2: Mixtral-8x22B 242.2 and Qwen2-57B-A14B 84.7 GFLOP/token at s=4096."""
  mixtral = PRESETS["mixtral-8x22b"].replace(vocab_size=32000)
  assert flops.flops_per_token(mixtral, 4096) / 1e9 == pytest.approx(242.2, abs=0.05)
  b = flops.flops_breakdown(mixtral, 4096)
  assert b["mlp"] / 1e9 == pytest.approx(202.9, abs=0.05)
  assert b["core_attn"] / 1e9 == pytest.approx(8.5, abs=0.05)
  qwen = PRESETS["qwen2-57b-a14b"]
  assert flops.flops_per_token(qwen, 4096) / 1e9 == pytest.approx(84.7, abs=0.05)


@pytest.mark.parametrize("moe", [False, True])
def test_forward_flops_match_xla_cost_analysis(moe):
  """XLA counts the compiled forward: our model computes the full S x S attention (twice the
  causal count) and, padded to capacity 1.0, exactly top_k expert rows per token."""
  cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=512)
  if moe:
    cfg = cfg.replace(n_experts=4, top_k=2, capacity_factor=1.0, pad_to_capacity=True)
  graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  b, s = 2, 128
  fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])
  xla = fwd.lower(state, jnp.zeros((b, s), jnp.int32)).compile().cost_analysis()["flops"]
  parts = flops.flops_breakdown(cfg, s, training=False)
  ours = (sum(parts.values()) + parts["core_attn"]) * b * s
  assert ours == pytest.approx(xla, rel=0.02)  # the rest: norms, softmax, SiLU (elementwise)
  assert flops.flops_per_token(cfg, s) == pytest.approx(3 * flops.flops_per_token(cfg, s, False))


def table6_stages():
  """AquilaMoE Table 6 (methods.md 3.6): tokens in B, rates in B tokens/day, peak per device."""
  day = 86400.0
  return [
      flops.Stage.from_rate("preparation", 3600, 279 / day, devices=480, peak_flops=989.5),
      flops.Stage.from_rate("scale-up", 1200, 70 / day, devices=1024, peak_flops=240),
      flops.Stage.from_rate("scale-out", 545, 25 / day, devices=1024, peak_flops=240),
  ]


def test_aquilamoe_table6_savings():
  stages = table6_stages()
  scratch = flops.scratch_stage(stages)
  assert scratch.tokens == 5345 and scratch.devices == 1024
  day = 86400.0
  assert scratch.cluster_flops / day == pytest.approx(52_543_488, rel=1e-9)
  assert sum(s.cluster_flops for s in stages) / day == pytest.approx(15_699_113, abs=1)
  sv = flops.savings(stages)
  assert round(sv["time"], 2) == 4.12
  assert round(sv["compute"], 2) == 3.35


def test_ledger_roundtrip_and_model_flops(tmp_path):
  dense, moe = PRESETS["tiny-llama"], PRESETS["tiny-mixtral"]
  stages = [flops.Stage.measured("dense", dense, 64, 1000, 2.0),
            flops.Stage.measured("moe", moe, 64, 500, 2.0)]
  ledger = flops.Ledger(stages)
  scratch = flops.Stage.measured("scratch", moe, 64, 1500, 5.0)
  path = tmp_path / "ledger.json"
  ledger.save(str(path), scratch)
  assert flops.Ledger.load(str(path)).stages == stages
  sv = ledger.summary(scratch)["savings"]
  assert sv["time"] == pytest.approx(5.0 / 4.0)
  f_d, f_m = flops.flops_per_token(dense, 64), flops.flops_per_token(moe, 64)
  assert sv["model_flops"] == pytest.approx(1500 * f_m / (1000 * f_d + 500 * f_m))
