"""Scale-Up transforms: FPI exactness, AKI / AKI-Pro's documented changes, depth maps, errors.

The reference is the source model itself: grown logits are compared with the source's on
random tokens (float32, highest matmul precision), norms and biases generic.
"""

import jax
import numpy as np
import pytest

from esjax.transforms import build, growth
from transforms_testlib import (SRC, logits, model_from, random_model, rel_err, tokens,
                                with_params)

HD = SRC.effective_head_dim  # growth keeps head_dim

WIDTH_CASES = {
    "d_model": dict(d_model=64, head_dim=HD),
    "d_ff": dict(d_ff=96),
    "heads": dict(n_heads=8, head_dim=HD),  # r 2 -> 4 inside each of the 2 KV groups
    "kv_groups": dict(n_heads=8, n_kv_heads=4, head_dim=HD),
    "all": dict(d_model=96, d_ff=144, n_heads=12, head_dim=HD),  # x3, r 2 -> 6
}


@pytest.fixture(scope="module")
def source():
  model = random_model(SRC)
  toks = tokens(SRC)
  return model, toks, logits(model, toks)


@pytest.mark.parametrize("case", sorted(WIDTH_CASES))
def test_fpi_width_is_exact_for_integer_ratios(source, case):
  model, toks, ref = source
  tgt = SRC.replace(**WIDTH_CASES[case])
  grown = growth.grow(model, tgt, "fpi")
  assert rel_err(logits(grown, toks), ref) < 1e-5


def test_fpi_any_ffn_and_head_maps_are_exact(source):
  """Only the hidden map must copy uniformly; random ffn / head maps still preserve."""
  model, toks, ref = source
  tgt = SRC.replace(d_model=64, d_ff=80, n_heads=10, n_kv_heads=2, head_dim=HD)
  rnd = growth.width_maps(SRC, tgt, "random", jax.random.key(3))
  maps = growth.WidthMaps(growth.index_map(32, 64), rnd.ffn, rnd.kv_heads, rnd.q_heads)
  assert any((m[48:] != np.arange(48, 80) % 48).any() for m in maps.ffn)  # really random
  params = growth.grow_params(SRC, build.params_of(model), tgt, width="fpi", depth="stack",
                              maps=maps)
  grown = model_from(tgt, params)
  assert rel_err(logits(grown, toks), ref) < 1e-5


def test_fpi_non_uniform_hidden_map_is_approximate(source):
  """x1.5 width (AquilaMoE's 4096 -> 5120 case): RMSNorm statistics change, loss moves."""
  model, toks, ref = source
  err = rel_err(logits(growth.grow(model, SRC.replace(d_model=48, head_dim=HD), "fpi"), toks),
                ref)
  assert 1e-4 < err < 1.0


def test_fpi_tied_embeddings_scale_logits_by_width_ratio():
  src = SRC.replace(tie_embeddings=True)
  model, toks = random_model(src), tokens(src)
  grown = growth.grow(model, src.replace(d_model=64, head_dim=HD), "fpi")
  assert rel_err(logits(grown, toks), 2.0 * logits(model, toks)) < 1e-5


def test_depth_growth_is_the_source_blocks_in_map_order(source):
  """Without zeroing, the grown model applies source block map[i] at depth i."""
  model, toks, _ = source
  tgt = SRC.replace(n_layers=7)
  for how, layer_map in (("interp", [0, 0, 0, 1, 1, 2, 2]), ("stack", [0, 1, 2, 0, 1, 2, 0]),
                         ("stack_top", [0, 1, 2, 0, 1, 2, 2])):
    np.testing.assert_array_equal(growth.depth_map(3, 7, how), layer_map)
    params = growth.grow_params(SRC, build.params_of(model), tgt, width="fpi", depth=how)
    grown = model_from(tgt, params)
    ref = np.asarray(jax.jit(blocks_in_order, static_argnums=2)(model, toks, tuple(layer_map)),
                     np.float64)
    assert rel_err(logits(grown, toks), ref) < 1e-5


def blocks_in_order(model, toks, layer_map):
  x = model.embed_tokens(toks)
  pos = jax.numpy.broadcast_to(jax.numpy.arange(toks.shape[1]), toks.shape)
  for s in layer_map:
    x, _ = model.layers[s](x, pos)
  return model.logits(x)


@pytest.mark.parametrize("method", ["fpi", "fpi_interp"])
def test_depth_with_zeroed_repeats_is_exact(source, method):
  model, toks, ref = source
  tgt = SRC.replace(n_layers=8, d_model=64, n_heads=8, head_dim=HD)
  grown = growth.grow(model, tgt, method, zero_new_layers=True)
  assert rel_err(logits(grown, toks), ref) < 1e-5
  plain = growth.grow(model, tgt, method)
  assert rel_err(logits(plain, toks), ref) > 1e-3


