"""Folded meshes: both views against Megatron's rank layout, the rules, and layout errors."""

import itertools

import jax
import numpy as np
import pytest

from esjax.models.presets import get_preset
from esjax.parallel import rules as rules_lib
from esjax.sharding.layout import Layout, LayoutError, check_model
from esjax.sharding.plan import make_plan


def megatron_groups(sizes: dict[str, int], order: str, masked: str) -> list[list[int]]:
  """RankGenerator groups: ranks that vary only the `masked` axes (order fastest first)."""
  names = order.split("-")
  groups = {}
  for coords in itertools.product(*[range(sizes[n]) for n in reversed(names)]):
    c = dict(zip(reversed(names), coords))
    rank, stride = 0, 1
    for n in names:
      rank += c[n] * stride
      stride *= sizes[n]
    key = tuple(c[n] for n in names if n not in masked.split("-"))
    groups.setdefault(key, []).append(rank)
  return sorted(sorted(g) for g in groups.values())


def view_groups(view: np.ndarray, axis: int) -> list[list[int]]:
  moved = np.moveaxis(view, axis, -1)
  return sorted(sorted(g) for g in moved.reshape(-1, moved.shape[-1]).tolist())


FOLDED = [  # (pp, dp, cp, tp, ep, etp)
    (1, 8, 1, 1, 8, 1), (1, 2, 1, 4, 8, 1), (1, 2, 2, 2, 4, 1), (1, 4, 1, 2, 2, 2),
    (1, 2, 1, 4, 2, 4), (1, 8, 1, 1, 4, 2), (2, 1, 2, 2, 4, 1), (2, 2, 2, 1, 4, 1),
    (1, 4, 2, 1, 8, 1), (1, 1, 1, 8, 2, 4),
]


@pytest.mark.parametrize("pp,dp,cp,tp,ep,etp", FOLDED)
def test_views_match_megatron_rank_groups(pp, dp, cp, tp, ep, etp):
  fm = make_plan(Layout(pp=pp, dp=dp, cp=cp, tp=tp, ep=ep, etp=etp))
  edp = fm.layout.edp
  attn = fm.view(("dp", "cp", "tp"))
  moe = fm.view(("edp", "ep", "etp"))
  world = np.arange(8)
  np.testing.assert_array_equal(np.sort(attn.ravel()), world)
  # Megatron: decoder order tp-cp-dp-pp, expert order tp-ep-dp-pp (fastest first).
  dec = dict(tp=tp, cp=cp, dp=dp, pp=pp)
  exp = dict(tp=etp, ep=ep, dp=edp, pp=pp)
  for i, name in enumerate(("dp", "cp", "tp"), start=1):
    assert view_groups(attn, i) == megatron_groups(dec, "tp-cp-dp-pp", name), name
  for i, (name, tok) in enumerate((("edp", "dp"), ("ep", "ep"), ("etp", "tp")), start=1):
    assert view_groups(moe, i) == megatron_groups(exp, "tp-ep-dp-pp", tok), name
  assert view_groups(attn, 0) == megatron_groups(dec, "tp-cp-dp-pp", "pp")
  # Same devices per stage in both views (the only coupling Megatron asserts).
  for s in range(pp):
    assert sorted(attn[s].ravel()) == sorted(moe[s].ravel())


def test_folded_axis_names():
  fm = make_plan(Layout(dp=2, tp=4, ep=2, etp=2))
  assert fm.mesh.axis_names == ("pp", "dp_edp", "tp_ep", "tp_etp")
  assert fm.axes("tp") == ("tp_ep", "tp_etp")
  assert fm.axes("ep") == ("tp_ep",)
  assert fm.axes("edp") == ("dp_edp",)
  assert fm.axes("cp") == ()
  assert fm.layout.edp == 2


def test_rules_per_layer_type():
  cfg = get_preset("tiny-mixtral")  # 4 heads, 2 kv heads
  plan = make_plan(Layout(dp=2, tp=4, ep=8, etp=1, fsdp=True))
  r = dict(rules_lib.logical_rules(plan, cfg))
  assert r["heads"] == ("tp_ep",) and r["kv_heads"] is None  # kv=2 < tp=4: replicated
  assert r["exp"] == ("dp_ep", "tp_ep") and r["mlp_moe"] is None
  assert r["embed"] == ("dp_ep",) and r["embed_moe"] is None  # edp = 1
  specs = rules_lib.model_specs(plan, cfg)
  assert specs["layers"][0]["mlp"]["w_gate"] == jax.sharding.PartitionSpec(
      ("dp_ep", "tp_ep"), None, None)
  assert specs["layers"][0]["attn"]["wq"] == jax.sharding.PartitionSpec(
      "dp_ep", "tp_ep", None)


