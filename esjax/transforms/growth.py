"""Scale-Up: grow a dense model wider (FPI, AKI, AKI-Pro's GQA rule) and deeper (stacking,
interpolation), as pure functions on the parameter pytree.

Parameters are the pure dict of `nnx.state(model, nnx.Param).to_pure_dict()` (names in
esjax/models). Every index map is an explicit static int array: `g` over d_model (shared by
the whole residual stream), `f[l]` over each layer's d_ff, and per-layer head maps. Slot i <
n_src keeps its identity; new slots copy source slot `i mod n_src` (circular, exact when the
ratio is an integer) or a random one (`kind="random"`, from a jax.random key).

Width growth (shared/reference/methods.md 2.2-2.5, 3.2), for `W [in, out]`: in-dim expansion
divides each copied row by its copy count, out-dim expansion copies columns. FPI keeps the
function when d_model grows by an integer factor (RMSNorm statistics over uniformly copied
units are unchanged) and embeddings are untied; with tied embeddings the logits are scaled by
d_model_t / d_model_s. AKI fills the *new* output slots of layer l's attention and MLP
parameters from layer l+1 (FPI for the top layer), so it changes the function on purpose.

Heads keep head_dim. GQA (AKI-Pro): target query head (j, a) of KV group j reads source head
(j mod G_s, m(a)), m(a) = a for a < r_s: new query heads are added inside each group and read
the same K/V, so FPI stays exact. (The paper keeps G; G may also grow here, new KV groups
copying groups circularly.) AKI's new query heads take W_q/b_q of layer l+1, their K/V stay
from layer l unless the group itself is new.

Depth (methods.md 2.6, 3.1), after width: `interp` l -> floor(l L_s / L_t) (AKI-Pro),
`stack` l -> l mod L_s (AquilaMoE's formula), `stack_top` (bert2BERT: the remainder from the
top). Repeating a block is not function preserving; `zero_new_layers=True` zeroes the
residual-branch outputs (wo, w_down) of every repeated copy, which makes it exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esjax.models.config import ModelConfig

Params = dict[str, Any]
WIDTH_METHODS = ("fpi", "aki")
DEPTH_METHODS = ("interp", "stack", "stack_top")
MAP_KINDS = ("circular", "random")
# Named recipes: (width method, depth method). The names follow AquilaMoE's Table 1.
METHODS = {
    "fpi": ("fpi", "stack"),
    "fpi_interp": ("fpi", "interp"),
    "aki": ("aki", "stack"),
    "aki_pro": ("aki", "interp"),
}


# ----------------------------------------------------------------------------- index maps


def index_map(n_src: int, n_tgt: int, kind: str = "circular",
              key: jax.Array | None = None) -> np.ndarray:
  """Target slot -> source slot: identity below n_src, then circular or uniform random."""
  if n_tgt < n_src:
    raise ValueError(f"index_map: n_tgt={n_tgt} < n_src={n_src}; growth only enlarges")
  m = np.arange(n_tgt) % n_src
  if kind == "random":
    if key is None:
      raise ValueError("index_map: kind='random' needs a jax.random key")
    m[n_src:] = np.asarray(jax.random.randint(key, (n_tgt - n_src,), 0, n_src))
  elif kind != "circular":
    raise ValueError(f"index_map: kind={kind!r}, expected one of {MAP_KINDS}")
  return m.astype(np.int32)


def depth_map(l_src: int, l_tgt: int, how: str = "interp") -> np.ndarray:
  """Target layer -> source layer for `how` in DEPTH_METHODS (methods.md 2.6, 3.1)."""
  if l_tgt < l_src:
    raise ValueError(f"depth_map: n_layers {l_src} -> {l_tgt} shrinks; growth only enlarges")
  if how == "interp":
    m = np.arange(l_tgt) * l_src // l_tgt
  elif how == "stack":
    m = np.arange(l_tgt) % l_src
  elif how == "stack_top":
    k, rem = divmod(l_tgt, l_src)
    m = np.concatenate([np.tile(np.arange(l_src), k), np.arange(l_src - rem, l_src)])
  else:
    raise ValueError(f"depth_map: how={how!r}, expected one of {DEPTH_METHODS}")
  return m.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class WidthMaps:
  """Static index maps of one width growth; `ffn`, `q_heads`, `kv_heads` are per layer."""

  hidden: np.ndarray  # [D_t] -> [0, D_s)
  ffn: tuple[np.ndarray, ...]  # [F_t] -> [0, F_s)
  kv_heads: tuple[np.ndarray, ...]  # [G_t] -> [0, G_s)
  q_heads: tuple[np.ndarray, ...]  # [H_t] -> [0, H_s), head (j, a) -> (kv[j], m(a))


def width_maps(src: ModelConfig, tgt: ModelConfig, kind: str = "circular",
               key: jax.Array | None = None) -> WidthMaps:
  """Index maps for growing `src` to `tgt`'s width (tgt.n_layers is ignored here)."""
  check_growth(src, tgt)
  keys = iter(jax.random.split(key, 1 + 3 * src.n_layers)) if key is not None else None
  nxt = (lambda: next(keys)) if keys is not None else (lambda: None)
  r_s, r_t = src.n_heads // src.n_kv_heads, tgt.n_heads // tgt.n_kv_heads
  hidden = index_map(src.d_model, tgt.d_model, kind, nxt())
  ffn, kv_heads, q_heads = [], [], []
  for _ in range(src.n_layers):
    ffn.append(index_map(src.d_ff, tgt.d_ff, kind, nxt()))
    kv = index_map(src.n_kv_heads, tgt.n_kv_heads, kind, nxt())
    within = index_map(r_s, r_t, kind, nxt())
    kv_heads.append(kv)
    q_heads.append((kv[:, None] * r_s + within[None, :]).reshape(-1).astype(np.int32))
  return WidthMaps(hidden, tuple(ffn), tuple(kv_heads), tuple(q_heads))