def test_depth_maps():
  np.testing.assert_array_equal(growth.depth_map(3, 6, "interp"), [0, 0, 1, 1, 2, 2])
  m = growth.depth_map(24, 32, "interp")
  np.testing.assert_array_equal(m[:10], [0, 0, 1, 2, 3, 3, 4, 5, 6, 6])
  assert m[0] == 0 and m[-1] == 23 and (np.diff(m) >= 0).all()
  dup = np.flatnonzero(np.bincount(growth.depth_map(32, 40, "interp")) == 2)
  np.testing.assert_array_equal(dup, np.arange(0, 32, 4))
  np.testing.assert_array_equal(growth.depth_map(24, 32, "stack")[-8:], np.arange(8))
  np.testing.assert_array_equal(growth.depth_map(24, 32, "stack_top")[-8:], np.arange(16, 24))


# ----------------------------------------------------------------------------- AKI


AKI_TGT = SRC.replace(d_model=64, d_ff=96, n_heads=6, head_dim=HD)  # r 2 -> 3, G = 2 kept


def _grown_params(model, method, tgt=AKI_TGT):
  return build.params_of(growth.grow(model, tgt, method))


def test_aki_old_slots_and_top_layer_equal_fpi(source):
  model = source[0]
  fpi, aki = _grown_params(model, "fpi"), _grown_params(model, "aki")
  top = SRC.n_layers - 1
  jax.tree.map(np.testing.assert_array_equal, aki["layers"][top], fpi["layers"][top])
  jax.tree.map(np.testing.assert_array_equal, aki["embed"], fpi["embed"])
  r_t, r_s = 3, 2
  for l in range(top):
    a, f = aki["layers"][l], fpi["layers"][l]
    np.testing.assert_array_equal(a["mlp"]["w_up"][:, :48], f["mlp"]["w_up"][:, :48])
    np.testing.assert_array_equal(a["mlp"]["w_down"][:, :32], f["mlp"]["w_down"][:, :32])
    old_heads = [j * r_t + i for j in range(2) for i in range(r_s)]
    np.testing.assert_array_equal(a["attn"]["wq"][:, old_heads], f["attn"]["wq"][:, old_heads])
    np.testing.assert_array_equal(a["attn"]["wk"], f["attn"]["wk"])  # G kept: K/V from layer l
    np.testing.assert_array_equal(a["attn"]["bv"], f["attn"]["bv"])


def test_aki_pro_new_slots_come_from_the_upper_layer(source):
  """New query heads (j, a >= r_s) = layer l+1's head (j, a mod r_s), rows divided by 2."""
  model = source[0]
  src, aki = build.params_of(model), _grown_params(model, "aki_pro")
  for l in range(SRC.n_layers - 1):
    up, a = src["layers"][l + 1], aki["layers"][l]
    for j in range(2):
      new, copied = j * 3 + 2, j * 2 + 0
      np.testing.assert_allclose(a["attn"]["wq"][:32, new], up["attn"]["wq"][:, copied] / 2,
                                 rtol=1e-6)
      np.testing.assert_allclose(a["attn"]["bq"][new], up["attn"]["bq"][copied], rtol=1e-6)
    np.testing.assert_allclose(a["mlp"]["w_gate"][:32, 48:], up["mlp"]["w_gate"] / 2, rtol=1e-6)
    np.testing.assert_allclose(a["mlp"]["w_down"][48:, 32:],
                               up["mlp"]["w_down"][:, :] / 2, rtol=1e-6)


def test_aki_changes_the_function_unless_layers_are_identical(source):
  model, toks, ref = source
  assert rel_err(logits(growth.grow(model, AKI_TGT, "aki"), toks), ref) > 1e-3
  params = build.params_of(model)
  same = {**params, "layers": {l: params["layers"][0] for l in params["layers"]}}
  twin = with_params(model, same)
  twin_ref = logits(twin, toks)
  assert rel_err(logits(growth.grow(twin, AKI_TGT, "aki"), toks), twin_ref) < 1e-5


# ----------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("change, match", [
    (dict(d_model=16, head_dim=HD), "d_model 32 -> 16 shrinks"),
    (dict(n_layers=2), "n_layers 3 -> 2 shrinks"),
    (dict(d_model=64), "head_dim 8 -> 16"),
    (dict(n_heads=8, n_kv_heads=8, head_dim=HD), "breaks GQA"),
    (dict(vocab_size=128), "vocab_size 64 -> 128"),
    (dict(n_experts=4), "must be dense"),
])
def test_bad_growth_requests_raise(source, change, match):
  with pytest.raises(ValueError, match=match):
    growth.grow(source[0], SRC.replace(**change), "fpi")


def test_bad_method_raises(source):
  with pytest.raises(ValueError, match="method='bert'"):
    growth.grow(source[0], AKI_TGT, "bert")
