"""Load-time conversion (`checkpoint.init_from`): the plan from two configs, and the converted
parameters of grow-then-upcycle against the source model's logits, built sharded."""

import jax
import pytest
from jax.sharding import AxisType

from esjax.transforms import build, online
from transforms_testlib import SRC, logits, model_from, random_model, rel_err, tokens, with_params

BIG = SRC.replace(d_model=64, n_heads=8, d_ff=96, n_layers=6, head_dim=SRC.effective_head_dim)
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
  moe = model_from(MOE, jax.device_get(params))
  assert rel_err(logits(moe, toks), logits(model, toks)) < 1e-5
  aki = online.convert(SRC, build.params_of(model), MOE)  # aki_pro: changes the function
  assert rel_err(logits(with_params(moe, aki), toks), logits(model, toks)) > 1e-3


@pytest.mark.parametrize("parallel", [
    pytest.param(dict(dp=1), id="one-device", marks=pytest.mark.slow),
    pytest.param(dict(dp=4, tp=2, ep=8, etp=1, fsdp=True), id="dp4-tp2-ep8-fsdp")])
def test_online_upcycling_end_to_end(tmp_path, parallel):
  """Tiny dense run -> MoE run with init_from: the MoE's first loss is the dense model's loss
  on the same batch (top-k then softmax upcycling is exact; no aux losses in the CE). On a
  mesh the dense checkpoint is read sharded and upcycled into the MoE's shardings."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from esjax.data import dataset  # pylint: disable=g-import-not-at-top
  from esjax.models import loss  # pylint: disable=g-import-not-at-top
  from esjax.train import checkpoint, loop, metrics  # pylint: disable=g-import-not-at-top
  from experiments.efficientscale import recipe  # pylint: disable=g-import-not-at-top

  def tiny(stage, steps):
    c = recipe.stage_config(stage, root=str(tmp_path), steps=steps)
    c.data.max_bytes = 150_000
    c.train.update(log_every=1, eval_every=0, seq_len=32, batch_size=4)
    return c

  dense = tiny("scaleup", 2)
  dense.parallel.dp = 1
  dense.checkpoint.init_from = ""
  loop.train_and_evaluate(dense, str(tmp_path / "scaleup"))
  moe = tiny("scaleout", 1)
  moe.parallel.update(parallel)
  loop.train_and_evaluate(moe, str(tmp_path / "scaleout"))
  first = metrics.read_metrics(str(tmp_path / "scaleout"))[0]
  assert first["step"] == 1

  src_cfg, params = checkpoint.restore_params(str(tmp_path / "scaleup"))
  data = dataset.build(moe.data, moe.train.seq_len, moe.train.batch_size, moe.train.seed, 1)
  dense_model = build.build_model(src_cfg, lambda p: p, params)
  ref = loss.lm_loss(dense_model, jax.device_put(data.train.batch(0)))[1]["ce_loss"]
  np.testing.assert_allclose(first["ce_loss"], float(ref), rtol=1e-5)


def test_source_is_read_sharded_where_the_rules_divide_it():
  from esjax.sharding.layout import Layout  # pylint: disable=g-import-not-at-top
  from esjax.sharding.plan import make_plan  # pylint: disable=g-import-not-at-top
  from esjax.train import init_from  # pylint: disable=g-import-not-at-top
  src = SRC.replace(n_heads=4, n_kv_heads=2)  # 4 query heads: tp=8 cannot split them
  plan = make_plan(Layout(tp=8), jax.devices()[:8])
  target = init_from.source_shardings(src, plan)
  assert target["layers"][0]["attn"]["wq"].spec == jax.sharding.PartitionSpec(
      None, None, None)  # heads 4 % 8: replicated
  vocab = target["embed"].spec[0]  # 64 divides: split over tp
  vocab = (vocab,) if isinstance(vocab, str) else tuple(vocab)
  assert vocab == tuple(plan.tp)


@pytest.mark.parametrize("order", ["topk_softmax", "softmax_topk"])
def test_config_chooses_the_upcycling_scale_placement(order):
  """checkpoint.upcycle_scale reaches the upcycling. "balanced" against Megatron-LM's
  upcycling_utils._convert_to_moe_state_dict (d98e8a6) for silu + GLU: activation scale
  a = G (top-k then softmax) or R * G * G / topk (pre-softmax, R = E / G), weight scale
  a^(1/3) on fc1 (gate and up) and fc2 (down), expert e holding shard e % G."""
  from esjax.configs import common  # pylint: disable=g-import-not-at-top
  from esjax.train import init_from  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  n, g, k = 8, 2, 2
  dst = SRC.replace(n_experts=n, d_ff_expert=SRC.d_ff // g, top_k=k, routing_order=order)
  dense = build.params_of(random_model(SRC))
  config = common.base_config()
  out = {}
  for placement in ("down", "balanced"):
    config.checkpoint.upcycle_scale = placement
    out[placement] = jax.device_get(init_from.convert(SRC, dense, dst, config))
  r = n // g  # Megatron's expansion rate
  a = g if order == "topk_softmax" else r * g * g / k
  s = a ** (1 / 3)
  fe = SRC.d_ff // g
  for i in (0, 2):
    d, moe = dense["layers"][i]["mlp"], out["balanced"]["layers"][i]["mlp"]
    for e in range(n):
      shard = slice((e % g) * fe, (e % g + 1) * fe)
      np.testing.assert_allclose(moe["w_gate"][e], np.asarray(d["w_gate"])[:, shard] * s,
                                 rtol=1e-6)
      np.testing.assert_allclose(moe["w_up"][e], np.asarray(d["w_up"])[:, shard] * s,
                                 rtol=1e-6)
      np.testing.assert_allclose(moe["w_down"][e], np.asarray(d["w_down"])[shard] * s,
                                 rtol=1e-6)
    down = out["down"]["layers"][i]["mlp"]
    np.testing.assert_allclose(down["w_down"][1], np.asarray(d["w_down"])[fe:] * a, rtol=1e-6)
    np.testing.assert_allclose(down["w_gate"][1], np.asarray(d["w_gate"])[:, fe:], rtol=1e-6)
  config.checkpoint.upcycle_scale = "cube"
  with pytest.raises(ValueError, match="scale_placement='cube'"):
    init_from.convert(SRC, dense, dst, config)