# ----------------------------------------------------------------------------- checks


def check_growth(src: ModelConfig, tgt: ModelConfig) -> None:
  """Raises ValueError naming the first field that makes `src -> tgt` an invalid growth."""
  if src.is_moe or tgt.is_moe:
    raise ValueError(f"grow: source (n_experts={src.n_experts}) and target "
                     f"(n_experts={tgt.n_experts}) must be dense; grow first, then upcycle")
  for name in ("vocab_size", "qkv_bias", "tie_embeddings"):
    if getattr(src, name) != getattr(tgt, name):
      raise ValueError(f"grow: {name} {getattr(src, name)} -> {getattr(tgt, name)} differs; "
                       "growth keeps it")
  if src.qk_norm != "none" or tgt.qk_norm != "none":
    raise ValueError(f"grow: qk_norm {src.qk_norm!r} -> {tgt.qk_norm!r}; growth is defined for "
                     "models without q/k norms")
  if src.effective_head_dim != tgt.effective_head_dim:
    raise ValueError(f"grow: head_dim {src.effective_head_dim} -> {tgt.effective_head_dim}; head-wise growth "
                     f"keeps head_dim, set head_dim={src.effective_head_dim} in the target config")
  for name in ("d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads"):
    if getattr(tgt, name) < getattr(src, name):
      raise ValueError(f"grow: {name} {getattr(src, name)} -> {getattr(tgt, name)} shrinks; "
                       "growth only enlarges")
  r_s, r_t = src.n_heads // src.n_kv_heads, tgt.n_heads // tgt.n_kv_heads
  if r_t < r_s:
    raise ValueError(
        f"grow: query heads per KV group {r_s} -> {r_t} (n_heads {src.n_heads} -> "
        f"{tgt.n_heads}, n_kv_heads {src.n_kv_heads} -> {tgt.n_kv_heads}) breaks GQA: every "
        "group must keep its query heads; grow n_heads by a multiple of n_kv_heads")


# ----------------------------------------------------------------------------- width


def _take(w: jax.Array, m: np.ndarray, axis: int) -> jax.Array:
  return jnp.take(w, jnp.asarray(m), axis=axis)


