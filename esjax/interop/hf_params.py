"""esjax parameter tree <-> Hugging Face tensor names and layouts (numpy, no torch).

HF `nn.Linear` weights are [out, in]; esjax keeps inputs first and splits heads:
q_proj [H*hd, D] <-> wq [D, H, hd], o_proj [D, H*hd] <-> wo [H, hd, D], gate_proj [F, D]
<-> w_gate [D, F], router gate [E, D] <-> router [D, E]. RoPE needs no permutation: esjax
rotates halves, as HF Llama does, so HF-format q/k weights are used as they are.

Experts are read from the per-expert names every transformers version writes (Mixtral
`block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen2-MoE `mlp.experts.{e}.gate_proj/up_proj/
down_proj`) or from the fused in-memory names of transformers 5 (`mlp.experts.gate_up_proj`
[E, 2F, D], gate rows first, and `mlp.experts.down_proj` [E, D, F]); they are written
per expert, as transformers 5.23 itself saves them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esjax.interop.hf_config import architecture_for
from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer

_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
Path = tuple[Any, ...]


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
  """The esjax parameter tree of `cfg` as ShapeDtypeStructs (nothing allocated)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _lookup(tree: Any, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _from_linear(w: np.ndarray, want: tuple[int, ...], n_in: int, name: str) -> np.ndarray:
  """HF [prod(out), prod(in)] -> esjax `want` = (*in, *out)."""
  expected = (math.prod(want[n_in:]), math.prod(want[:n_in]))
  if w.shape != expected:
    raise ValueError(f"checkpoint tensor {name!r} has shape {w.shape}, expected {expected}")
  return w.T.reshape(want)


def _to_linear(x: np.ndarray, n_in: int) -> np.ndarray:
  """esjax (*in, *out) -> HF [prod(out), prod(in)]."""
  return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)


