"""Index arithmetic of the sampler: O(1)-memory shuffles and deterministic source blends.

Both are pure functions of integers, so any example of the endless training stream can be
computed directly (no state but the position, any process can compute any row):

- `permute(i, n, key)`: a pseudo-random permutation of `range(n)` evaluated at the indices
  `i`, without materialising it: a balanced Feistel network on the smallest even number of
  bits that covers `n`, walking cycles until the result falls inside `range(n)` (Grain's
  `index_shuffle` is the same construction). Memory is O(len(i)), not O(n).
- `Blend(weights)`: example `e` of the stream goes to source `source[e % P]` as that
  source's example number `(e // P) * quota[source] + rank[e % P]`. Within a period of
  `P = 100_000` examples source s gets `quota[s]` slots (its weight rounded, largest
  remainders), spread evenly (slot k of source s at time (k + 1/2) * P / quota[s]), so
  every prefix of the stream holds each source's share to within about one example.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective avalanche of uint64 values."""
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, keys: np.ndarray, half: np.uint64, mask: np.uint64) -> np.ndarray:
  left, right = x >> half, x & mask
  for k in keys:
    left, right = right, left ^ (_mix(right ^ k) & mask)
  return (left << half) | right


def permute(i: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
  """Position-`i` values of the permutation of `range(n)` selected by `key` (int64)."""
  i = np.asarray(i, np.int64)
  if n <= 0 or (i.size and (i.min() < 0 or i.max() >= n)):
    raise ValueError(f"permute: indices must lie in [0, n={n})")
  if n == 1:
    return np.zeros_like(i)
  bits = max(2, int(n - 1).bit_length())
  bits += bits % 2
  half = np.uint64(bits // 2)
  mask = np.uint64((1 << (bits // 2)) - 1)
  keys = np.random.default_rng(list(key)).integers(0, 2**63, _ROUNDS, dtype=np.uint64)
  y = _feistel(i.astype(np.uint64).reshape(-1), keys, half, mask)
  outside = y >= n
  while outside.any():  # Cycle walking: the domain is < 4n, so a few rounds at most.
    y[outside] = _feistel(y[outside], keys, half, mask)
    outside = y >= n
  return y.astype(np.int64).reshape(i.shape)


class Blend:
  """Which source, and which of its examples, each example of a blended stream is."""

  PERIOD = 100_000

  def __init__(self, weights: Sequence[float]):
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
      raise ValueError(f"blend weights {list(weights)} must be positive numbers")
    exact = w / w.sum() * self.PERIOD
    quota = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - quota), kind="stable")
    quota[remainder_order[:self.PERIOD - quota.sum()]] += 1
    if np.any(quota == 0):
      raise ValueError(f"blend weights {list(weights)}: each weight must be at least "
                       f"1/{self.PERIOD} of their sum")
    self.weights = w / w.sum()
    self.quota = quota
    source = np.repeat(np.arange(len(w)), quota)
    rank = np.concatenate([np.arange(q) for q in quota])
    order = np.argsort((rank + 0.5) / quota[source], kind="stable")
    self._source, self._rank = source[order], rank[order]

  def locate(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, example number within that source) of stream examples `e`."""
    e = np.asarray(e, np.int64)
    period, slot = np.divmod(e, self.PERIOD)
    source = self._source[slot]
    return source, period * self.quota[source] + self._rank[slot]