def _expand_in(w: jax.Array, m: np.ndarray, axis: int, n_src: int) -> jax.Array:
  """Rows copied by `m` along `axis`, each divided by its source's copy count."""
  counts = np.bincount(m, minlength=n_src)[m].astype(np.float32)
  shape = [1] * w.ndim
  shape[axis] = -1
  return (_take(w, m, axis) / jnp.asarray(counts.reshape(shape))).astype(w.dtype)


def _new_mask(n_src: int, n_tgt: int) -> np.ndarray:
  return np.arange(n_tgt) >= n_src


def _fpi_layer(p: Params, src: ModelConfig, maps: WidthMaps, l: int) -> Params:
  """FPI expansion of layer l's parameters with layer l's maps."""
  g, f, mq, mk = maps.hidden, maps.ffn[l], maps.q_heads[l], maps.kv_heads[l]
  d, h = src.d_model, src.n_heads
  a, mlp = p["attn"], p["mlp"]
  attn = {
      "wq": _expand_in(_take(a["wq"], mq, 1), g, 0, d),
      "wk": _expand_in(_take(a["wk"], mk, 1), g, 0, d),
      "wv": _expand_in(_take(a["wv"], mk, 1), g, 0, d),
      "wo": _take(_expand_in(a["wo"], mq, 0, h), g, 2),
  }
  if "bq" in a:
    attn.update(bq=_take(a["bq"], mq, 0), bk=_take(a["bk"], mk, 0), bv=_take(a["bv"], mk, 0))
  return {
      "attn_norm": {"scale": _take(p["attn_norm"]["scale"], g, 0)},
      "attn": attn,
      "mlp_norm": {"scale": _take(p["mlp_norm"]["scale"], g, 0)},
      "mlp": {
          "w_gate": _expand_in(_take(mlp["w_gate"], f, 1), g, 0, d),
          "w_up": _expand_in(_take(mlp["w_up"], f, 1), g, 0, d),
          "w_down": _take(_expand_in(mlp["w_down"], f, 0, src.d_ff), g, 1),
      },
  }


def _new_out_slots(src: ModelConfig, tgt: ModelConfig) -> dict[str, tuple[int, np.ndarray]]:
  """(output axis, mask of new output slots) of every attention/MLP parameter, for AKI."""
  r_s, r_t = src.n_heads // src.n_kv_heads, tgt.n_heads // tgt.n_kv_heads
  new_kv = _new_mask(src.n_kv_heads, tgt.n_kv_heads)
  new_q = (new_kv[:, None] | _new_mask(r_s, r_t)[None, :]).reshape(-1)
  new_d = _new_mask(src.d_model, tgt.d_model)
  new_f = _new_mask(src.d_ff, tgt.d_ff)
  return {
      "attn.wq": (1, new_q), "attn.wk": (1, new_kv), "attn.wv": (1, new_kv),
      "attn.wo": (2, new_d), "attn.bq": (0, new_q), "attn.bk": (0, new_kv),
      "attn.bv": (0, new_kv), "mlp.w_gate": (1, new_f), "mlp.w_up": (1, new_f),
      "mlp.w_down": (1, new_d),
  }


def _aki_merge(lower: Params, upper: Params, slots: dict[str, tuple[int, np.ndarray]]
               ) -> Params:
  """`lower` with its new output slots taken from `upper` (both already FPI-expanded)."""
  out = {**lower, "attn": dict(lower["attn"]), "mlp": dict(lower["mlp"])}
  for name, (axis, new) in slots.items():
    block, leaf = name.split(".")
    if leaf not in lower[block]:
      continue
    shape = [1] * lower[block][leaf].ndim
    shape[axis] = -1
    mask = jnp.asarray(new.reshape(shape))
    out[block][leaf] = jnp.where(mask, upper[block][leaf], lower[block][leaf])
  return out


