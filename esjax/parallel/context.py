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

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P


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
                   k_pos: jax.Array, k_valid: jax.Array | None = None) -> jax.Array:
  """`attention.attend` with q, k, v sharded over cp along the sequence (same contract).

  Each cp rank keeps its queries and passes its K/V block (with the blocks' positions, so
  the causal mask holds in any sequence order) around the ring; after cp steps every query
  has seen every key. Batch and heads stay sharded as the rules say (dp, tp).
  """
  if k_valid is not None:
    raise ValueError("ring attention is for training (no KV-cache slots)")
  cp = fm.axes("cp")
  seq4, seq2 = P(None, cp, None, None), P(None, cp)
  body = functools.partial(_ring_body, axes=cp, n=fm.layout.cp)
  return jax.shard_map(body, in_specs=(seq4, seq4, seq4, seq2, seq2), out_specs=seq4,
                       axis_names={"pp", *cp},  # pp: see pipeline.py
                       check_vma=fm.layout.pp == 1)(q, k, v, q_pos, k_pos)


def _ring_body(q, k, v, q_pos, k_pos, *, axes, n):
  """Online softmax over the n K/V blocks: running max m, denominator l, numerator acc."""
  b, sq, h, hd = q.shape
  g = k.shape[2]
  qg = q.reshape(b, sq, g, h // g, hd) * jnp.asarray(hd ** -0.5, q.dtype)
  perm = [(i, (i + 1) % n) for i in range(n)]

  def add_block(m, l, acc, k, v, k_pos):
    logits = jnp.einsum("bqgrk,bsgk->bgrqs", qg, k, preferred_element_type=jnp.float32)
    mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None, None]  # [B, 1, 1, Sq, Sk]
    logits = jnp.where(mask, logits, -jnp.inf)
    m_new = lax.stop_gradient(jnp.maximum(m, logits.max(-1)))  # any shift gives the same o
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # 0 for rows that saw no key yet
    p = jnp.exp(logits - shift[..., None])
    scale = jnp.exp(m - shift)
    l = l * scale + p.sum(-1)
    acc = acc * scale[..., None] + jnp.einsum("bgrqs,bsgk->bgrqk", p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
    return m_new, l, acc

  def step(carry, _):
    m, l, acc, k, v, k_pos = carry
    m, l, acc = add_block(m, l, acc, k, v, k_pos)
    k, v, k_pos = (lax.ppermute(x, axes, perm) for x in (k, v, k_pos))
    return (m, l, acc, k, v, k_pos), None

  stats = (b, g, h // g, sq)
  init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
          jnp.zeros((*stats, hd), jnp.float32))
  init = (*lax.pcast(init, axes, to="varying"), k, v, k_pos)  # carried like q's blocks
  (m, l, acc, k, v, k_pos), _ = lax.scan(step, init, None, length=n - 1)
  _, l, acc = add_block(m, l, acc, k, v, k_pos)  # the last block: no send after it
  o = acc / l[..., None]  # every query sees itself, so l > 0
  return o.transpose(0, 3, 1, 2, 4).reshape(b, sq, h, hd).astype(q.dtype)
