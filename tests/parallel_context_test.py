"""Context-parallel attention equals plain causal attention: values and q/k/v gradients, for
positions in any order, with and without a sliding window. Both CP implementations run in a
shard_map where the cp axes are manual (as inside the train step)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from esjax.kernels.attention.reference import xla_attention as attend
from esjax.models import context_parallel
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan


@pytest.mark.parametrize("impl", ["ring", "allgather"])
@pytest.mark.parametrize("layout,window", [(dict(cp=2, dp=2, tp=2), 0), (dict(cp=4, dp=2), 0),
                                           (dict(cp=8), 0), (dict(cp=4, dp=2), 5)],
                         ids=["cp2-dp2-tp2", "cp4-dp2", "cp8", "cp4-dp2-window5"])
def test_cp_attention_equals_attend(layout, window, impl):
  plan = make_plan(Layout(cp_impl=impl, **layout))
  b, s, h, g, hd = 4, 16, 4, 2, 8
  rng = np.random.default_rng(sum(layout.values()))
  q, w = (jnp.asarray(rng.normal(size=(b, s, h, hd)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, s, g, hd)), jnp.float32) for _ in range(2))
  # Positions in any order (the load-balanced layout permutes them): the mask follows them.
  pos = jnp.asarray(np.stack([rng.permutation(s) for _ in range(b)]), jnp.int32)

  def local(q, k, v, q_pos, k_pos):
    if impl == "ring":
      return context_parallel.ring_attend(q, k, v, q_pos, k_pos, plan.cp, plan.layout.cp,
                                          sliding_window=window)
    fn = functools.partial(attend, sliding_window=window)
    return context_parallel.allgather_attend(fn, q, k, v, q_pos, k_pos, plan.cp)

  seq4, seq2 = P(None, plan.cp, None, None), P(None, plan.cp)
  sharded = jax.shard_map(local, mesh=plan.mesh, in_specs=(seq4, seq4, seq4, seq2, seq2),
                          out_specs=seq4)

  def out_and_grads(fn):
    attend_fn = lambda q, k, v: fn(q, k, v, pos, pos)  # noqa: E731
    grads = jax.grad(lambda q, k, v: jnp.sum(attend_fn(q, k, v) * w), (0, 1, 2))(q, k, v)
    return attend_fn(q, k, v), grads

  want = out_and_grads(functools.partial(attend, sliding_window=window))
  got = jax.jit(lambda: out_and_grads(sharded))()
  for name, a, e in zip(["o", "dq", "dk", "dv"], [got[0], *got[1]], [want[0], *want[1]]):
    np.testing.assert_allclose(a, e, atol=1e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)
