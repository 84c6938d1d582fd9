"""SwiGLU MLP: down(silu(x @ gate) * (x @ up)), tensor parallel as in Megatron.

Under a plan with tp > 1 the input is the sequence-parallel residual shard [B, S/tp, D]: it is
all-gathered over tp along the sequence, gate/up are column-parallel (F/tp local columns),
down is row-parallel, and the partial sums are reduce-scattered back to [B, S/tp, D].
"""

from __future__ import annotations

import jax
from flax import nnx

from esjax.models import layers
from esjax.sharding import collectives as col
from esjax.sharding.plan import ParallelPlan

SCOPE = "mlp"  # named scope of the dense MLP (and shared experts) matmuls, for the planner


class MLP(nnx.Module):
  """w_gate, w_up [D, F], w_down [F, D]."""

  def __init__(self, d_model: int, d_ff: int, std: float, rngs: nnx.Rngs,
               param_dtype: str = "float32", plan: ParallelPlan | None = None):
    self.plan = plan or ParallelPlan.single()
    self.w_gate = layers.param(rngs, (d_model, d_ff), ("embed", "mlp"), std, param_dtype)
    self.w_up = layers.param(rngs, (d_model, d_ff), ("embed", "mlp"), std, param_dtype)
    self.w_down = layers.param(rngs, (d_ff, d_model), ("mlp", "embed"), std, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., S, D] -> [..., S, D]; the sequence axis (-2) is the sequence-parallel one."""
    tp, dt = self.plan.tp, x.dtype
    x = col.all_gather(x, tp, axis=x.ndim - 2)
    lead = x.shape[:-1]
    # 2-D matmuls over flattened tokens: XLA:CPU runs the weight gradient of a [B, S, D]
    # einsum (contracting over B and S) about 2x slower than the same [B*S, D] one.
    x2 = x.reshape(-1, x.shape[-1])
    with jax.named_scope(SCOPE):
      h = jax.nn.silu(x2 @ self.w_gate[...].astype(dt)) * (x2 @ self.w_up[...].astype(dt))
      out = (h @ self.w_down[...].astype(dt)).reshape(*lead, -1)
    return col.psum_scatter(out, tp, axis=out.ndim - 2)
