"""Drop-upcycling (Nakamura et al., ICLR 2025): which hidden units each expert re-initializes,
their statistics against the replaced weights (float64 numpy), r = 0 is sparse upcycling
exactly, and the seed decides the sets."""

import jax
import numpy as np
import pytest

from esjax.transforms import build, upcycle
from transforms_testlib import SRC, logits, random_model, rel_err, tokens

DENSE = SRC.replace(d_model=64, d_ff=128, n_layers=2)
MOE = DENSE.replace(n_experts=8, top_k=2, d_ff_expert=128)  # sparse upcycling, F_e = 128


@pytest.fixture(scope="module")
def dense():
  return random_model(DENSE)


def moe_mlps(dense_model, drop, key=1, cfg=MOE):
  params = upcycle.upcycle_params(DENSE, build.params_of(dense_model), cfg,
                                  jax.random.key(key), drop=drop)
  return {i: jax.tree.map(np.asarray, layer["mlp"]) for i, layer in params["layers"].items()}


def redrawn_units(plain, dropped):
  """[N, F_e] bool: the hidden units whose w_gate column differs from plain upcycling (MLP
  dicts, or their w_gate arrays)."""
  if isinstance(plain, dict):
    plain, dropped = plain["w_gate"], dropped["w_gate"]
  return np.any(plain != dropped, axis=1)


def test_zero_drop_is_sparse_upcycling_exactly(dense):
  toks = tokens(DENSE)
  plain = upcycle.upcycle(dense, MOE, jax.random.key(1))
  zero = upcycle.upcycle(dense, MOE, jax.random.key(1), drop=0.0)
  jax.tree.map(np.testing.assert_array_equal, build.params_of(zero), build.params_of(plain))
  assert rel_err(logits(zero, toks), logits(dense, toks)) < 1e-5


@pytest.mark.parametrize("drop", [0.25, 0.5, 1.0])
def test_each_expert_redraws_its_own_fraction_of_hidden_units(dense, drop):
  plain, dropped = moe_mlps(dense, 0.0), moe_mlps(dense, drop)
  want = int(round(drop * MOE.d_ff_expert))
  for i in plain:
    p, d = plain[i], dropped[i]
    units = redrawn_units(p, d)
    assert (units.sum(axis=1) == want).all(), units.sum(axis=1)
    # The same units in all three matrices; everything else is the plain expert, bit for bit.
    np.testing.assert_array_equal(np.any(p["w_up"] != d["w_up"], axis=1), units)
    np.testing.assert_array_equal(np.any(p["w_down"] != d["w_down"], axis=2), units)
    for name, keep in (("w_gate", ~units[:, None, :]), ("w_up", ~units[:, None, :]),
                       ("w_down", ~units[:, :, None])):
      np.testing.assert_array_equal(np.where(keep, d[name], 0), np.where(keep, p[name], 0))
    np.testing.assert_array_equal(d["router"], p["router"])
    if 0 < drop < 1:  # a different set per expert
      assert len({units[e].tobytes() for e in range(MOE.n_experts)}) == MOE.n_experts


def test_redrawn_weights_have_the_replaced_weights_statistics(dense):
  """Per expert and matrix: mean and std of the redrawn entries against those of the entries
  they replaced (float64), within sampling error (64 x 64 = 4096 draws per matrix)."""
  plain, dropped = moe_mlps(dense, 0.0), moe_mlps(dense, 0.5)
  for i in plain:
    units = redrawn_units(plain[i], dropped[i])
    for name, axis in (("w_gate", 1), ("w_up", 1), ("w_down", 2)):
      for e in range(MOE.n_experts):
        sel = np.broadcast_to(np.expand_dims(units[e], axis - 1), plain[i][name][e].shape)
        old = plain[i][name][e][sel].astype(np.float64)
        new = dropped[i][name][e][sel].astype(np.float64)
        assert abs(new.mean() - old.mean()) < 5 * old.std() / np.sqrt(old.size), (i, name, e)
        assert new.std() / old.std() == pytest.approx(1.0, abs=0.07), (i, name, e)
        assert not (new == old).any()  # drawn, not copied


def test_the_seed_decides_the_redrawn_sets(dense):
  a, b, c = moe_mlps(dense, 0.5, key=1), moe_mlps(dense, 0.5, key=1), moe_mlps(dense, 0.5, key=2)
  plain = moe_mlps(dense, 0.0)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(redrawn_units(plain[0], a[0]), redrawn_units(plain[0], c[0]))


@pytest.mark.parametrize("drop", [-0.1, 1.5])
def test_a_drop_outside_0_1_is_refused(dense, drop):
  with pytest.raises(ValueError, match=rf"upcycle: drop={drop} must be in \[0, 1\]"):
    moe_mlps(dense, drop)


def test_init_from_upcycles_with_the_configured_drop(dense):
  """`checkpoint.upcycle_drop` reaches the load-time conversion of a dense checkpoint."""
  from esjax.configs import common  # pylint: disable=g-import-not-at-top
  from esjax.train import init_from  # pylint: disable=g-import-not-at-top
  config = common.base_config()
  config.checkpoint.upcycle_drop = 0.25
  got = init_from.convert(DENSE, build.params_of(dense), MOE, config)
  config.checkpoint.upcycle_drop = 0.0
  plain = init_from.convert(DENSE, build.params_of(dense), MOE, config)
  units = redrawn_units(*(np.asarray(p["layers"][1]["mlp"]["w_gate"]) for p in (plain, got)))
  assert (units.sum(axis=1) == 32).all()
