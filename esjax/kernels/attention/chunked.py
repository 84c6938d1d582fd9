"""Chunked (flash-style) attention in plain JAX: memory linear in the sequence length.

Queries are cut into blocks of `block_q` rows and keys into blocks of `block_k`. For each
query block a scan over the key blocks keeps the running max, denominator and numerator (the
online softmax), so one [B, H, block_q, block_k] logits block lives at a time. A
`jax.custom_vjp` keeps only the output and the logsumexp of each query; the backward pass
recomputes each block's probabilities (FlashAttention-2, Dao 2023, Algorithms 1 and 2).

Positions may come in any order (CP load balancing permutes the sequence). A block in which
no query can see any key, judged from the ranges of the block's positions (the causal upper
triangle, keys outside the sliding window, padding), is skipped with `lax.cond`; in plain
causal order that is about half the blocks.

`attention_block` returns (out, lse) and is differentiable in both: ring attention merges
the results of its K/V blocks with `merge`. A query that sees no key gets out = 0 and
lse = -inf (the plain path gives such a query the mean of all values instead).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from esjax.kernels.attention.reference import visible

# Default block_q = block_k by backend. CPU: measured (benchmarks/attention.py; 64-128 beat
# 256-512 by 2-4x at seq 1024-2048). Elsewhere: fewer, larger blocks (not measured here).
SCOPE = "core_attn"  # named scope of core attention (esjax.plan counts its FLOPs by it)
BLOCKS = {"cpu": 128}
BLOCK = 512
_BIG = jnp.iinfo(jnp.int32).max


def default_block(platform: str | None = None) -> int:
  """block_q and block_k when the caller gives none: by the platform the program is compiled
  for (default: the default backend's)."""
  return BLOCKS.get(platform or jax.default_backend(), BLOCK)


def _rows(x: jax.Array, i: jax.Array, size: int) -> jax.Array:
  """Block i of `size` rows along axis 1 (the sequence)."""
  return lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _put_rows(x: jax.Array, block: jax.Array, i: jax.Array) -> jax.Array:
  return lax.dynamic_update_slice_in_dim(x, block, i * block.shape[1], axis=1)


def _pad(x: jax.Array, n: int, **kw) -> jax.Array:
  """x padded along axis 1 to length n (no copy when it has that length)."""
  if x.shape[1] == n:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, n - x.shape[1])
  return jnp.pad(x, widths, **kw)


