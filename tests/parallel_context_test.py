"""Ring attention (CP) equals plain causal attention: values and gradients, any order, with
and without a sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esjax.kernels.attention.reference import xla_attention as attend
from esjax.parallel import context, mesh as mesh_lib


@pytest.mark.parametrize("layout,window", [(dict(cp=2, dp=2, tp=2), 0), (dict(cp=4, dp=2), 0),
                                           (dict(cp=8), 0), (dict(cp=4, dp=2), 5)],
                         ids=["cp2-dp2-tp2", "cp4-dp2", "cp8", "cp4-dp2-window5"])
def test_ring_attention_equals_attend(layout, window):
  fm = mesh_lib.make_mesh(mesh_lib.Layout(cp_impl="ring", **layout))
  b, s, h, g, hd = 4, 16, 4, 2, 8
  rng = np.random.default_rng(sum(layout.values()))
  q, w = (jnp.asarray(rng.normal(size=(b, s, h, hd)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, s, g, hd)), jnp.float32) for _ in range(2))
  # Positions in any order (the load-balanced layout permutes them): the mask follows them.
  pos = jnp.asarray(np.stack([rng.permutation(s) for _ in range(b)]), jnp.int32)

  def out_and_grads(fn):
    attend_fn = lambda q, k, v: fn(q, k, v, pos, pos, sliding_window=window)
    grads = jax.grad(lambda q, k, v: jnp.sum(attend_fn(q, k, v) * w), (0, 1, 2))(q, k, v)
    return attend_fn(q, k, v), grads

  want = out_and_grads(attend)
  with mesh_lib.activate(fm):
    got = jax.jit(out_and_grads, static_argnums=0)(context.attention_fn(fm))
  for name, a, e in zip(["o", "dq", "dk", "dv"], [got[0], *got[1]], [want[0], *want[1]]):
    np.testing.assert_allclose(a, e, atol=1e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)
