"""Load-time conversion (`checkpoint.init_from`): the plan from two configs, and the converted
parameters of grow-then-upcycle against the source model's logits, built sharded."""

import jax
import pytest
from jax.sharding import AxisType

from esjax.transforms import build, online
from transforms_testlib import SRC, logits, random_model, rel_err, tokens, with_params

BIG = SRC.replace(d_model=64, n_heads=8, d_ff=96, n_layers=6, head_dim=SRC.head_dim_)
MOE = BIG.replace(n_experts=8, top_k=2, router_init_std=0.5)


@pytest.mark.parametrize("src, dst, steps", [
    (SRC, SRC.replace(norm_eps=1e-6), ()),
    (SRC, BIG, ("grow",)),
    (BIG, MOE, ("upcycle",)),
    (SRC, MOE, ("grow", "upcycle")),
    (MOE, MOE.replace(aux_loss_coef=0.01), ()),
])
def test_plan(src, dst, steps):
  assert online.plan(src, dst) == steps


def test_plan_refuses_moe_sources():
  with pytest.raises(ValueError, match="MoE checkpoint"):
    online.plan(MOE, MOE.replace(n_experts=16))


def test_grow_then_upcycle_preserves_logits_sharded():
  model, toks = random_model(SRC), tokens(SRC)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  shardings = build.target_shardings(MOE, mesh, {"exp": "model", "heads": "model",
                                                 "mlp": "model"})
  params = online.convert(SRC, build.params_of(model), MOE, grow="fpi_interp",
                          zero_new_layers=True, shardings=shardings)
  assert params["layers"][5]["mlp"]["w_gate"].sharding.spec[0] == "model"
  moe = with_params(random_model(MOE), jax.device_get(params))
  assert rel_err(logits(moe, toks), logits(model, toks)) < 1e-5
  aki = online.convert(SRC, build.params_of(model), MOE)  # aki_pro: changes the function
  assert rel_err(logits(with_params(moe, aki), toks), logits(model, toks)) > 1e-3
