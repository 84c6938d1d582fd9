"""Token windows, the train/validation split, and the resumable batch iterator.

The documents (each followed by the tokenizer's end-of-document id) form one token stream,
cut into non-overlapping windows of `seq_len + 1` tokens; a window gives `inputs = w[:-1]`
and `targets = w[1:]`. Every k-th window (k = round(1 / val_fraction)) is held out for
validation, so both splits sample the whole corpus, even when it is a single file.

Training batch `i` is a pure function of (windows, batch size, seed, i): the examples
`i*B .. i*B+B-1` of an endless stream of epochs, each epoch a fresh permutation of the
training windows drawn from `np.random.default_rng([seed, epoch])`. The iterator's whole
state is therefore the number of batches it has produced, saved with each checkpoint, and a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Iterable

import numpy as np

from esjax.data import sources
from esjax.data.tokenizer import Tokenizer, load_tokenizer

Batch = dict[str, np.ndarray]


def token_stream(docs: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
  """All documents' tokens, each document followed by `eos_id`, as one int32 array."""
  eos = np.asarray([tokenizer.eos_id], np.int32)
  parts = []
  for doc in docs:
    parts += [tokenizer.encode(doc), eos]
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def split_windows(tokens: np.ndarray, seq_len: int, val_fraction: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Train and validation windows [N, seq_len + 1]; every k-th window goes to validation."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
  n = len(tokens) // (seq_len + 1)
  windows = tokens[:n * (seq_len + 1)].reshape(n, seq_len + 1)
  if val_fraction == 0.0:
    return windows, windows[:0]
  k = max(2, round(1.0 / val_fraction))
  is_val = np.arange(n) % k == k - 1
  return windows[~is_val], windows[is_val]


def to_batch(windows: np.ndarray) -> Batch:
  return {"inputs": np.ascontiguousarray(windows[:, :-1]),
          "targets": np.ascontiguousarray(windows[:, 1:])}


class BatchIterator:
  """Endless, shuffled, resumable batches of training windows. State: `{"position": i}`."""

  def __init__(self, windows: np.ndarray, batch_size: int, seed: int):
    if batch_size <= 0:
      raise ValueError(f"batch size {batch_size} must be > 0")
    self.windows = windows
    self.batch_size = batch_size
    self.seed = seed
    self.position = 0
    self.fingerprint = f"{zlib.crc32(windows.tobytes()):08x}-{windows.shape[0]}x{windows.shape[1]}"
    self._epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
    return self._perm

  def batch(self, i: int) -> Batch:
    """Training batch number `i` (0-based), independent of the iterator's position."""
    n = len(self.windows)
    rows = []
    for j in range(i * self.batch_size, (i + 1) * self.batch_size):
      rows.append(self._permutation(j // n)[j % n])
    return to_batch(self.windows[np.asarray(rows)])

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> Batch:
    batch = self.batch(self.position)
    self.position += 1
    return batch

  def state(self) -> dict[str, Any]:
    return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
            "fingerprint": self.fingerprint}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a saved `state()`; refuses one saved for different data or batching."""
    for key in ("seed", "batch_size", "fingerprint"):
      if state[key] != getattr(self, key):
        raise ValueError(
            f"cannot resume the data iterator: checkpoint has {key}={state[key]!r} but this run "
            f"has {key}={getattr(self, key)!r} (the data, tokenizer, seq_len, batch size or seed "
            "changed; start a new workdir, with checkpoint.init_from to keep the weights)")
    self.position = int(state["position"])


def eval_batches(windows: np.ndarray, batch_size: int, n_batches: int) -> list[Batch]:
  """The fixed validation set: the first `n_batches` batches of validation windows, in order
  (fewer when there are fewer windows; a partial last batch is dropped unless it is the only
  one, in which case windows repeat to fill it)."""
  if len(windows) == 0 or n_batches <= 0:
    return []
  n = max(1, min(n_batches, len(windows) // batch_size))
  idx = np.arange(n * batch_size) % len(windows)
  return [to_batch(windows[idx[b * batch_size:(b + 1) * batch_size]]) for b in range(n)]


@dataclasses.dataclass
class Data:
  tokenizer: Tokenizer
  train: BatchIterator
  val: list[Batch]
  n_tokens: int
  n_files: int


def build(data_cfg: Any, seq_len: int, batch_size: int, seed: int, n_eval_batches: int = 8
          ) -> Data:
  """Reads `data_cfg.source` with `data_cfg.tokenizer` and returns the train iterator and the
  validation batches. Raises a clear error for a missing path or too little text."""
  tokenizer = load_tokenizer(data_cfg.tokenizer)
  files = sources.resolve_files(data_cfg.source)
  docs = list(sources.read_documents(files, data_cfg.max_bytes))
  tokens = token_stream(docs, tokenizer)
  text_tokens = len(tokens) - len(docs)
  train, val = split_windows(tokens, seq_len, data_cfg.val_fraction)
  needed = "one training window" + (" and one validation window" if data_cfg.val_fraction else "")
  if text_tokens == 0 or len(train) == 0 or (data_cfg.val_fraction and len(val) == 0):
    raise ValueError(
        f"data.source={data_cfg.source!r} is too small: {len(files)} file(s), {text_tokens} "
        f"tokens of text; {needed} of seq_len + 1 = {seq_len + 1} tokens are needed")
  return Data(tokenizer=tokenizer,
              train=BatchIterator(train, batch_size, seed),
              val=eval_batches(val, batch_size, n_eval_batches),
              n_tokens=len(tokens), n_files=len(files))
