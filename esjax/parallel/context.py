"""Context parallelism: attention over a sequence sharded over cp, with causal load balancing.

`allgather` (default): queries stay sharded over cp and the rules replicate K and V along the
sequence (`act_kv_len` -> no axis), so XLA all-gathers K/V over cp before the attention
einsum. `ring`: a `shard_map` passes K/V blocks around the cp ring with `ppermute` and merges
the partial softmaxes (online softmax), so no device holds the whole K/V.

Causal load balancing: with a causal mask the last sequence chunk does the most work. The
sequence is cut into 2*cp chunks and cp rank i holds chunks i and 2cp-1-i
(`sequence_permutation`). The train step permutes inputs, targets, mask and positions once
(`reorder_batch`); attention masks by the carried positions, and the MoE token-dropping
decision is taken in the original order, so results equal the unpermuted run.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def sequence_permutation(layout, seq_len: int) -> np.ndarray | None:
  """perm with reordered[:, j] = original[:, perm[j]], or None when nothing is permuted."""
  cp = layout.cp
  if cp == 1 or not layout.cp_load_balance:
    return None
  if seq_len % (2 * cp):
    raise ValueError(f"sequence length {seq_len} is not divisible by 2*cp = {2 * cp} "
                     f"(causal load balancing)")
  chunks = np.arange(seq_len).reshape(2 * cp, seq_len // (2 * cp))
  order = [c for i in range(cp) for c in (i, 2 * cp - 1 - i)]
  return chunks[order].reshape(-1)


def reorder_batch(layout, batch: dict) -> dict:
  """Permutes every [B, S] array of `batch` into load-balanced order, adding `positions`."""
  inputs = batch["inputs"]
  perm = sequence_permutation(layout, inputs.shape[1])
  if perm is None:
    return batch
  out = dict(batch)
  if "positions" not in out:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    out["positions"] = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32),
                                        inputs.shape)
  for key, value in out.items():
    if getattr(value, "ndim", 0) >= 2 and value.shape[:2] == inputs.shape:
      out[key] = value[:, perm]
  return out


def attention_fn(fm) -> Callable | None:
  """The `hooks.attention_override` for folded mesh `fm` (None: plain attention + rules)."""
  if fm.layout.cp == 1 or fm.layout.cp_impl == "allgather":
    return None
  raise NotImplementedError("ring attention lands in a later commit")
