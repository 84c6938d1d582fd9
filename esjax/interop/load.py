"""A Hugging Face folder read straight into a run's sharded layout, and the host memory that
takes, computed from the safetensors headers and the target shardings alone.

`read_params(folder, target)` builds one parameter at a time: for each, every local device's
shard is read from the memory-mapped tensors (only that region of the file), converted to
the parameter's layout and dtype, and handed to `jax.make_array_from_callback`; a region
that several local devices hold is read once. So the host holds at most one parameter's
local shards (anonymous memory, at most one copy of the parameter) plus the mapped pages of
the tensors it reads (file-backed, released when the parameter is built). `host_plan` adds
that up, parameter by parameter, without reading any data.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from esjax.interop import hf_config, hf_params, safetensors_io
from esjax.models.config import ModelConfig

Target = Any  # params-like tree of Shardings / ShapeDtypeStructs, or a function of the config


def is_hf_folder(path: str | os.PathLike) -> bool:
  """A folder with a config.json naming an architecture, and safetensors weights."""
  path = Path(path).expanduser()
  config = path / "config.json"
  if not path.is_dir() or not config.is_file():
    return False
  has_weights = any(p.suffix == ".safetensors" for p in path.iterdir())
  try:
    return has_weights and "architectures" in json.loads(config.read_text(encoding="utf-8"))
  except ValueError:  # a damaged config.json beside weights: read_config says so
    return has_weights


def read_config(folder: str | os.PathLike, **overrides: Any) -> ModelConfig:
  """ModelConfig of `folder/config.json` (see `hf_config.config_from_hf`)."""
  path = Path(folder) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face model folder")
  try:
    hf = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:  # also UnicodeDecodeError
    raise ValueError(f"{path}: not JSON ({str(e)[:80]})") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}")
  return hf_config.config_from_hf(hf, **overrides)


def _resolve(target: Target | Callable[[ModelConfig], Any], cfg: ModelConfig) -> Any:
  return target(cfg) if callable(target) else target


def read_params(folder: str | os.PathLike, target: Target = None, **overrides: Any
                ) -> tuple[ModelConfig, dict[str, Any]]:
  """(model config, parameters) of a local HF folder, like `checkpoint.restore_params`.

  `target`: a tree like the parameters of Shardings or ShapeDtypeStructs (sharding and
  dtype per leaf), or a function of the folder's model config returning one; None: the
  first local device, the checkpoint's dtype. `overrides` replace config fields.
  """
  cfg = read_config(folder, **overrides)
  tensors = safetensors_io.SafetensorsFolder(folder)
  return cfg, hf_params.hf_to_esjax_params(cfg, tensors, shardings=_resolve(target, cfg))


def host_plan(folder: str | os.PathLike, target: Target = None, **overrides: Any
              ) -> dict[str, Any]:
  """Peak host bytes of `read_params(folder, target)`, from headers and shardings only.

  Per parameter: `anon` = the distinct local shard regions in the target dtype (the numpy
  buffers handed to the devices), `mapped` = the source tensors it reads (file-backed). The
  peak is the largest sum, as parameters are built one after another. Device buffers are
  not host memory on an accelerator and are not counted; `device_bytes` is the most any
  one device holds of the source. Nothing is allocated or read.
  """
  cfg = read_config(folder, **overrides)
  tensors = safetensors_io.SafetensorsFolder(folder)
  abstract = hf_params.abstract_params(cfg)
  lay = hf_params.layout(cfg, set(tensors.infos), abstract)
  hf_params.check_tensors(lay, {n: i.shape for n, i in tensors.infos.items()})
  target = _resolve(target, cfg)
  peak = {"bytes": 0}
  per_device: dict[Any, int] = {}
  for path, parts in lay.leaves.items():
    spec = hf_params.lookup(abstract, path)
    sharding, dtype = hf_params.placement(
        None if target is None else hf_params.lookup(target, path), spec)
    shape, itemsize = tuple(spec.shape), np.dtype(dtype).itemsize
    regions = {tuple((s.start, s.stop) for s in index): index
               for index in sharding.addressable_devices_indices_map(shape).values()}
    anon = sum(math.prod(hf_params.region_shape(i, shape)) * itemsize
               for i in regions.values())
    if parts[0].expert is None:
      read = {parts[0].name}
    else:
      read = {parts[e].name for i in regions.values() for e in range(shape[0])[i[0]]}
    mapped = sum(tensors.infos[n].nbytes for n in read)
    if anon + mapped > peak["bytes"]:
      peak = {"bytes": anon + mapped, "anon": anon, "mapped": mapped,
              "param": ".".join(map(str, path))}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      per_device[device] = (per_device.get(device, 0)
                            + math.prod(hf_params.region_shape(index, shape)) * itemsize)
  total = sum(i.nbytes for i in tensors.infos.values())
  return {"peak_host_bytes": peak["bytes"], "peak_anon_bytes": peak["anon"],
          "peak_mapped_bytes": peak["mapped"], "peak_param": peak["param"],
          "checkpoint_bytes": total, "largest_file_bytes": max(
              sum(i.nbytes for i in tensors.infos.values() if i.file == f)
              for f in {i.file for i in tensors.infos.values()}),
          "device_bytes": max(per_device.values()), "devices": len(per_device),
          "processes": jax.process_count()}