def grow_width(src: ModelConfig, params: Params, tgt: ModelConfig, maps: WidthMaps | None = None,
               method: str = "fpi") -> Params:
  """Widens every layer of `params` to `tgt`'s d_model, d_ff and heads; keeps n_layers."""
  if method not in WIDTH_METHODS:
    raise ValueError(f"grow_width: method={method!r}, expected one of {WIDTH_METHODS}")
  check_growth(src, tgt)
  maps = maps if maps is not None else width_maps(src, tgt)
  g = maps.hidden
  layers = params["layers"]
  fpi = [_fpi_layer(layers[l], src, maps, l) for l in range(src.n_layers)]
  if method == "aki":
    slots = _new_out_slots(src, tgt)
    fpi = [_aki_merge(fpi[l], fpi[l + 1], slots) for l in range(src.n_layers - 1)] + fpi[-1:]
  out = {
      "embed": _take(params["embed"], g, 1),
      "layers": dict(enumerate(fpi)),
      "final_norm": {"scale": _take(params["final_norm"]["scale"], g, 0)},
  }
  if "lm_head" in params:
    out["lm_head"] = _expand_in(params["lm_head"], g, 0, src.d_model)
  return out


# ----------------------------------------------------------------------------- depth

_RESIDUAL_OUTPUTS = (("attn", "wo"), ("mlp", "w_down"))


def _zero_residual(layer: Params) -> Params:
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}
  for block, leaf in _RESIDUAL_OUTPUTS:
    out[block][leaf] = jnp.zeros_like(layer[block][leaf])
  if "shared" in layer["mlp"]:
    out["mlp"]["shared"] = {**layer["mlp"]["shared"],
                            "w_down": jnp.zeros_like(layer["mlp"]["shared"]["w_down"])}
  return out


def grow_depth(params: Params, layer_map: np.ndarray, zero_new_layers: bool = False) -> Params:
  """Target layer i = source layer layer_map[i]; repeats optionally get zero residual outputs."""
  layers, seen, out = params["layers"], set(), {}
  for i, s in enumerate(np.asarray(layer_map).tolist()):
    if s not in layers:
      raise ValueError(f"grow_depth: layer_map[{i}]={s} but the source has {len(layers)} layers")
    repeat = s in seen
    seen.add(s)
    out[i] = _zero_residual(layers[s]) if (repeat and zero_new_layers) else layers[s]
  return {**params, "layers": out}


# ----------------------------------------------------------------------------- both


def grow_params(src: ModelConfig, params: Params, tgt: ModelConfig, *, width: str = "aki",
                depth: str = "interp", maps: WidthMaps | None = None,
                zero_new_layers: bool = False) -> Params:
  """Width growth to `tgt`'s width, then depth growth to tgt.n_layers (AquilaMoE order).

  `maps` defaults to the circular ones; draw random ones with `width_maps(..., "random", key)`
  outside jit.
  """
  check_growth(src, tgt)
  if depth not in DEPTH_METHODS:
    raise ValueError(f"grow: depth={depth!r}, expected one of {DEPTH_METHODS}")
  wide_cfg = tgt.replace(n_layers=src.n_layers)
  wide = grow_width(src, params, wide_cfg, maps, width)
  return grow_depth(wide, depth_map(src.n_layers, tgt.n_layers, depth), zero_new_layers)


def resolve_method(method: str) -> tuple[str, str]:
  if method not in METHODS:
    raise ValueError(f"grow: method={method!r}, expected one of {sorted(METHODS)}")
  return METHODS[method]


def grow(model, target_cfg: ModelConfig, method: str = "aki_pro", *, kind: str = "circular",
         key: jax.Array | None = None, zero_new_layers: bool = False, mesh=None, rules=None):
  """The grown `Transformer` of `target_cfg`; with `mesh`/`rules`, built directly sharded.

  `method` names a (width, depth) recipe in METHODS: fpi (FPI + stacking), fpi_interp,
  aki (AKI + stacking), aki_pro (AKI + interpolation, AquilaMoE's Scale-Up).
  """
  from esjax.transforms import build  # pylint: disable=g-import-not-at-top

  width, depth = resolve_method(method)
  src = model.cfg
  maps = width_maps(src, target_cfg, kind, key)  # static arrays, drawn outside jit

  def fn(params):
    return grow_params(src, params, target_cfg, width=width, depth=depth, maps=maps,
                       zero_new_layers=zero_new_layers)

  return build.build_model(target_cfg, fn, build.params_of(model), mesh=mesh, rules=rules)
