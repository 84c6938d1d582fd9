"""Index arithmetic of the sampler: O(1)-memory shuffles and deterministic source blends.

Both are pure functions of integers, so any example of the endless training stream can be
computed directly (no state but the position, any process can compute any row):

- `permute(i, n, key)`: a pseudo-random permutation of `range(n)` evaluated at the indices
  `i`, without materialising it: a six-round Feistel network on [0, m*m), m = ceil(sqrt(n)),
  whose two halves are digits base m, walking cycles until the result falls inside
  `range(n)` (Grain's `index_shuffle` is the same idea on bit halves). Memory is
  O(len(i)), not O(n); the round keys come from `key` (e.g. seed, source, epoch).
- `Blend(weights)`: example `e` of the stream goes to source `source[e % P]` as that
  source's example number `(e // P) * quota[source] + rank[e % P]`. Within a period of
  `P = 100_000` examples source s gets `quota[s]` slots (its weight rounded, largest
  remainders), spread evenly (slot k of source s at time (k + 1/2) * P / quota[s]), so
  every prefix of the stream holds each source's share to within about one example.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_ROUNDS = 6
_MASK = (1 << 64) - 1
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix_int(x: int) -> int:
  """SplitMix64's finaliser on a Python int (the key schedule)."""
  x = ((x ^ (x >> 30)) * _M1) & _MASK
  x = ((x ^ (x >> 27)) * _M2) & _MASK
  return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
  """The same on uint64 arrays (wrapping multiplication)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
  return x ^ (x >> np.uint64(31))


def _round_keys(key: Sequence[int]) -> list[np.uint64]:
  state = 0x9E3779B97F4A7C15
  for k in key:
    state = _mix_int((state + (int(k) & _MASK) + 0x9E3779B97F4A7C15) & _MASK)
  return [np.uint64(_mix_int((state + r * 0x9E3779B97F4A7C15) & _MASK)) for r in range(_ROUNDS)]


def _feistel(x: np.ndarray, keys: list[np.uint64], m: np.uint64) -> np.ndarray:
  """A Feistel network on [0, m*m): x = left * m + right, both halves in [0, m)."""
  left, right = x // m, x % m
  for k in keys:
    left, right = right, (left + _mix(right ^ k) % m) % m
  return left * m + right


def permute(i: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
  """Position-`i` values of the permutation of `range(n)` selected by `key` (int64)."""
  i = np.asarray(i, np.int64)
  if n <= 0 or (i.size and (i.min() < 0 or i.max() >= n)):
    raise ValueError(f"permute: indices must lie in [0, n={n})")
  m = np.uint64(math.isqrt(n - 1) + 1)  # m * m >= n, and m * m - n <= 2 * m
  keys = _round_keys(key)
  y = _feistel(i.astype(np.uint64).reshape(-1), keys, m)
  outside = y >= n
  while outside.any():  # Cycle walking, rare: at most 2m of the m*m values lie outside.
    y[outside] = _feistel(y[outside], keys, m)
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
