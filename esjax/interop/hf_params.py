"""esjax parameter tree <-> Hugging Face tensor names and layouts (numpy, no torch).

HF `nn.Linear` weights are [out, in]; esjax keeps inputs first and splits heads:
q_proj [H*hd, D] <-> wq [D, H, hd], o_proj [D, H*hd] <-> wo [H, hd, D], gate_proj [F, D]
<-> w_gate [D, F], router gate [E, D] <-> router [D, E], per-expert [F, D] tensors <->
w_gate [E, D, F]. RoPE needs no permutation: esjax rotates halves, as HF Llama does, so
HF-format q/k weights are used as they are.

`layout(cfg, names)` is the one table of the correspondence: for every esjax parameter, the
`Part`s that hold it, each an HF tensor's name and shape with a numpy view of that tensor
in the parameter's layout (the whole parameter, or one expert of it). Views are reshapes,
transposes and slices: indexing one reads only that region of a memory-mapped tensor, and
assigning into one fills that region of an HF tensor. Import (`hf_to_esjax_params`) builds
each parameter with `jax.make_array_from_callback` from the slices its devices hold; export
(`iter_hf_tensors`) builds one HF tensor at a time from its parameter, gathered to the host.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from esjax.interop.hf_config import architecture_for
from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer

_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
Path = tuple[Any, ...]
View = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Part:
  """HF tensor `name` of `shape`; `view(tensor)` is what it holds of an esjax parameter, in
  the parameter's layout: all of it, or its slice [expert] when `expert` is set."""
  name: str
  shape: tuple[int, ...]
  view: View
  expert: int | None = None


