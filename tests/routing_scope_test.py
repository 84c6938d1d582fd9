"""capacity_scope / balance_scope = "rank": each data-parallel rank routes, drops and balances
its own tokens (Megatron's semantics). The reference is the one-device layer run on each
rank's share of the batch separately."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from esjax.models.config import ModelConfig
from esjax.models.moe import routing_for
from esjax.routing import expert_parallel
from esjax.sharding.layout import Layout
from esjax.sharding.plan import ParallelPlan, make_plan

CFG = ModelConfig(d_model=16, d_ff=32, n_heads=2, n_kv_heads=2, n_experts=8, top_k=2,
                  capacity_factor=1.0, capacity_scope="rank", balance_scope="rank",
                  moe_block_size=4)


def layer(cfg, plan, x, w):
  return expert_parallel.routed_experts(x, *w, cfg=cfg, plan=plan,
                                        route=functools.partial(routing_for, cfg))


@pytest.mark.parametrize("ep", [1, 4], ids=["ep1", "ep4"])
def test_rank_scope_equals_each_rank_on_its_own(ep):
  dp = 4
  plan = make_plan(Layout(dp=dp, ep=ep, etp=1), jax.devices()[:dp])
  rng = np.random.default_rng(0)
  d, e, f = CFG.d_model, CFG.n_experts, CFG.d_ff
  x = jnp.asarray(rng.normal(size=(8, 6, d)), jnp.float32)
  w = tuple(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
            for s in ((d, e), (e, d, f), (e, d, f), (e, f, d)))
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def objective(fn, x, w):
    y, stats = fn(x, w)
    return jnp.sum(y * ct) + stats["aux_loss"], (y, stats)

  def sharded(x, w):
    ep_axes = plan.ep
    specs = (P(plan.dp), (P(), P(ep_axes), P(ep_axes), P(ep_axes)))
    return jax.shard_map(lambda x, w: layer(CFG, plan, x, w), mesh=plan.mesh,
                         in_specs=specs, out_specs=(P(plan.dp), P()))(x, w)

  def per_rank(x, w):  # each rank's 2 sequences alone, on one device
    single = ParallelPlan.single()
    outs = [layer(CFG, single, x[i * 2:(i + 1) * 2], w) for i in range(dp)]
    y = jnp.concatenate([o[0] for o in outs])
    stats = jax.tree.map(lambda *s: sum(s) / dp, *[o[1] for o in outs])
    return y, stats

  got = jax.jit(jax.value_and_grad(functools.partial(objective, sharded), (0, 1),
                                   has_aux=True))(x, w)
  want = jax.jit(jax.value_and_grad(functools.partial(objective, per_rank), (0, 1),
                                    has_aux=True))(x, w)
  (_, (y_got, s_got)), g_got = got
  (_, (y_want, s_want)), g_want = want
  np.testing.assert_allclose(y_got, y_want, rtol=1e-5, atol=1e-6)
  for k in ("aux_loss", "drop_fraction"):
    np.testing.assert_allclose(s_got[k], s_want[k], rtol=1e-5, err_msg=k)
  assert float(s_want["drop_fraction"]) > 0.05  # capacity per rank drops something
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rank_scope_differs_from_batch_scope():
  """The two scopes are different functions (else the test above proves nothing)."""
  plan = make_plan(Layout(dp=4), jax.devices()[:4])
  rng = np.random.default_rng(1)
  d, e, f = CFG.d_model, CFG.n_experts, CFG.d_ff
  x = jnp.asarray(rng.normal(size=(8, 6, d)), jnp.float32)
  w = tuple(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
            for s in ((d, e), (e, d, f), (e, d, f), (e, f, d)))

  def run(cfg):
    return jax.jit(jax.shard_map(lambda x, w: layer(cfg, plan, x, w), mesh=plan.mesh,
                                 in_specs=(P(plan.dp), P()), out_specs=(P(plan.dp), P())))(x, w)

  rank, batch = run(CFG), run(CFG.replace(capacity_scope="batch", balance_scope="batch"))
  assert not np.allclose(rank[0], batch[0]) or not np.allclose(rank[1]["aux_loss"],
                                                               batch[1]["aux_loss"])
