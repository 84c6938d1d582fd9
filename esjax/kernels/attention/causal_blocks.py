"""Plain attention when the positions are plain (0 .. S-1 in every row, queries = keys): the
queries are cut into blocks and each block attends to the keys it can see, so the causal
upper triangle (and, with a sliding window, the keys behind it) is never computed.

Every block is `reference.masked_attention` over its key range, with the same mask the
plain path applies, so the result is the plain path's. Block edges are static: the caller
vouches for the order (`ops.attend(plain_positions=True)`; the model does where it made the
positions itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esjax.kernels.attention.reference import masked_attention, visible

# Two halves skip a quarter of the logits. More blocks skip more (8: 7/16) and ran faster
# alone (benchmarks.attention --impl xla,xla+plain), but slower inside the train step, where
# each block's slices and small matmuls cost more than the skipped work saved.
MAX_BLOCKS = 2
MIN_ROWS = 16  # rows per query block, at least


def block_edges(seq: int) -> list[int]:
  """Query block boundaries 0 = e_0 < ... < e_n = seq: n = min(MAX_BLOCKS, seq // MIN_ROWS)
  blocks (at least one) of near-equal size."""
  n = max(1, min(MAX_BLOCKS, seq // MIN_ROWS))
  return [seq * i // n for i in range(n + 1)]


def causal_blocks_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                            sliding_window: int = 0) -> jax.Array:
  """`reference.xla_attention(q, k, v, pos, pos, sliding_window=...)` for pos = 0 .. S-1 in
  every row (q [B, S, H, hd]; k, v [B, S, KV, hd])."""
  seq = q.shape[1]
  if k.shape[1] != seq:
    raise ValueError(f"plain positions need as many keys as queries, got {k.shape[1]} keys "
                     f"for {seq} queries")
  edges = block_edges(seq)
  pos = np.arange(seq, dtype=np.int32)[None]
  outs = []
  for start, end in zip(edges[:-1], edges[1:]):
    lo = max(0, start - sliding_window + 1) if sliding_window else 0
    mask = visible(jnp.asarray(pos[:, start:end]), jnp.asarray(pos[:, lo:end]), None,
                   sliding_window)
    outs.append(masked_attention(q[:, start:end], k[:, lo:end], v[:, lo:end], mask))
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