@pytest.mark.parametrize("kw,match", [
    (dict(dp=3, tp=2), r"pp\*dp\*cp\*tp = 1\*3\*1\*2 = 6 != 8 devices"),
    (dict(tp=2, cp=3), r"8 devices are not divisible by pp\*cp\*tp = 1\*3\*2 = 6"),
    (dict(dp=8, ep=16), r"etp\*ep = 1\*16 = 16"),
    (dict(dp=8, ep=3), r"not divisible by etp\*ep = 1\*3 = 3"),
    (dict(dp=8, cp_impl="ulysses"), r"cp_impl='ulysses'"),
    (dict(dp=8, tp=0), r"parallel.tp=0 must be >= 1"),
    (dict(dp=4, pp=2, schedule="interleaved"), r"needs parallel.virtual_stages >= 2"),
    (dict(dp=8, fsdp=True, distributed_optimizer=True), r"set one of them"),
])
def test_bad_layouts_fail_at_start(kw, match):
  with pytest.raises(LayoutError, match=match):
    make_plan(Layout(**kw), jax.devices())


def test_layouts_that_do_not_nest_name_their_sizes():
  # 12 devices: tp=3 cannot fold with etp=2 (cumulative sizes 3 and 2 are not a chain).
  with pytest.raises(LayoutError, match=r"tp=3.*etp=2.*\[3, 12\] and \[2, 12\]"):
    Layout(dp=4, tp=3, ep=6, etp=2).resolve(12)


@pytest.mark.parametrize("kw,shape,match", [
    (dict(dp=2, tp=4), {}, None),
    (dict(dp=1, tp=8), {}, r"n_heads=4 is not divisible by tp=8"),
    (dict(dp=1, tp=8, ep=1, etp=1), dict(n_heads=8, n_kv_heads=8, d_ff=256),
     None),
    (dict(dp=2, tp=4), dict(n_heads=12, n_kv_heads=3, head_dim=16), r"n_kv_heads=3 and tp=4"),
    (dict(dp=2, ep=4, tp=4, etp=1), dict(n_experts=6, top_k=2), r"n_experts=6 .* ep=4"),
    (dict(dp=2, pp=4), {}, r"n_layers=2 is not divisible by pp\*virtual_stages = 4\*1"),
    (dict(dp=4, pp=2), dict(n_layers=4, first_k_dense=1), r"same layer kinds"),
    (dict(dp=4, pp=2, schedule="interleaved", virtual_stages=2, microbatches=3),
     dict(n_layers=4), r"microbatches=3 to be a multiple of pp=2"),
    (dict(dp=8, ep=2, etp=4), dict(d_ff=130), r"d_ff_expert=130 is not divisible by etp=4"),
])
def test_layout_vs_model(kw, shape, match):
  cfg = get_preset("tiny-mixtral", **shape)
  layout = Layout(**kw).resolve(8)
  if match is None:
    check_model(layout, cfg, seq_len=32, batch=8)
  else:
    with pytest.raises(LayoutError, match=match):
      check_model(layout, cfg)


def test_sequence_and_batch_checks():
  cfg = get_preset("tiny-mixtral")
  with pytest.raises(LayoutError, match=r"sequence length 12 is not divisible by 2\*cp\*tp = 8"):
    check_model(Layout(dp=2, cp=2, tp=2).resolve(8), cfg, seq_len=12)
  with pytest.raises(LayoutError, match=r"batch 6 is not divisible by dp\*microbatches = 2\*2"):
    check_model(Layout(dp=2, tp=4, microbatches=2).resolve(8), cfg, batch=6)


def test_from_config_rejects_unknown_keys():
  assert Layout.from_config({"dp": 2, "tp": 4}).tp == 4
  with pytest.raises(LayoutError, match=r"unknown keys \['tensor'\]"):
    Layout.from_config({"tensor": 4})