@dataclasses.dataclass
class Layout:
  """`leaves`: esjax parameter path -> its parts (experts in order); `zeros`: HF-only tensors
  (name -> shape) written as zeros and ignored on import; `order`: HF names, file order."""
  leaves: dict[Path, list[Part]] = dataclasses.field(default_factory=dict)
  zeros: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  optional: set[str] = dataclasses.field(default_factory=set)  # tolerated on import
  order: dict[str, None] = dataclasses.field(default_factory=dict)  # an ordered set

  def add(self, path: Path, part: Part):
    self.leaves.setdefault(path, []).append(part)
    self.order[part.name] = None


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
  """The esjax parameter tree of `cfg` as ShapeDtypeStructs (nothing allocated)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def lookup(tree: Any, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _reshape(want: tuple[int, ...]) -> View:
  return lambda a: a.reshape(want)


def _linear(want: tuple[int, ...], n_in: int) -> View:
  """HF [prod(out), prod(in)] -> esjax `want` = (*in, *out)."""
  n_out = len(want) - n_in
  perm = tuple(range(n_out, n_out + n_in)) + tuple(range(n_out))
  return lambda a: a.reshape(*want[n_in:], *want[:n_in]).transpose(perm)


class PaddedRows:
  """An HF vocabulary tensor seen as the model's padded one: `array` with its axis `axis`
  extended to `size`. Reads of the padding are zeros (import); writes to it are dropped
  (export strips it). Indexed by tuples of slices or `...`, as `read_slice` and `fill` do."""

  def __init__(self, array: np.ndarray, axis: int, size: int):
    self.array, self.axis = array, axis
    self.shape = array.shape[:axis] + (size,) + array.shape[axis + 1:]

  def _split(self, index: Any) -> tuple[tuple[slice, ...], tuple[slice, ...], tuple[int, ...]]:
    """(index into `array`, index into the region, the region's shape) of a region index."""
    index = () if index is Ellipsis else tuple(index)
    index += (slice(None),) * (len(self.shape) - len(index))
    start, stop, step = index[self.axis].indices(self.shape[self.axis])
    if step != 1:
      raise ValueError(f"PaddedRows: strided index {index[self.axis]} is not supported")
    have = min(stop, self.array.shape[self.axis])
    src = list(index)
    src[self.axis] = slice(start, max(start, have))
    dst = [slice(None)] * len(index)
    dst[self.axis] = slice(0, max(0, have - start))
    return tuple(src), tuple(dst), region_shape(index, self.shape)

  def __getitem__(self, index: Any) -> np.ndarray:
    src, dst, shape = self._split(index)
    out = np.zeros(shape, self.array.dtype)
    out[dst] = self.array[src]
    return out

  def __setitem__(self, index: Any, value: Any) -> None:
    src, dst, shape = self._split(index)
    self.array[src] = np.broadcast_to(np.asarray(value), shape)[dst]


def _fused(lo: int, hi: int) -> View:
  """gate_up_proj [E, 2F, D] rows lo:hi -> [E, D, F]."""
  return lambda a: a[:, lo:hi].transpose(0, 2, 1)


def layout(cfg: ModelConfig, names: Collection[str] | None = None, abstract: Any = None
           ) -> Layout:
  """The HF tensors of `cfg`'s parameters. `names`: the tensors a checkpoint has (picks
  Mixtral's `block_sparse_moe` or transformers 5's fused `gate_up_proj` names, as found);
  None: the names `architecture_for(cfg)` is saved with. `abstract`: `abstract_params(cfg)`
  when the caller has it (it takes seconds for a large model)."""
  abstract = abstract_params(cfg) if abstract is None else abstract
  exporting = names is None
  arch = architecture_for(cfg) if exporting else None
  has = (lambda n: False) if exporting else (lambda n: n in names)
  lay = Layout()

  def shape(path: Path) -> tuple[int, ...]:
    return tuple(lookup(abstract, path).shape)

  def same(path: Path, name: str, flat: bool = False):
    want = shape(path)
    lay.add(path, Part(name, (math.prod(want),) if flat else want, _reshape(want)))

  def linear(path: Path, name: str, n_in: int = 1):
    want = shape(path)
    lay.add(path, Part(name, (math.prod(want[n_in:]), math.prod(want[:n_in])),
                       _linear(want, n_in)))

  def swiglu(path: Path, prefix: str):
    for param in ("w_gate", "w_up", "w_down"):
      linear(path + (param,), f"{prefix}{param[2:]}_proj.weight")

  def vocab(path: Path, name: str, axis: int):
    """The embedding (rows, axis 0) or the head (columns, axis 1) of a padded vocabulary:
    the HF tensor [vocab_size, D] holds its first vocab_size entries."""
    hf, padded = (cfg.vocab_size, cfg.d_model), shape(path)[axis]
    lay.add(path, Part(name, hf, lambda a: PaddedRows(a.reshape(hf) if axis == 0
                                                      else a.reshape(hf).T, axis, padded)))

  if cfg.padded_vocab != cfg.vocab_size:
    vocab(("embed",), "model.embed_tokens.weight", 0)
  else:
    same(("embed",), "model.embed_tokens.weight")
  for i in range(cfg.n_layers):
    p, path = f"model.layers.{i}.", ("layers", i)
    same(path + ("attn_norm", "scale"), p + "input_layernorm.weight")
    for n in "qkv":
      linear(path + ("attn", f"w{n}"), f"{p}self_attn.{n}_proj.weight")
      if cfg.qkv_bias:
        same(path + ("attn", f"b{n}"), f"{p}self_attn.{n}_proj.bias", flat=True)
    linear(path + ("attn", "wo"), p + "self_attn.o_proj.weight", n_in=2)
    if cfg.qk_norm != "none":
      for n in "qk":
        same(path + ("attn", f"{n}_norm", "scale"), f"{p}self_attn.{n}_norm.weight",
             flat=cfg.qk_norm == "full")
    same(path + ("mlp_norm", "scale"), p + "post_attention_layernorm.weight")
    if not cfg.is_moe_layer(i):
      swiglu(path + ("mlp",), p + "mlp.")
      continue
    mlp = path + ("mlp",)
    mixtral = arch == "MixtralForCausalLM" or has(p + "block_sparse_moe.gate.weight")
    prefix = p + ("block_sparse_moe." if mixtral else "mlp.")
    linear(mlp + ("router",), prefix + "gate.weight")
    if has(p + "mlp.experts.gate_up_proj"):  # transformers 5, in memory
      e, d, f = shape(mlp + ("w_gate",))
      lay.add(mlp + ("w_gate",), Part(p + "mlp.experts.gate_up_proj", (e, 2 * f, d), _fused(0, f)))
      lay.add(mlp + ("w_up",), Part(p + "mlp.experts.gate_up_proj", (e, 2 * f, d),
                                    _fused(f, 2 * f)))
      lay.add(mlp + ("w_down",), Part(p + "mlp.experts.down_proj", (e, d, f),
                                      lambda a: a.transpose(0, 2, 1)))
    else:
      projs = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
      for param, proj in zip(("w_gate", "w_up", "w_down"), projs):
        want = shape(mlp + (param,))
        for e in range(cfg.n_experts):
          lay.add(mlp + (param,), Part(f"{prefix}experts.{e}.{proj}.weight",
                                       (want[2], want[1]), _linear(want[1:], 1), e))
    shared = p + "mlp.shared_expert."
    if cfg.n_shared_experts:
      swiglu(mlp + ("shared",), shared)
      if cfg.shared_expert_gate:
        linear(mlp + ("shared_gate",), p + "mlp.shared_expert_gate.weight")
    elif arch == "Qwen2MoeForCausalLM" or has(shared + "gate_proj.weight"):
      # Qwen2-MoE always has a shared expert: a zero-width one adds exactly 0.
      d = cfg.d_model
      for name, zshape in ((shared + "gate_proj.weight", (0, d)),
                           (shared + "up_proj.weight", (0, d)),
                           (shared + "down_proj.weight", (d, 0)),
                           (p + "mlp.shared_expert_gate.weight", (1, d))):
        lay.zeros[name] = zshape
        lay.order[name] = None
  same(("final_norm", "scale"), "model.norm.weight")
  if cfg.tie_embeddings:
    lay.optional.add("lm_head.weight")  # some tied checkpoints store a copy
  elif cfg.padded_vocab != cfg.vocab_size:
    vocab(("lm_head",), "lm_head.weight", 1)
  else:
    linear(("lm_head",), "lm_head.weight")
  return lay


def check_tensors(lay: Layout, shapes: Mapping[str, tuple[int, ...]]) -> None:
  """ValueError naming the first tensor of `shapes` (name -> shape, a checkpoint) that is
  missing, mis-shaped or has no place in the layout."""
  for parts in lay.leaves.values():
    for part in parts:
      if part.name not in shapes:
        raise ValueError(f"checkpoint is missing tensor {part.name!r}")
      if tuple(shapes[part.name]) != part.shape:
        raise ValueError(f"checkpoint tensor {part.name!r} has shape "
                         f"{tuple(shapes[part.name])}, expected {part.shape}")
  for name, zshape in lay.zeros.items():
    if name in shapes and tuple(shapes[name]) != zshape:
      raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(shapes[name])}; the "
                       f"config has no shared expert, so expected {zshape} (zero width)")
  used = {p.name for parts in lay.leaves.values() for p in parts} | set(lay.zeros)
  unused = sorted(n for n in shapes
                  if n not in used and n not in lay.optional and not _IGNORED.search(n))
  if unused:
    raise ValueError(f"{len(unused)} checkpoint tensors have no place in the esjax model "
                     f"(wrong config?), e.g. {unused[:5]}")


