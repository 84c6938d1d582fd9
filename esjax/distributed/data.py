"""Token streams for the DGS workers: a byte-level corpus split into train/val and per-worker
shards. Each worker samples random windows from its own contiguous shard."""

from __future__ import annotations

from typing import Any

import numpy as np


def synthetic_text(n_bytes: int, seed: int = 0, n_words: int = 64) -> bytes:
  """Sentences from a fixed random bigram chain over a small made-up vocabulary."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(n_words)]
  successors = rng.integers(0, n_words, size=(n_words, 3))
  out, w, size = [], 0, 0
  while size < n_bytes:
    word = words[w] + (". " if rng.random() < 0.1 else " ")
    out.append(word)
    size += len(word)
    w = successors[w, rng.integers(0, 3)]
  return "".join(out).encode()[:n_bytes]


def load_tokens(data: Any) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) byte tokens (uint8) from `data.source`: a text file path or 'synthetic'."""
  if data.source == "synthetic":
    raw = synthetic_text(data.synthetic_bytes, data.seed)
  else:
    with open(data.source, "rb") as f:
      raw = f.read()
  tokens = np.frombuffer(raw, np.uint8)
  n_val = int(len(tokens) * data.val_fraction)
  if n_val < data.seq_len + 2 or len(tokens) - n_val < data.seq_len + 2:
    raise ValueError(f"corpus of {len(tokens)} bytes is too small for val_fraction="
                     f"{data.val_fraction} and seq_len={data.seq_len}")
  return tokens[:-n_val], tokens[-n_val:]


def shard(tokens: np.ndarray, n: int) -> list[np.ndarray]:
  """`n` contiguous, disjoint shards of equal length."""
  size = len(tokens) // n
  return [tokens[i * size:(i + 1) * size] for i in range(n)]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int
                 ) -> list[dict[str, np.ndarray]]:
  """Fixed, evenly spaced validation windows (the same for every evaluation)."""
  n = batch_size * n_batches
  starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
  windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  windows = windows.reshape(n_batches, batch_size, seq_len + 1)
  return [{"inputs": w[:, :-1], "targets": w[:, 1:]} for w in windows]
