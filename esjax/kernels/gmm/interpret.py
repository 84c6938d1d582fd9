"""Pallas' GPU interpreter (jax 0.10.2: private) for running the grouped-matmul kernels on the
CPU (tests, the benchmark's smoke run), with the one thing it lacks: a wgmma operand read
through `transpose_ref` (its wgmma applies only the index transforms of an operand; the
kernels transpose an operand in shared memory). `with transposes_supported() as params:`
then `interpret=params`."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax._src.pallas.mosaic.interpret import utils
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret import params
from jax._src.state.types import TransposeTransform

PARAMS = params.InterpretGPUParams()  # uninitialized memory reads as NaN


def _transposed_wgmma(*, token, device_id, grid_point_coords, thread_id,
                      acc_allocation_key_as_array, acc_transforms, acc_dtype,
                      a_allocation_key_as_array, a_transforms, b_allocation_key_as_array,
                      b_transforms, source_info=None):
  """gpu_callbacks.wgmma, reading each operand with its index transforms and then applying
  its transposes in order."""
  # pylint: disable=protected-access
  memory = gpu_callbacks._get_shared_memory()
  active = gpu_callbacks._remove_noop_transforms  # drops the tiling and swizzling
  thread = memory.get_global_thread_id(int(device_id), int(thread_id))
  info = utils.GPULoggingInfo(device_id=int(device_id),
                              grid_point_coords=tuple(int(x) for x in grid_point_coords),
                              thread_id=int(thread_id), source_info=source_info)

  def read(key, transforms):
    transforms = active(transforms)
    index = [t for t in transforms if not isinstance(t, TransposeTransform)]
    value, _, _ = memory.get_buffer_content(
        gpu_callbacks.HostAllocationKey.from_array(key),
        utils.to_range([_ints(t) for t in index]), thread, logging_info=info)
    for t in transforms:
      if isinstance(t, TransposeTransform):
        value = np.transpose(value, t.permutation)
    return value

  a = read(a_allocation_key_as_array, a_transforms)
  b = read(b_allocation_key_as_array, b_transforms)
  acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array)
  acc_range = utils.to_range([_ints(t) for t in active(acc_transforms)])
  acc, _, _ = memory.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
  memory.store_buffer_content(acc_key, acc_range, acc + np.matmul(a, b, dtype=acc_dtype),
                              thread, logging_info=info)
  return token


def _ints(transform):
  return jax.tree.map(int, transform)


@contextlib.contextmanager
def transposes_supported():
  """The interpreter's parameters, with its wgmma replaced inside the block."""
  original = gpu_callbacks.wgmma
  gpu_callbacks.wgmma = _transposed_wgmma
  try:
    yield PARAMS
  finally:
    gpu_callbacks.wgmma = original
