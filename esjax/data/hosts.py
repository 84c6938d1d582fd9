"""Per-process rows: each process reads only the rows of the global batch its devices hold.

    rows = hosts.process_rows(batch_sharding, (batch_size, seq_len))   # once
    local = data.train.next_rows(rows)                                 # every step
    batch = hosts.global_batch(local, rows, batch_sharding, batch_size)

`process_rows` is the sorted global row indices of a [B, S] batch that this process's
addressable devices hold under `sharding` (all rows with no sharding, or when the batch is
replicated); `global_batch` builds the global `jax.Array`s from those rows alone (each
device's block cut from them: a sequence-sharded layout (cp) cuts columns too).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding

Batch = dict[str, np.ndarray]


def process_rows(sharding: Sharding | None, shape: tuple[int, int]) -> np.ndarray:
  """Sorted global row indices of a `shape` = [B, S] batch held by this process's devices."""
  batch = shape[0]
  if sharding is None:
    return np.arange(batch)
  held = np.zeros(batch, bool)
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    held[index[0] if index else slice(None)] = True
  return np.flatnonzero(held)


def global_batch(local: Batch, rows: np.ndarray, sharding: Sharding, batch_size: int
                 ) -> dict[str, jax.Array]:
  """Global [B, ...] arrays from this process's rows: `local[k][i]` is global row `rows[i]`,
  and `rows` covers every row this process's devices hold (`process_rows`)."""
  rows = np.asarray(rows)

  def put(x: np.ndarray) -> jax.Array:
    if len(x) != len(rows):
      raise ValueError(f"global_batch: {len(x)} local rows for {len(rows)} row indices")
    shape = (batch_size,) + x.shape[1:]

    def block(index: tuple) -> np.ndarray:
      wanted = np.arange(batch_size)[index[0]] if index else np.arange(batch_size)
      at = np.searchsorted(rows, wanted)
      if np.any(at >= len(rows)) or np.any(rows[np.minimum(at, len(rows) - 1)] != wanted):
        raise ValueError(f"global_batch: a device of this process holds rows {wanted.tolist()}"
                         f" but only rows {rows.tolist()} were read")
      return x[at][(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, sharding, block)

  return {k: put(v) for k, v in local.items()}
