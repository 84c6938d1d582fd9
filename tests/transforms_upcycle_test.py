"""Scale-Out transforms: sparse, virtual-group and shared-expert upcycling against the dense
model's logits (the reference), the output-scale rule, the layout, and bad requests."""

import jax
import numpy as np
import pytest

from esjax.transforms import build, upcycle
from transforms_testlib import SRC, forward, logits, random_model, rel_err, tokens, with_params

DENSE = SRC.replace(d_ff=64)


@pytest.fixture(scope="module")
def dense():
  model = random_model(DENSE)
  toks = tokens(DENSE)
  return model, toks, logits(model, toks)


def moe_cfg(n, g, k, **kw):
  return DENSE.replace(n_experts=n, d_ff_expert=DENSE.d_ff // g, top_k=k, **kw)


@pytest.mark.parametrize("n, g, k, extra", [
    (8, 1, 2, {}),  # E8G1T2: AquilaMoE / Mixtral sparse upcycling
    (8, 1, 2, dict(moe_every=2, first_k_dense=1)),  # Sparse Upcycling: odd layers only
    pytest.param(8, 1, 2, dict(capacity_factor=4.0),  # capacity T*k/E*4 >= T*k/2: no drops
                 marks=pytest.mark.slow),
    (8, 2, 2, {}),  # E4G2T2 virtual groups
    pytest.param(8, 4, 8, {}, marks=pytest.mark.slow),  # E2G4T8 (every expert chosen)
    (16, 4, 8, {}),  # E4G4T8: half of the 16 experts per token, groups of 4
])
def test_topk_softmax_is_exact_for_any_router(dense, n, g, k, extra):
  model, toks, ref = dense
  cfg = moe_cfg(n, g, k, **extra)
  moe = upcycle.upcycle(model, cfg, jax.random.key(1), router_std=1.0)
  assert rel_err(logits(moe, toks), ref) < 1e-5
  loads = np.asarray(forward(moe, toks)[1]["expert_load"])
  assert (loads > 0).sum() > k  # the router really spreads tokens over several groups


@pytest.mark.parametrize("n, g, k", [(8, 1, 2), pytest.param(8, 2, 2, marks=pytest.mark.slow),
                                     (8, 2, 4)])
def test_softmax_topk_exact_when_router_logits_are_equal(dense, n, g, k):
  model, toks, ref = dense
  cfg = moe_cfg(n, g, k, routing_order="softmax_topk")
  moe = upcycle.upcycle(model, cfg, router_std=0.0)
  assert rel_err(logits(moe, toks), ref) < 1e-5
  approx = upcycle.upcycle(model, cfg, jax.random.key(1), router_std=1.0)
  assert rel_err(logits(approx, toks), ref) > 1e-4  # approximate with a real router


def test_output_scale_matches_the_paper():
  """methods.md 5.3: s = G (top-k then softmax), E*G^2/T (softmax then top-k)."""
  big = DENSE.replace(d_ff=512)
  for n, g, k, order, s in [(64, 8, 8, "softmax_topk", 64), (8, 1, 2, "softmax_topk", 4),
                            (8, 1, 1, "softmax_topk", 8), (64, 8, 8, "topk_softmax", 8),
                            (8, 1, 2, "topk_softmax", 1)]:
    cfg = big.replace(n_experts=n, d_ff_expert=512 // g, top_k=k, routing_order=order)
    assert upcycle.granularity(big, cfg) == g
    assert upcycle.output_scale(cfg, g) == pytest.approx(s)


def test_balanced_scale_is_inexact_for_swiglu_but_down_is_exact(dense):
  model, toks, ref = dense
  cfg = moe_cfg(8, 2, 2)
  down = upcycle.upcycle(model, cfg, router_std=1.0)
  balanced = upcycle.upcycle(model, cfg, router_std=1.0, scale_placement="balanced")
  assert rel_err(logits(down, toks), ref) < 1e-5
  assert rel_err(logits(balanced, toks), ref) > 1e-3
  p = build.params_of(balanced)["layers"][0]["mlp"]
  d = build.params_of(model)["layers"][0]["mlp"]
  np.testing.assert_allclose(p["w_up"][1], d["w_up"][:, 32:] * 2 ** (1 / 3), rtol=1e-6)


def test_virtual_group_layout(dense):
  """Expert e holds shard e mod G; router columns tied in groups of G consecutive experts."""
  model = dense[0]
  cfg = moe_cfg(8, 4, 4)
  p = build.params_of(upcycle.upcycle(model, cfg, jax.random.key(2)))["layers"][1]["mlp"]
  d = build.params_of(model)["layers"][1]["mlp"]
  for e in range(8):
    s = e % 4
    np.testing.assert_array_equal(p["w_gate"][e], d["w_gate"][:, 16 * s:16 * (s + 1)])
    np.testing.assert_allclose(p["w_down"][e], d["w_down"][16 * s:16 * (s + 1)] * 4, rtol=1e-6)
    np.testing.assert_array_equal(p["router"][:, e], p["router"][:, 4 * (e // 4)])
  assert not np.allclose(p["router"][:, 0], p["router"][:, 4])
  assert abs(float(np.std(p["router"])) - cfg.router_init_std) < 0.3 * cfg.router_init_std


def test_untied_router_rows_break_granular_upcycling(dense):
  """Without virtual groups top-k can pick two copies of one shard (methods.md 5.4-3)."""
  model, toks, ref = dense
  cfg = moe_cfg(8, 2, 2)
  moe = upcycle.upcycle(model, cfg, router_std=1.0)
  params = build.params_of(moe)
  for i, layer in params["layers"].items():
    layer["mlp"]["router"] = jax.random.normal(jax.random.key(i), layer["mlp"]["router"].shape)
  assert rel_err(logits(with_params(moe, params), toks), ref) > 1e-3


@pytest.mark.parametrize("order, std", [("topk_softmax", 1.0), ("softmax_topk", 0.0)])
def test_shared_expert_upcycling_is_exact(dense, order, std):
  """Qwen2-MoE style: shared expert = first 32 hidden units (gated), 8 routed of 16 (G=2)."""
  model, toks, ref = dense
  cfg = DENSE.replace(n_experts=8, top_k=4, d_ff_expert=16, n_shared_experts=1,
                      d_ff_shared=32, shared_expert_gate=True, first_k_dense=1,
                      routing_order=order)
  assert upcycle.granularity(DENSE, cfg) == 2
  moe = upcycle.upcycle(model, cfg, jax.random.key(3), router_std=std)
  assert rel_err(logits(moe, toks), ref) < 1e-5


@pytest.mark.parametrize("cfg, match", [
    (moe_cfg(8, 1, 2).replace(d_ff_expert=24), "d_ff_expert=24 must divide"),
    (moe_cfg(6, 4, 4), "n_experts=6 must be a multiple of the granularity G=4"),
    (moe_cfg(8, 2, 3), "top_k=3 must be a multiple of the granularity G=2"),
    (moe_cfg(8, 1, 2).replace(d_model=64), "d_model 32 -> 64 differs"),
    (DENSE, "must be an MoE"),
    (moe_cfg(8, 1, 2, n_shared_experts=1, d_ff_shared=64), "routed experts need the rest"),
])
def test_bad_upcycle_requests_raise(dense, cfg, match):
  with pytest.raises(ValueError, match=match):
    upcycle.upcycle(dense[0], cfg)


def test_bad_scale_placement_raises(dense):
  with pytest.raises(ValueError, match="scale_placement='cube'"):
    upcycle.upcycle(dense[0], moe_cfg(8, 2, 2), scale_placement="cube")


def test_moe_source_raises(dense):
  moe = upcycle.upcycle(dense[0], moe_cfg(8, 1, 2))
  with pytest.raises(ValueError, match="source must be dense"):
    upcycle.upcycle(moe, moe_cfg(8, 1, 2))
