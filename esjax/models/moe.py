"""Mixture-of-Experts block: router, routed SwiGLU experts, optional shared experts.

The three stages are separate functions so the expert-parallel path can reuse them:
`routing_for` (logits -> Routing), `esjax.routing.dispatch` (which rows each expert
computes) and `expert_swiglu_*` / `grouped_expert_fn` (the grouped expert compute).

`cfg.moe_impl` picks the grouped matmul of the dropless (and dropping, unpadded) path:
"ragged" (`lax.ragged_dot`, native on GPU/TPU), "blocked" (tiles of `moe_block_size` rows,
fast on XLA:CPU, see `esjax.routing.grouped`), or "auto" (blocked on CPU, ragged elsewhere).
Both compute the same function; tests/moe_test.py checks values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from esjax.models import layers
from esjax.models.config import ModelConfig
from esjax.models.mlp import MLP
from esjax.parallel import hooks
from esjax.routing import dispatch, grouped, router


# Grouped SwiGLU over rows sorted by expert (see esjax.routing.grouped):
# rows [N, D], group_sizes [E], w_gate / w_up [E, D, F], w_down [E, F, D] -> [N, D].
expert_swiglu_ragged = grouped.swiglu_ragged  # lax.ragged_dot (GPU/TPU)
expert_swiglu_blocked = grouped.swiglu_blocked  # padded chunks (CPU); extra arg: block


def resolve_moe_impl(moe_impl: str) -> str:
  """"auto" -> "blocked" on CPU (ragged_dot is ~10x slower there), else "ragged"."""
  if moe_impl == "auto":
    return "blocked" if jax.default_backend() == "cpu" else "ragged"
  return moe_impl


def block_rows(cfg: ModelConfig, n_rows: int) -> int:
  """Tile rows for `n_rows` assignments: moe_block_size, smaller when experts get fewer rows."""
  per_expert = max(1, n_rows // cfg.n_experts)
  return max(1, min(cfg.moe_block_size, 1 << (per_expert - 1).bit_length()))


def grouped_expert_fn(cfg: ModelConfig, w_gate: jax.Array, w_up: jax.Array,
                      w_down: jax.Array) -> dispatch.GroupedFn:
  """The grouped SwiGLU `(rows, group_sizes) -> out` that `cfg.moe_impl` asks for."""
  if resolve_moe_impl(cfg.moe_impl) == "blocked":
    return lambda rows, gs: expert_swiglu_blocked(rows, gs, w_gate, w_up, w_down,
                                                  block_rows(cfg, rows.shape[0]))
  return lambda rows, gs: expert_swiglu_ragged(rows, gs, w_gate, w_up, w_down)


def expert_swiglu_batched(buffers: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                          w_down: jax.Array) -> jax.Array:
  """SwiGLU on per-expert buffers [E, C, D] (token dropping padded to capacity)."""
  dt = buffers.dtype
  gate = jnp.einsum("ecd,edf->ecf", buffers, w_gate.astype(dt))
  up = jnp.einsum("ecd,edf->ecf", buffers, w_up.astype(dt))
  return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down.astype(dt))


def routing_for(cfg: ModelConfig, logits: jax.Array) -> router.Routing:
  """Routing of router `logits` [T, E] as `cfg` asks (XLA reference or Pallas kernel)."""
  kwargs = dict(score_fn=cfg.score_fn, order=cfg.routing_order,
                renormalize=cfg.renormalize, scaling=cfg.routed_scaling)
  if cfg.router_impl == "pallas":
    from esjax.kernels.routing import ops  # pylint: disable=g-import-not-at-top
    return ops.route(logits, cfg.top_k, **kwargs)
  return router.route(logits, cfg.top_k, **kwargs)


class MoE(nnx.Module):
  """router [D, E]; experts w_gate/w_up [E, D, F], w_down [E, F, D]; shared MLP [D, S*F_s]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, e, f, std, pd = (cfg.d_model, cfg.n_experts, cfg.d_ff_expert_, cfg.init_std,
                        cfg.param_dtype)
    self.router = layers.param(rngs, (d, e), ("embed", None), cfg.router_init_std, "float32")
    self.w_gate = layers.param(rngs, (e, d, f), ("exp", "embed_moe", "mlp_moe"), std, pd)
    self.w_up = layers.param(rngs, (e, d, f), ("exp", "embed_moe", "mlp_moe"), std, pd)
    self.w_down = layers.param(rngs, (e, f, d), ("exp", "mlp_moe", "embed_moe"), std, pd)
    if cfg.n_shared_experts:
      self.shared = MLP(d, cfg.n_shared_experts * cfg.d_ff_shared_, std, rngs, pd)
      if cfg.shared_expert_gate:
        self.shared_gate = layers.param(rngs, (d, 1), ("embed", None), std, pd)

  def router_logits(self, tokens: jax.Array) -> jax.Array:
    return jnp.einsum("td,de->te", tokens.astype(jnp.float32), self.router[...])

  def routed(self, tokens: jax.Array, r: router.Routing
             ) -> tuple[jax.Array, dispatch.DispatchStats]:
    """The routed experts' combined output [T, D] for routing `r` (single device)."""
    cfg = self.cfg
    w = (self.w_gate[...], self.w_up[...], self.w_down[...])
    if cfg.capacity_factor > 0:
      cap = dispatch.capacity(tokens.shape[0], cfg.top_k, cfg.n_experts, cfg.capacity_factor)
      if cfg.pad_to_capacity:
        return dispatch.capacity_moe(tokens, r.indices, r.weights, cfg.n_experts, cap,
                                     cfg.drop_policy, lambda b: expert_swiglu_batched(b, *w))
      keep = dispatch.keep_mask(r.indices, r.weights, cfg.n_experts, cap, cfg.drop_policy)
    else:
      keep = None
    return dispatch.grouped_moe(tokens, r.indices, r.weights, cfg.n_experts,
                                grouped_expert_fn(cfg, *w), keep)

  def shared_out(self, x: jax.Array) -> jax.Array:
    y = self.shared(x)
    if self.cfg.shared_expert_gate:
      gate = jnp.einsum("...d,do->...o", x, self.shared_gate[...].astype(x.dtype))
      y = jax.nn.sigmoid(gate) * y
    return y

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, S, D] -> (y [B, S, D], per-layer router statistics)."""
    expert_parallel = hooks.moe_override()  # set by an active esjax.parallel layout
    if expert_parallel is not None:
      return expert_parallel(self, x)
    cfg = self.cfg
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    logits = self.router_logits(tokens)
    r = routing_for(cfg, logits)
    y, stats = self.routed(tokens, r)
    y = y.reshape(b, s, d)
    if cfg.n_shared_experts:
      y = y + self.shared_out(x)
    return y, router_stats(cfg, logits, r, stats, b)


def router_stats(cfg: ModelConfig, logits: jax.Array, r: router.Routing,
                 stats: dispatch.DispatchStats, batch: int) -> dict[str, jax.Array]:
  return {
      "aux_loss": router.load_balancing_loss(r.probs, r.indices),
      "seq_aux_loss": router.seq_load_balancing_loss(r.probs, r.indices, batch),
      "z_loss": router.z_loss(logits),
      "expert_load": stats.counts.astype(jnp.float32) / r.indices.size,
      "drop_fraction": stats.drop_fraction,
  }