def _padded(q, k, v, q_pos, k_pos, k_valid, block_q, block_k):
  """Operands padded to whole blocks, and the block sizes (bq, bk)."""
  sq, sk = q.shape[1], k.shape[1]
  bq, bk = min(block_q, sq), min(block_k, sk)
  nq, nk = -(-sq // bq) * bq, -(-sk // bk) * bk
  q_pos = _pad(q_pos, nq, mode="edge")  # padded queries: a real query's range, dropped later
  k_valid = _pad(k_valid, nk)  # padded keys: invalid
  return (_pad(q, nq), _pad(k, nk), _pad(v, nk), q_pos, _pad(k_pos, nk), k_valid), (bq, bk)


def _vma(*xs) -> tuple[str, ...]:
  """The manual mesh axes (inside a shard_map) any of xs varies over: what a loop carry
  built from constants must vary over too (jax 0.10 spells it `aval.mat.varying`)."""
  return tuple(sorted(frozenset().union(*(jax.typeof(x).mat.varying for x in xs))))


def _zeros(shape, axes, value=0.0):
  """A float32 constant varying over `axes`, as the values computed from the operands."""
  x = jnp.full(shape, value, jnp.float32)
  return lax.pcast(x, axes, to="varying") if axes else x


def _live(q_pos, k_pos, k_valid, bq, bk, sliding_window):
  """[nq, nk] bool: False where no query of the block sees any key of the block (per row of
  the batch, then any over the batch). Conservative: True may still hide an empty block."""
  b = q_pos.shape[0]
  qb = q_pos.reshape(b, -1, bq)
  kb, vb = k_pos.reshape(b, -1, bk), k_valid.reshape(b, -1, bk)
  q_lo, q_hi = qb.min(-1), qb.max(-1)  # [B, nq]
  k_lo = jnp.where(vb, kb, _BIG).min(-1)  # [B, nk]
  k_hi = jnp.where(vb, kb, -_BIG).max(-1)
  live = k_lo[:, None] <= q_hi[:, :, None]
  if sliding_window:
    live &= k_hi[:, None] > q_lo[:, :, None] - sliding_window
  return live.any(0)


def _logits(qi, kj, qpi, kpj, kvj, sliding_window):
  """qi [B, bq, KV, R, hd], kj [B, bk, KV, hd] -> [B, KV, R, bq, bk] float32, -inf where
  masked."""
  s = jnp.einsum("bqgrd,bkgd->bgrqk", qi, kj, preferred_element_type=jnp.float32)
  s = s * qi.shape[-1] ** -0.5
  return jnp.where(visible(qpi, kpj, kvj, sliding_window)[:, None, None], s, -jnp.inf)


def _by_row(x: jax.Array) -> jax.Array:
  """[B, KV, R, bq, ...] -> [B, bq, KV*R, ...] (the layout of q's rows)."""
  b, g, r, bq = x.shape[:4]
  return jnp.moveaxis(x, 3, 1).reshape(b, bq, g * r, *x.shape[4:])


def _forward(q, k, v, q_pos, k_pos, k_valid, live, sliding_window, bq, bk):
  """(out [B, Sq, H, hd] float32, lse [B, Sq, H]) of padded operands."""
  b, sq, h, hd = q.shape
  g = k.shape[2]
  axes = _vma(q, k, v, q_pos, k_pos, k_valid)

  def q_block(carry, i):
    qi, qpi = _rows(q, i, bq).reshape(b, bq, g, h // g, hd), _rows(q_pos, i, bq)

    def k_block(stats, j):
      def add(stats):
        m, l, acc = stats
        vj = _rows(v, j, bk)
        s = _logits(qi, _rows(k, j, bk), qpi, _rows(k_pos, j, bk), _rows(k_valid, j, bk),
                    sliding_window)
        m_new = jnp.maximum(m, s.max(-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that saw no key yet
        p = jnp.exp(s - shift[..., None])
        alpha = jnp.exp(m - shift)
        pv = jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), vj,
                        preferred_element_type=jnp.float32)
        return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv
      return lax.cond(live[i, j], add, lambda st: st, stats), None

    shape = (b, g, h // g, bq)
    init = (_zeros(shape, axes, -jnp.inf), _zeros(shape, axes), _zeros((*shape, hd), axes))
    (m, l, acc), _ = lax.scan(k_block, init, jnp.arange(k.shape[1] // bk))
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    out, lse = carry
    out = _put_rows(out, _by_row(acc / l[..., None]), i)
    lse = _put_rows(lse, _by_row(jnp.where(seen, m + jnp.log(l), -jnp.inf)), i)
    return (out, lse), None

  init = (_zeros((b, sq, h, hd), axes), _zeros((b, sq, h), axes))
  (out, lse), _ = lax.scan(q_block, init, jnp.arange(sq // bq))
  return out, lse


def _backward(q, k, v, q_pos, k_pos, k_valid, live, sliding_window, bq, bk, dout, lse, delta):
  """(dq, dk, dv) float32 of padded operands. lse: +inf on rows whose p is 0 (no key seen,
  padding); delta = rowsum(dout * out) - dlse."""
  b, sq, h, hd = q.shape
  g = k.shape[2]
  axes = _vma(q, k, v, q_pos, k_pos, k_valid, dout, lse, delta)
  scale = hd ** -0.5
  by_group = lambda x: x.reshape(b, bq, g, h // g).transpose(0, 2, 3, 1)  # [B, KV, R, bq]

  def q_block(carry, i):
    qi = _rows(q, i, bq).reshape(b, bq, g, h // g, hd)
    doi = _rows(dout, i, bq).reshape(b, bq, g, h // g, hd)
    qpi, lsei, di = _rows(q_pos, i, bq), by_group(_rows(lse, i, bq)), by_group(_rows(delta, i, bq))

    def k_block(acc, j):
      def grads(_):
        kj, vj = _rows(k, j, bk), _rows(v, j, bk)
        s = _logits(qi, kj, qpi, _rows(k_pos, j, bk), _rows(k_valid, j, bk), sliding_window)
        p = jnp.exp(s - lsei[..., None])  # masked (s = -inf) or lse = +inf: 0
        dvj = jnp.einsum("bgrqk,bqgrd->bkgd", p.astype(dout.dtype), doi,
                         preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqgrd,bkgd->bgrqk", doi, vj, preferred_element_type=jnp.float32)
        ds = (p * (dp - di[..., None]) * scale).astype(q.dtype)
        dqj = jnp.einsum("bgrqk,bkgd->bqgrd", ds, kj, preferred_element_type=jnp.float32)
        dkj = jnp.einsum("bgrqk,bqgrd->bkgd", ds, qi, preferred_element_type=jnp.float32)
        return dqj, dkj, dvj

      def zeros(_):
        return _zeros(qi.shape, axes), _zeros((b, bk, g, hd), axes), _zeros((b, bk, g, hd), axes)

      dqi, dk, dv = acc
      dqj, dkj, dvj = lax.cond(live[i, j], grads, zeros, None)
      dk = _put_rows(dk, _rows(dk, j, bk) + dkj, j)
      dv = _put_rows(dv, _rows(dv, j, bk) + dvj, j)
      return (dqi + dqj, dk, dv), None

    dq, dk, dv = carry
    (dqi, dk, dv), _ = lax.scan(k_block, (_zeros(qi.shape, axes), dk, dv),
                                jnp.arange(k.shape[1] // bk))
    return (_put_rows(dq, dqi.reshape(b, bq, h, hd), i), dk, dv), None

  init = (_zeros(q.shape, axes), _zeros(k.shape, axes), _zeros(v.shape, axes))
  (dq, dk, dv), _ = lax.scan(q_block, init, jnp.arange(sq // bq))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, q_pos, k_pos, k_valid, sliding_window, block_q, block_k):
  return _attention_fwd(q, k, v, q_pos, k_pos, k_valid, sliding_window, block_q, block_k)[0]


def _attention_fwd(q, k, v, q_pos, k_pos, k_valid, sliding_window, block_q, block_k):
  # Inside a differentiated lax.scan (the engine's scan over layers) JAX's partial evaluation
  # treats what the positions alone determine (the block masks) as known and saves it for
  # every block of every layer: O(S^2) (5.4 GiB of temporaries for the tiny MoE at 16k).
  # Tying the positions to q makes the masks part of the computation that runs here.
  q, k, v, q_pos, k_pos, k_valid = lax.optimization_barrier((q, k, v, q_pos, k_pos, k_valid))
  padded, (bq, bk) = _padded(q, k, v, q_pos, k_pos, k_valid, block_q, block_k)
  live = _live(*padded[3:], bq, bk, sliding_window)
  with jax.named_scope(SCOPE):  # the rules run where the differentiation does
    out, lse = _forward(*padded, live, sliding_window, bq, bk)
  sq = q.shape[1]
  out, lse = out[:, :sq], lse[:, :sq]
  return (out, lse), (q, k, v, q_pos, k_pos, k_valid, out.astype(q.dtype), lse)


def _attention_bwd(sliding_window, block_q, block_k, res, cotangents):
  q, k, v, q_pos, k_pos, k_valid, out, lse = res
  dout, dlse = cotangents
  padded, (bq, bk) = _padded(q, k, v, q_pos, k_pos, k_valid, block_q, block_k)
  live = _live(*padded[3:], bq, bk, sliding_window)
  sq, nq = q.shape[1], padded[0].shape[1]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1) - dlse
  # lse = +inf gives p = 0: rows that see no key (lse = -inf) and the padding rows.
  lse = _pad(jnp.where(lse == -jnp.inf, jnp.inf, lse), nq, constant_values=jnp.inf)
  with jax.named_scope(SCOPE):
    dq, dk, dv = _backward(*padded, live, sliding_window, bq, bk,
                           _pad(dout.astype(q.dtype), nq), lse, _pad(delta, nq))
  sk = k.shape[1]
  return (dq[:, :sq].astype(q.dtype), dk[:, :sk].astype(k.dtype), dv[:, :sk].astype(v.dtype),
          None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention_block(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                    k_pos: jax.Array, k_valid: jax.Array | None = None, *,
                    sliding_window: int = 0, block_q: int | None = None,
                    block_k: int | None = None, platform: str | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """(out [B, Sq, H, hd] float32, lse [B, Sq, H] float32): softmax attention of q over these
  keys and the log of its denominator (-inf where a query sees no key; out is 0 there).
  Differentiable in both outputs; same contract as `reference.xla_attention`. Blocks of
  None: `default_block(platform)`."""
  block_q = block_q or default_block(platform)
  block_k = block_k or default_block(platform)
  if block_q < 1 or block_k < 1:
    raise ValueError(f"block_q={block_q} and block_k={block_k} must be >= 1")
  if k_valid is None:
    k_valid = jnp.ones(k_pos.shape, bool)
  return _attention(q, k, v, q_pos, k_pos, k_valid, int(sliding_window), block_q, block_k)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                      k_pos: jax.Array, k_valid: jax.Array | None = None, *,
                      sliding_window: int = 0, block_q: int | None = None,
                      block_k: int | None = None, platform: str | None = None) -> jax.Array:
  """`attention_block`'s output in q's dtype (a query that sees no key gets 0)."""
  out, _ = attention_block(q, k, v, q_pos, k_pos, k_valid, sliding_window=sliding_window,
                           block_q=block_q, block_k=block_k, platform=platform)
  return out.astype(q.dtype)


def merge(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]
          ) -> tuple[jax.Array, jax.Array]:
  """The (out, lse) of attention over the union of two disjoint key sets, from each set's
  (out [..., hd], lse [...]); either side may have lse = -inf (it saw no key)."""
  (out_a, lse_a), (out_b, lse_b) = a, b
  m = lax.stop_gradient(jnp.maximum(lse_a, lse_b))  # any shift gives the same result
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = w_a + w_b
  safe = jnp.where(total > 0, total, 1.0)
  out = (out_a * w_a[..., None] + out_b * w_b[..., None]) / safe[..., None]
  return out, jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
