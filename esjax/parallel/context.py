"""Context parallelism: attention over a sequence sharded over cp, with causal load balancing.

`allgather` (default): queries stay sharded over cp and the rules replicate K and V along the
sequence (`act_kv_len` -> no axis), so XLA all-gathers K/V over cp before the attention
einsum. `ring`: a `shard_map` passes K/V blocks around the cp ring with `ppermute` and merges
the partial softmaxes by their logsumexp, so no device holds the whole K/V; each block runs
the chunked kernel, so memory stays linear in the sequence.

Causal load balancing: with a causal mask the last sequence chunk does the most work. The
sequence is cut into 2*cp chunks and cp rank i holds chunks i and 2cp-1-i
(`sequence_permutation`). The train step permutes inputs, targets, mask and positions once
(`reorder_batch`); attention masks by the carried positions, and the MoE token-dropping
decision is taken in the original order, so results equal the unpermuted run.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from esjax.kernels.attention import chunked


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


def with_positions(batch: dict) -> dict:
  """`batch` with `positions` [B, S] (0 .. S-1 in every row) unless it has them."""
  if "positions" in batch:
    return batch
  inputs = batch["inputs"]
  return dict(batch, positions=jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32),
                                                inputs.shape))


def reorder_batch(layout, batch: dict) -> dict:
  """Permutes every [B, S] array of `batch` into load-balanced order, adding `positions`."""
  inputs = batch["inputs"]
  perm = sequence_permutation(layout, inputs.shape[1])
  if perm is None:
    return batch
  out = dict(with_positions(batch))  # a copy: the caller's batch stays as it is
  for key, value in out.items():
    if getattr(value, "ndim", 0) >= 2 and value.shape[:2] == inputs.shape:
      out[key] = value[:, perm]
  return out


def attention_fn(fm) -> Callable | None:
  """The `hooks.attention_override` for folded mesh `fm` (None: plain attention + rules)."""
  if fm.layout.cp == 1 or fm.layout.cp_impl == "allgather":
    return None
  return functools.partial(ring_attention, fm)


def ring_attention(fm, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                   k_pos: jax.Array, k_valid: jax.Array | None = None, *,
                   sliding_window: int = 0) -> jax.Array:
  """`ops.attend` with q, k, v sharded over cp along the sequence (same contract).

  Each cp rank keeps its queries and passes its K/V block (with the blocks' positions, so
  the causal mask holds in any sequence order) around the ring; after cp steps every query
  has seen every key. Batch and heads stay sharded as the rules say (dp, tp).
  """
  if k_valid is not None:
    raise ValueError("ring attention is for training (no KV-cache slots)")
  cp = fm.axes("cp")
  seq4, seq2 = P(None, cp, None, None), P(None, cp)
  body = functools.partial(ring_body, axes=cp, n=fm.layout.cp, sliding_window=sliding_window)
  return jax.shard_map(body, in_specs=(seq4, seq4, seq4, seq2, seq2), out_specs=seq4,
                       axis_names={"pp", *cp},  # pp: see pipeline.py
                       check_vma=fm.layout.pp == 1)(q, k, v, q_pos, k_pos)


def ring_body(q, k, v, q_pos, k_pos, *, axes, n, sliding_window=0):
  """Ring attention of the local blocks, inside a shard_map where `axes` (n ranks) are manual.

  Each step runs the chunked block kernel (`chunked.attention_block`: memory linear in the
  block, recomputing custom VJP) on the K/V block at hand and merges it into the running
  (out, lse); then the K/V block moves one rank along the ring (`ppermute`).
  """
  perm = [(i, (i + 1) % n) for i in range(n)]

  def add_block(acc, k, v, k_pos):
    part = chunked.attention_block(q, k, v, q_pos, k_pos, sliding_window=sliding_window)
    return chunked.merge(acc, part)

  def step(carry, _):
    acc, k, v, k_pos = carry
    acc = add_block(acc, k, v, k_pos)
    k, v, k_pos = (lax.ppermute(x, axes, perm) for x in (k, v, k_pos))
    return (acc, k, v, k_pos), None

  acc = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32))
  acc = lax.pcast(acc, axes, to="varying")  # carried like q's blocks
  (acc, k, v, k_pos), _ = lax.scan(step, (acc, k, v, k_pos), None, length=n - 1)
  out, _ = add_block(acc, k, v, k_pos)  # the last block: no send after it
  return out.astype(q.dtype)