def region_shape(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(len(range(n)[s]) for n, s in zip(shape, index))


def read_slice(parts: list[Part], tensors: Mapping[str, Any], index: tuple[slice, ...],
               shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """`parameter[index]` as a new numpy array of `dtype`, reading only that region of the
  HF tensors (`tensors[name]`: numpy arrays or memory maps)."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  if parts[0].expert is None:
    return np.array(parts[0].view(np.asarray(tensors[parts[0].name]))[index], dtype=dtype)
  out = np.empty(region_shape(index, shape), dtype)
  for j, e in enumerate(range(shape[0])[index[0]]):
    out[j] = parts[e].view(np.asarray(tensors[parts[e].name]))[index[1:]]
  return out


def placement(target: Any, spec: jax.ShapeDtypeStruct) -> tuple[Any, Any]:
  """(sharding, dtype) for one parameter: `target` is a Sharding, a ShapeDtypeStruct (with
  or without a sharding) or None (the default device, the model's dtype)."""
  if isinstance(target, jax.sharding.Sharding):
    return target, spec.dtype
  sharding = getattr(target, "sharding", None)
  dtype = spec.dtype if target is None else target.dtype
  return sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), dtype


def make_param(parts: list[Part], tensors: Mapping[str, Any], shape: tuple[int, ...],
               dtype: Any, sharding: Any) -> jax.Array:
  """One parameter, each device's shard read from `tensors` (a region read once however
  many local devices hold it, so host memory holds at most one copy of the parameter)."""
  read: dict[Any, np.ndarray] = {}

  def shard(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in read:
      read[key] = read_slice(parts, tensors, index, shape, dtype)
    return read[key]

  return jax.make_array_from_callback(shape, sharding, shard, dtype=dtype)


def hf_to_esjax_params(cfg: ModelConfig, tensors: Mapping[str, Any], *,
                       shardings: Any = None) -> dict[str, Any]:
  """The esjax parameter tree (a pure dict of jax arrays) from HF-named `tensors`.

  Args:
    cfg: the model config (e.g. from `config_from_hf`); shapes are checked against it.
    tensors: HF tensor name -> array; with memory maps (`SafetensorsFolder`) each device's
      shard is read straight from the file, one parameter at a time.
    shardings: optional tree like the parameters of `jax.sharding.Sharding`s, or of
      ShapeDtypeStructs (their sharding and dtype), per leaf; default: the first local
      device, the model's dtypes.

  Every tensor must find its place (besides RoPE's `inv_freq` buffers, `lm_head` when
  embeddings are tied, and Qwen2-MoE's zero-width shared expert when the config has none):
  an unused tensor means the config does not describe the checkpoint.
  """
  abstract = abstract_params(cfg)
  lay = layout(cfg, set(tensors), abstract)
  infos = getattr(tensors, "infos", None)  # a SafetensorsFolder knows shapes from headers
  check_tensors(lay, {n: infos[n].shape if infos else np.shape(tensors[n]) for n in tensors})
  out: dict[str, Any] = {}
  for path, parts in lay.leaves.items():
    spec = lookup(abstract, path)
    target = None if shardings is None else lookup(shardings, path)
    sharding, dtype = placement(target, spec)
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = make_param(parts, tensors, tuple(spec.shape), dtype, sharding)
  if jax.tree.structure(out) != jax.tree.structure(abstract):
    raise AssertionError("hf_to_esjax_params: built tree differs from the model's tree")
  return out


def to_pure_dict(params: Any) -> Any:
  """A pure dict of arrays from an `nnx.State` (or the pure dict itself)."""
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _uncached(a: jax.Array) -> np.ndarray:
  """`a` on the host, without the host copy staying attached to `a`: `np.asarray(a)` caches
  the copy it makes (off the CPU) on the array, which would keep every exported parameter
  on the host. On the CPU it is a view of the buffer, nothing copied or kept."""
  if all(d.platform == "cpu" for d in a.devices()):
    return np.asarray(a)
  return np.asarray(jnp.copy(a))  # the copy is cached on a temporary


def fill(dest: np.ndarray, x: Any, expert: int | None = None) -> None:
  """`dest[...] = x` (or `x[expert]`) for a parameter `x` (numpy, or a jax array with all
  its shards on this process), shard by shard into `dest` (a view of an HF tensor), so the
  host holds no other copy of the parameter."""
  if not isinstance(x, jax.Array):
    dest[...] = np.asarray(x) if expert is None else np.asarray(x)[expert]
    return
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    index = tuple(shard.index) + (slice(None),) * (x.ndim - len(shard.index))
    if expert is None:
      dest[index] = _uncached(shard.data)
      continue
    first, stop, _ = index[0].indices(x.shape[0])
    if first <= expert < stop:
      dest[index[1:]] = np.asarray(shard.data[expert - first])  # a new array: not kept


def tensor_specs(cfg: ModelConfig, dtype: str | None = None
                 ) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """(HF name, shape, dtype) of every tensor `iter_hf_tensors` yields, in the same order."""
  lay = layout(cfg)
  dt = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  shapes = {p.name: p.shape for parts in lay.leaves.values() for p in parts}
  return [(n, lay.zeros.get(n, shapes.get(n)), dt) for n in lay.order]


def iter_hf_tensors(cfg: ModelConfig, params: Any, dtype: str | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy array) pairs of esjax `params`, one at a time, for `architecture_for(cfg)`.

  `params` is a pure dict or `nnx.State` of the model's Params, possibly sharded over
  several processes (then each parameter is gathered in turn on every process: all must
  iterate); every tensor is cast to `dtype` (default `cfg.param_dtype`). Host memory: the
  tensor yielded, plus a gathered parameter when it spans processes.
  """
  lay = layout(cfg)
  params = to_pure_dict(params)
  dt = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  holders: dict[str, list[tuple[Path, Part]]] = {}
  for path, parts in lay.leaves.items():
    for part in parts:
      holders.setdefault(part.name, []).append((path, part))
  gathered: tuple[Path, np.ndarray] | None = None  # one parameter spanning processes
  for name in lay.order:
    if name in lay.zeros:
      yield name, np.zeros(lay.zeros[name], dt)
      continue
    tensor = np.empty(holders[name][0][1].shape, dt)
    for path, part in holders[name]:
      x = lookup(params, path)
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if gathered is None or gathered[0] != path:  # experts: gathered once for all
          gathered = None
          gathered = (path, multihost_utils.process_allgather(x, tiled=True))
        x = gathered[1]
      fill(part.view(tensor), x, part.expert)
    yield name, tensor


def esjax_to_hf_tensors(cfg: ModelConfig, params: Any, dtype: str | None = None
                        ) -> dict[str, np.ndarray]:
  """All HF tensors of `params` at once (see `iter_hf_tensors` to stream them)."""
  return dict(iter_hf_tensors(cfg, params, dtype))
