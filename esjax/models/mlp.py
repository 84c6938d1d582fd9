"""SwiGLU MLP: down(silu(x @ gate) * (x @ up))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from esjax.models import layers
from esjax.parallel.rules import constrain


class MLP(nnx.Module):
  """w_gate, w_up [D, F], w_down [F, D]."""

  def __init__(self, d_model: int, d_ff: int, std: float, rngs: nnx.Rngs,
               param_dtype: str = "float32"):
    self.w_gate = layers.param(rngs, (d_model, d_ff), ("embed", "mlp"), std, param_dtype)
    self.w_up = layers.param(rngs, (d_model, d_ff), ("embed", "mlp"), std, param_dtype)
    self.w_down = layers.param(rngs, (d_ff, d_model), ("mlp", "embed"), std, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    gate = jnp.einsum("...d,df->...f", x, self.w_gate[...].astype(dt))
    up = jnp.einsum("...d,df->...f", x, self.w_up[...].astype(dt))
    h = jax.nn.silu(gate) * up
    if h.ndim == 3:
      h = constrain(h, ("act_batch", "act_len", "act_mlp"))
    return jnp.einsum("...f,fd->...d", h, self.w_down[...].astype(dt))