class _Builder:
  """Reads HF tensors once each, checks shapes against `cfg`, fills the esjax tree."""

  def __init__(self, cfg: ModelConfig, tensors: Mapping[str, Any], shardings: Any = None):
    self.abstract = abstract_params(cfg)
    self.tensors, self.shardings, self.used = tensors, shardings, set()
    self.out: dict[str, Any] = {}

  def has(self, name: str) -> bool:
    return name in self.tensors

  def take(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise ValueError(f"checkpoint is missing tensor {name!r}")
    self.used.add(name)
    return np.asarray(self.tensors[name])

  def put(self, path: Path, value: np.ndarray):
    want = _lookup(self.abstract, path)
    value = np.asarray(value).astype(want.dtype, copy=False)
    sharding = _lookup(self.shardings, path) if self.shardings is not None else None
    node = self.out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jax.device_put(value, sharding)

  def same(self, path: Path, name: str, flat: bool = False):
    """A tensor stored as it is (norms, embeddings), or `flat` (biases [H*hd] -> [H, hd])."""
    want = _lookup(self.abstract, path).shape
    expected = (math.prod(want),) if flat else want
    w = self.take(name)
    if w.shape != expected:
      raise ValueError(f"checkpoint tensor {name!r} has shape {w.shape}, expected {expected}")
    self.put(path, w.reshape(want))

  def linear(self, path: Path, name: str, n_in: int = 1):
    want = _lookup(self.abstract, path).shape
    self.put(path, _from_linear(self.take(name), want, n_in, name))

  def experts(self, path: Path, names: list[str]):
    """Per-expert [out, in] Linear weights stacked to esjax [E, in, out]."""
    want = _lookup(self.abstract, path)
    if len(names) != want.shape[0]:
      raise ValueError(f"{len(names)} experts in the checkpoint, config has {want.shape[0]}")
    stacked = np.empty(want.shape, want.dtype)
    for e, name in enumerate(names):
      stacked[e] = _from_linear(self.take(name), want.shape[1:], 1, name)
    self.put(path, stacked)

  def check_all_used(self):
    unused = sorted(n for n in self.tensors if n not in self.used and not _IGNORED.search(n))
    if unused:
      raise ValueError(f"{len(unused)} checkpoint tensors have no place in the esjax model "
                       f"(wrong config?), e.g. {unused[:5]}")


def _read_moe(b: _Builder, cfg: ModelConfig, i: int):
  p, path = f"model.layers.{i}.", ("layers", i, "mlp")
  mix = b.has(p + "block_sparse_moe.gate.weight")
  b.linear(path + ("router",), p + ("block_sparse_moe" if mix else "mlp") + ".gate.weight")
  fused = p + "mlp.experts.gate_up_proj"
  if b.has(fused):
    gate_up, want = b.take(fused), _lookup(b.abstract, path + ("w_gate",)).shape
    e, d, f = want
    if gate_up.shape != (e, 2 * f, d):
      raise ValueError(f"checkpoint tensor {fused!r} has shape {gate_up.shape}, "
                       f"expected {(e, 2 * f, d)}")
    b.put(path + ("w_gate",), gate_up[:, :f].transpose(0, 2, 1))
    b.put(path + ("w_up",), gate_up[:, f:].transpose(0, 2, 1))
    down_name = p + "mlp.experts.down_proj"
    down = b.take(down_name)
    if down.shape != (e, d, f):
      raise ValueError(f"checkpoint tensor {down_name!r} has shape {down.shape}, "
                       f"expected {(e, d, f)}")
    b.put(path + ("w_down",), down.transpose(0, 2, 1))
  else:
    names = (("block_sparse_moe.experts", "w1", "w3", "w2") if mix
             else ("mlp.experts", "gate_proj", "up_proj", "down_proj"))
    for param, proj in zip(("w_gate", "w_up", "w_down"), names[1:]):
      b.experts(path + (param,),
                [f"{p}{names[0]}.{e}.{proj}.weight" for e in range(cfg.n_experts)])
  shared = p + "mlp.shared_expert."
  if cfg.n_shared_experts:
    for param in ("w_gate", "w_up", "w_down"):
      b.linear(path + ("shared", param), f"{shared}{param[2:]}_proj.weight")
    if cfg.shared_expert_gate:
      b.linear(path + ("shared_gate",), p + "mlp.shared_expert_gate.weight")
  else:  # Qwen2-MoE with a zero-width shared expert: nothing to load.
    for name in [f"{shared}{n}_proj.weight" for n in ("gate", "up", "down")]:
      if b.has(name) and b.tensors[name].size == 0:
        b.used.update((name, p + "mlp.shared_expert_gate.weight"))


def hf_to_esjax_params(cfg: ModelConfig, tensors: Mapping[str, Any], *,
                       shardings: Any = None) -> dict[str, Any]:
  """The esjax parameter tree (a pure dict of jax arrays) from HF-named `tensors`.

  Args:
    cfg: the model config (e.g. from `config_from_hf`); shapes are checked against it.
    tensors: HF tensor name -> array; a lazy mapping (a `SafetensorsCheckpoint`) is read one
      tensor at a time, so host memory holds at most one esjax parameter in transit.
    shardings: optional tree of the same structure with a `jax.sharding.Sharding` per leaf.

  Every tensor must find its place (besides RoPE's `inv_freq` buffers, and `lm_head` when
  embeddings are tied): an unused tensor means the config does not describe the checkpoint.
  """
  b = _Builder(cfg, tensors, shardings)
  b.same(("embed",), "model.embed_tokens.weight")
  for i in range(cfg.n_layers):
    p, path = f"model.layers.{i}.", ("layers", i)
    b.same(path + ("attn_norm", "scale"), p + "input_layernorm.weight")
    b.same(path + ("mlp_norm", "scale"), p + "post_attention_layernorm.weight")
    for n in "qkv":
      b.linear(path + ("attn", f"w{n}"), f"{p}self_attn.{n}_proj.weight")
      if cfg.qkv_bias:
        b.same(path + ("attn", f"b{n}"), f"{p}self_attn.{n}_proj.bias", flat=True)
    b.linear(path + ("attn", "wo"), p + "self_attn.o_proj.weight", n_in=2)
    if cfg.is_moe_layer(i):
      _read_moe(b, cfg, i)
    else:
      for param in ("w_gate", "w_up", "w_down"):
        b.linear(path + ("mlp", param), f"{p}mlp.{param[2:]}_proj.weight")
  b.same(("final_norm", "scale"), "model.norm.weight")
  if cfg.tie_embeddings:
    b.used.add("lm_head.weight")  # some tied checkpoints store a copy
  else:
    b.linear(("lm_head",), "lm_head.weight")
  b.check_all_used()
  if jax.tree.structure(b.out) != jax.tree.structure(b.abstract):
    raise AssertionError("hf_to_esjax_params: built tree differs from the model's tree")
  return b.out


def to_pure_dict(params: Any) -> Any:
  """A pure dict of arrays from an `nnx.State` (or the pure dict itself)."""
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def iter_hf_tensors(cfg: ModelConfig, params: Any, dtype: str | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy array) pairs of esjax `params`, one at a time, for `architecture_for(cfg)`.

  `params` is a pure dict or `nnx.State` of the model's Params; every tensor is cast to
  `dtype` (default `cfg.param_dtype`).
  """
  arch = architecture_for(cfg)
  params = to_pure_dict(params)
  dt = np.dtype(jnp.dtype(dtype or cfg.param_dtype))

  def host(x):
    return np.asarray(x).astype(dt, copy=False)

  yield "model.embed_tokens.weight", host(params["embed"])
  for i in range(cfg.n_layers):
    p, layer = f"model.layers.{i}.", params["layers"][i]
    attn, mlp = layer["attn"], layer["mlp"]
    yield p + "input_layernorm.weight", host(layer["attn_norm"]["scale"])
    for n in "qkv":
      yield f"{p}self_attn.{n}_proj.weight", _to_linear(host(attn[f"w{n}"]), 1)
      if cfg.qkv_bias:
        yield f"{p}self_attn.{n}_proj.bias", host(attn[f"b{n}"]).reshape(-1)
    yield p + "self_attn.o_proj.weight", _to_linear(host(attn["wo"]), 2)
    yield p + "post_attention_layernorm.weight", host(layer["mlp_norm"]["scale"])
    if cfg.is_moe_layer(i):
      yield from _moe_tensors(cfg, arch, p, mlp, host)
    else:
      for param in ("w_gate", "w_up", "w_down"):
        yield f"{p}mlp.{param[2:]}_proj.weight", _to_linear(host(mlp[param]), 1)
  yield "model.norm.weight", host(params["final_norm"]["scale"])
  if not cfg.tie_embeddings:
    yield "lm_head.weight", _to_linear(host(params["lm_head"]), 1)


def _moe_tensors(cfg: ModelConfig, arch: str, p: str, mlp: dict[str, Any], host
                 ) -> Iterator[tuple[str, np.ndarray]]:
  if arch == "MixtralForCausalLM":
    prefix, projs = p + "block_sparse_moe.", ("w1", "w3", "w2")
  else:
    prefix, projs = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
  yield prefix + "gate.weight", _to_linear(host(mlp["router"]), 1)
  for param, proj in zip(("w_gate", "w_up", "w_down"), projs):
    w = host(mlp[param])
    for e in range(cfg.n_experts):
      yield f"{prefix}experts.{e}.{proj}.weight", _to_linear(w[e], 1)
  if arch != "Qwen2MoeForCausalLM":
    return
  shared = p + "mlp.shared_expert."
  if cfg.n_shared_experts:
    for param in ("w_gate", "w_up", "w_down"):
      yield f"{shared}{param[2:]}_proj.weight", _to_linear(host(mlp["shared"][param]), 1)
    yield p + "mlp.shared_expert_gate.weight", _to_linear(host(mlp["shared_gate"]), 1)
  else:  # Qwen2-MoE always has a shared expert: give it zero width, so it adds exactly 0.
    d, dt = cfg.d_model, host(mlp["router"]).dtype
    yield shared + "gate_proj.weight", np.zeros((0, d), dt)
    yield shared + "up_proj.weight", np.zeros((0, d), dt)
    yield shared + "down_proj.weight", np.zeros((d, 0), dt)
    yield p + "mlp.shared_expert_gate.weight", np.zeros((1, d), dt)


def esjax_to_hf_tensors(cfg: ModelConfig, params: Any, dtype: str | None = None
                        ) -> dict[str, np.ndarray]:
  """All HF tensors of `params` at once (see `iter_hf_tensors` to stream them)."""
  return dict(iter_hf_tensors(cfg, params, dtype))
