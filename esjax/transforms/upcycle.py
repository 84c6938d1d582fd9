"""Scale-Out: turn a dense model into an MoE (sparse and virtual-group upcycling), as a pure
function on the parameter pytree (shared/reference/methods.md sections 4-6).

The MoE target config says what to build. Every layer that `moe_cfg.is_moe_layer(i)` gets
an MoE block made from layer i's dense MLP; the rest (attention, norms, embeddings, dense
layers) is copied. With `F_sh = n_shared_experts * d_ff_shared` and `F_e = d_ff_expert`:

- Granularity `G = (d_ff - F_sh) / F_e`; the routed part of the dense MLP (hidden units
  [F_sh, d_ff)) is cut into G shards and expert e holds shard `e mod G` (Megatron's layout).
  G = 1 is sparse upcycling (every expert a copy of the MLP).
- The router is random, N(0, router_std), with its columns tied in virtual groups of G
  consecutive experts (`column e = R0[:, e // G]`), so top-k with k a multiple of G picks
  whole groups, i.e. whole copies of the MLP.
- Shared experts (Qwen2-MoE style) hold hidden units [0, F_sh); the shared gate starts at 0,
  i.e. sigmoid = 1/2, so the shared down projection is doubled.
- Routed outputs are scaled by s = G / W, W the total combine weight at a uniform router:
  routed_scaling when the k weights are normalised (top-k then softmax, or renormalize),
  top_k * p0 * routed_scaling otherwise (p0 = 1/N for softmax, 1/2 for sigmoid). For
  softmax then top-k this is NVIDIA's E*G^2/T. `scale_placement="down"` puts s on w_down
  (exact for SwiGLU); "balanced" puts s^(1/3) on each of gate, up, down (the paper's
  recommendation, better for training, exact only for degree-3 homogeneous activations).

Exactness at init (tested): top-k then softmax gives the dense logits for any router;
softmax then top-k only when all router logits are equal (`router_std=0`). Token dropping
(capacity_factor > 0) breaks it for the dropped tokens.

Drop-upcycling (Nakamura et al., ICLR 2025, `drop=r`): each expert then re-initializes a
random fraction r of its intermediate dimensions, round(r * F_e) of them, a different set per
expert: those columns of w_gate and w_up and rows of w_down are drawn from a normal with
the mean and standard deviation of the weights they replace (per expert and matrix, as the
authors' conversion does), so the experts start diverse instead of identical. r = 0 is the
upcycling above, exactly; r = 1 keeps only the statistics. (The authors also permute each
expert's hidden units first; a permutation of hidden units leaves an MLP's function
unchanged, so it is left out.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from esjax.models.config import ModelConfig

Params = dict[str, Any]
SCALE_PLACEMENTS = ("down", "balanced")
_SAME_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "qkv_bias",
                "qk_norm", "tie_embeddings", "d_ff")


def granularity(dense: ModelConfig, moe: ModelConfig) -> int:
  """G of upcycling `dense` into `moe`; raises ValueError for a request that cannot work."""
  if dense.is_moe:
    raise ValueError(f"upcycle: the source must be dense, got n_experts={dense.n_experts}")
  if not moe.is_moe:
    raise ValueError("upcycle: the target config must be an MoE (n_experts > 0)")
  for name in _SAME_FIELDS:
    if getattr(dense, name) != getattr(moe, name):
      raise ValueError(f"upcycle: {name} {getattr(dense, name)} -> {getattr(moe, name)} "
                       "differs; upcycling keeps every dense shape (grow first)")
  if dense.effective_head_dim != moe.effective_head_dim:
    raise ValueError(f"upcycle: head_dim {dense.effective_head_dim} -> {moe.effective_head_dim} differs")
  shared = moe.n_shared_experts * moe.effective_d_ff_shared if moe.n_shared_experts else 0
  routed = dense.d_ff - shared
  if routed <= 0:
    raise ValueError(f"upcycle: shared experts take {shared} hidden units, the dense MLP has "
                     f"only d_ff={dense.d_ff}; routed experts need the rest")
  if routed % moe.effective_d_ff_expert:
    raise ValueError(f"upcycle: d_ff_expert={moe.effective_d_ff_expert} must divide the routed width "
                     f"{routed} (d_ff={dense.d_ff} minus shared {shared}): granularity "
                     "G = routed width / d_ff_expert must be an integer")
  g = routed // moe.effective_d_ff_expert
  if moe.n_experts % g:
    raise ValueError(f"upcycle: n_experts={moe.n_experts} must be a multiple of the "
                     f"granularity G={g} (virtual groups of G experts)")
  if moe.top_k % g:
    raise ValueError(f"upcycle: top_k={moe.top_k} must be a multiple of the granularity G={g} "
                     "so that top-k selects whole virtual groups")
  return g


def output_scale(moe: ModelConfig, g: int) -> float:
  """s = G / (total combine weight of the top-k at a uniform router), methods.md 5.3."""
  if moe.routing_order == "topk_softmax" or moe.renormalize_:
    weight = moe.routed_scaling
  else:
    p0 = 1.0 / moe.n_experts if moe.score_fn == "softmax" else 0.5
    weight = moe.top_k * p0 * moe.routed_scaling
  return g / weight


def drop_mask(key: jax.Array, n: int, fe: int, drop: float) -> jax.Array:
  """[n, fe] bool: round(drop * fe) re-initialized hidden units per expert, each expert's set
  drawn independently."""
  k = int(round(drop * fe))
  ranks = jnp.argsort(jax.random.uniform(key, (n, fe)), axis=1)  # a permutation per expert
  return ranks < k


def _redraw(w: jax.Array, mask: jax.Array, key: jax.Array, axis: int) -> jax.Array:
  """`w` ([N, D, F_e] with `axis`=2, or [N, F_e, D] with `axis`=1) with the hidden units
  `mask` [N, F_e] drawn again from a normal with the replaced weights' mean and (unbiased)
  standard deviation, per expert."""
  x = w.astype(jnp.float32)
  m = jnp.broadcast_to(jnp.expand_dims(mask, 3 - axis), x.shape).astype(jnp.float32)
  count = jnp.maximum(m.sum(axis=(1, 2), keepdims=True), 1.0)
  mean = jnp.sum(x * m, axis=(1, 2), keepdims=True) / count
  var = jnp.sum(((x - mean) * m) ** 2, axis=(1, 2), keepdims=True) / jnp.maximum(count - 1, 1)
  fresh = mean + jnp.sqrt(var) * jax.random.normal(key, x.shape, jnp.float32)
  return jnp.where(m > 0, fresh, x).astype(w.dtype)


def upcycle_mlp(dense_mlp: Params, moe: ModelConfig, g: int, key: jax.Array, *,
                router_std: float, scale_placement: str = "down", drop: float = 0.0
                ) -> Params:
  """MoE block parameters from one dense MLP {w_gate [D, F], w_up [D, F], w_down [F, D]};
  `drop`: drop-upcycling's re-initialized fraction (module docstring)."""
  if scale_placement not in SCALE_PLACEMENTS:
    raise ValueError(f"upcycle: scale_placement={scale_placement!r}, expected one of "
                     f"{SCALE_PLACEMENTS}")
  if not 0.0 <= drop <= 1.0:
    raise ValueError(f"upcycle: drop={drop} must be in [0, 1]")
  n, fe = moe.n_experts, moe.effective_d_ff_expert
  shared = moe.n_shared_experts * moe.effective_d_ff_shared if moe.n_shared_experts else 0
  w_gate, w_up, w_down = dense_mlp["w_gate"], dense_mlp["w_up"], dense_mlp["w_down"]
  d = w_gate.shape[0]
  s = output_scale(moe, g)
  if scale_placement == "down":
    s_gate = s_up = 1.0
    s_down = s
  else:
    s_gate = s_up = s_down = s ** (1.0 / 3.0)
  shard_of_expert = jnp.arange(n) % g

  def experts_in(w, scale):  # [D, F] -> [N, D, F_e]
    shards = w[:, shared:].reshape(d, g, fe).transpose(1, 0, 2)
    return (jnp.take(shards, shard_of_expert, axis=0) * scale).astype(w.dtype)

  down_shards = w_down[shared:].reshape(g, fe, d)
  base = router_std * jax.random.normal(key, (d, n // g), jnp.float32)
  out = {
      "router": jnp.take(base, jnp.arange(n) // g, axis=1),
      "w_gate": experts_in(w_gate, s_gate),
      "w_up": experts_in(w_up, s_up),
      "w_down": (jnp.take(down_shards, shard_of_expert, axis=0) * s_down).astype(w_down.dtype),
  }
  if drop > 0:
    k_mask, k_gate, k_up, k_down = jax.random.split(jax.random.fold_in(key, 1), 4)
    mask = drop_mask(k_mask, n, fe, drop)
    out["w_gate"] = _redraw(out["w_gate"], mask, k_gate, axis=2)
    out["w_up"] = _redraw(out["w_up"], mask, k_up, axis=2)
    out["w_down"] = _redraw(out["w_down"], mask, k_down, axis=1)
  if shared:
    gate_factor = 2.0 if moe.shared_expert_gate else 1.0  # sigmoid(0) = 1/2
    out["shared"] = {"w_gate": w_gate[:, :shared], "w_up": w_up[:, :shared],
                     "w_down": (w_down[:shared] * gate_factor).astype(w_down.dtype)}
    if moe.shared_expert_gate:
      out["shared_gate"] = jnp.zeros((d, 1), w_gate.dtype)
  return out


def upcycle_params(dense: ModelConfig, params: Params, moe: ModelConfig, key: jax.Array, *,
                   router_std: float | None = None, scale_placement: str = "down",
                   drop: float = 0.0) -> Params:
  """The MoE `moe`'s parameters from the dense `params`; layer i's router uses fold_in(key, i).

  `router_std` defaults to `moe.router_init_std`. Runs under jit (the key may be traced).
  """
  g = granularity(dense, moe)
  std = moe.router_init_std if router_std is None else router_std
  layers = {}
  for i, layer in params["layers"].items():
    if moe.is_moe_layer(i):
      mlp = upcycle_mlp(layer["mlp"], moe, g, jax.random.fold_in(key, i), router_std=std,
                        scale_placement=scale_placement, drop=drop)
      layer = {**layer, "mlp": mlp}
    layers[i] = layer
  return {**params, "layers": layers}


def upcycle(model, moe_cfg: ModelConfig, key: jax.Array | None = None, *,
            router_std: float | None = None, scale_placement: str = "down", drop: float = 0.0,
            mesh=None, rules=None):
  """The upcycled `Transformer(moe_cfg)`; with `mesh`/`rules`, built directly sharded (each
  device computes only its own experts' shards)."""
  from esjax.transforms import build  # pylint: disable=g-import-not-at-top

  src = model.cfg
  granularity(src, moe_cfg)
  key = jax.random.key(0) if key is None else key

  def fn(params, k):
    return upcycle_params(src, params, moe_cfg, k, router_std=router_std,
                          scale_placement=scale_placement, drop=drop)

  return build.build_model(moe_cfg, fn, build.params_of(model), key, mesh=mesh, rules=rules)
