"""Transforms under jit with output shardings: the target is built sharded over a mesh of the
8 fake CPU devices, each device holding only its shards, with the unsharded numbers."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from esjax.transforms import build, growth, upcycle
from transforms_testlib import SRC, logits, random_model, rel_err, tokens

RULES = {"exp": "model", "embed_moe": "data", "heads": "model", "mlp": "model",
         "vocab": "model", "embed": "data"}


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _check_sharded(model, mesh):
  params = build.params_of(model)
  moe = params["layers"][0]["mlp"]
  assert moe["w_gate"].sharding == NamedSharding(mesh, P("model", "data", None))
  assert {s.data.shape for s in moe["w_gate"].addressable_shards} == {(2, 16, 64)}
  assert params["embed"].sharding == NamedSharding(mesh, P("model", "data"))
  wq = params["layers"][2]["attn"]["wq"]
  assert {s.data.shape for s in wq.addressable_shards} == {(wq.shape[0] // 2, wq.shape[1] // 4, 8)}


def test_upcycle_builds_sharded_and_exact(mesh):
  dense = random_model(SRC.replace(d_ff=64))
  cfg = dense.cfg.replace(n_experts=8, top_k=2, d_ff_expert=64)
  ref = upcycle.upcycle(dense, cfg, jax.random.key(4), router_std=1.0)
  sharded = upcycle.upcycle(dense, cfg, jax.random.key(4), router_std=1.0, mesh=mesh,
                            rules=RULES)
  _check_sharded(sharded, mesh)
  jax.tree.map(np.testing.assert_array_equal, build.params_of(sharded), build.params_of(ref))
  toks = tokens(SRC)
  assert rel_err(logits(sharded, toks), logits(dense, toks)) < 1e-5


def test_each_device_builds_only_its_shards(mesh):
  """Per-device output of the sharded build is a fraction of the whole, with no big temps."""
  dense = random_model(SRC.replace(d_ff=64))
  cfg = dense.cfg.replace(n_experts=8, top_k=2, d_ff_expert=64)
  fn = lambda p, k: upcycle.upcycle_params(dense.cfg, p, cfg, k)  # noqa: E731
  args = (build.params_of(dense), jax.random.key(0))
  whole = build.jit_transform(cfg, fn).lower(*args).compile().memory_analysis()
  shardings = build.target_shardings(cfg, mesh, RULES)
  local = build.jit_transform(cfg, fn, shardings).lower(*args).compile().memory_analysis()
  assert local.output_size_in_bytes < whole.output_size_in_bytes / 4
  assert local.temp_size_in_bytes < local.output_size_in_bytes / 4


def test_grow_then_upcycle_sharded(mesh):
  small = random_model(SRC)
  big = SRC.replace(d_model=64, n_heads=8, d_ff=96, n_layers=4, head_dim=SRC.effective_head_dim)
  grown = growth.grow(small, big, "fpi", mesh=mesh, rules=RULES, zero_new_layers=True)
  wq = build.params_of(grown)["layers"][0]["attn"]["wq"]
  assert wq.sharding == NamedSharding(mesh, P("data", "model", None))
  toks = tokens(SRC)
  assert rel_err(logits(grown, toks), logits(small, toks)) < 1e-5
  moe = upcycle.upcycle(grown, big.replace(n_experts=8, top_k=2, d_ff_expert=96), mesh=mesh,
                        rules=RULES)
  assert build.params_of(moe)["layers"][3]["mlp"]["w_up"].sharding.spec == P("model", "data",
                                                                               None)
  assert rel_err(logits(moe, toks), logits(small, toks)) < 1e-5


def test_transform_with_wrong_shapes_names_the_parameter():
  small = random_model(SRC)
  with pytest.raises(ValueError, match=r"parameter 'embed' has shape \(64, 32\) but the model "
                                       r"expects \(64, 48\)"):
    build.build_model(SRC.replace(d_model=48, head_dim=8), lambda p: p, build.params_of(small))
