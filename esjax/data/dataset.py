"""Training and validation examples from prepared corpora: held-out documents, windows,
blends, and the resumable batch iterator the training loop checkpoints.

Sources. `data.source` is one source or a weighted blend, `"0.7:dirA,0.3:dirB"` (weights
are normalised; an unweighted list of prepared directories is weighted by their sizes).
A source is a prepared directory (`python -m esjax.data.prepare`, recognised by its
manifest), or raw text (`stdlib`, files, directories, globs: comma-separated, unweighted,
they form one source) that `build` prepares into `cache_dir` on first use; the loop passes
`<workdir>/data_cache`. `data.max_bytes` caps the input read for a raw source (whole files,
the first always; 0: none); a prepared directory is used whole.

Split. Every k-th document of a source (k = round(1 / val_fraction), k >= 2) is held out
for validation, so training never sees a validation document. A source with fewer than k
documents (a single text file, say) holds out the last val_fraction of its tokens instead.

Windows. Within each run of consecutive training documents of a shard (each document
ending with eos), the tokens are cut into non-overlapping windows of seq_len + 1; a window
gives `inputs = w[:-1]`, `targets = w[1:]`. The held-out documents, concatenated in order,
give the validation windows; the validation set is their first `n_eval_batches` batches,
blended like training.

Batches. Example e of the endless training stream is, by `sampling.Blend`, example r of
source s, which is window `permute(r % N, N, key=(seed, s, r // N))` of that source's N
windows: every epoch of every source is a fresh permutation, computed in O(1) memory.
Batch i is examples i*B .. i*B + B - 1. The iterator's whole state is therefore the number
of batches it has produced and the examples they hold (saved with each checkpoint), any
process can read any rows of any batch, and a run resumed on any number of processes sees
exactly the batches of an uninterrupted one. A run resumed with another batch size B'
continues the same stream where it stopped: its batch i >= k (k the step it resumed at,
after e examples) is examples e + (i - k)*B' .. + B' - 1, so no example is skipped or seen
twice; the learning-rate schedule stays in steps. A resume with another window length
(seq_len) continues at the same number of tokens, e * L / L' examples of the new windows:
their permutation is another, so within the current epoch some text is seen again and some
skipped. The data is identified by its content (the shards' sizes and checksums, the
blend), not its paths, so a corpus moved or copied to another cluster resumes too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
import zlib
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from esjax.data import prepare, sampling, shards, sources
from esjax.data.tokenizer import Tokenizer, fingerprint, load_tokenizer

Batch = dict[str, np.ndarray]


class Windows(Protocol):
  """A numbered set of token windows [seq_len + 1]."""

  def __len__(self) -> int: ...

  def read(self, ids: np.ndarray) -> np.ndarray: ...  # int32 [len(ids), seq_len + 1]


class ArrayWindows:
  """Windows held in memory, int [N, seq_len + 1]."""

  def __init__(self, windows: np.ndarray):
    self.array = np.asarray(windows)

  def __len__(self) -> int:
    return len(self.array)

  def read(self, ids: np.ndarray) -> np.ndarray:
    return self.array[ids].astype(np.int32)


class CorpusWindows:
  """The windows of `length` tokens cut from `runs` (int64 [n, 3]: shard, start, stop) of a
  prepared corpus, run after run."""

  def __init__(self, corpus: shards.Corpus, runs: np.ndarray, length: int):
    counts = (runs[:, 2] - runs[:, 1]) // length
    self.corpus, self.length = corpus, length
    self._shard, self._start = runs[counts > 0, 0], runs[counts > 0, 1]
    self._first = np.concatenate([[0], np.cumsum(counts[counts > 0])]).astype(np.int64)

  def __len__(self) -> int:
    return int(self._first[-1])

  def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, first token) of windows `ids`."""
    run = np.searchsorted(self._first, ids, side="right") - 1
    return self._shard[run], self._start[run] + (ids - self._first[run]) * self.length

  def read(self, ids: np.ndarray) -> np.ndarray:
    return self.corpus.read_rows(*self.locate(ids), self.length)


def token_stream(docs: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
  """All documents' tokens, each document followed by `eos_id`, as one int32 array."""
  eos = np.asarray([tokenizer.eos_id], np.int32)
  parts = []
  for doc in docs:
    parts += [tokenizer.encode(doc), eos]
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def cut_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Consecutive non-overlapping windows [N, seq_len + 1] of a token array."""
  n = len(tokens) // (seq_len + 1)
  return tokens[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def to_batch(windows: np.ndarray) -> Batch:
  return {"inputs": np.ascontiguousarray(windows[:, :-1]),
          "targets": np.ascontiguousarray(windows[:, 1:])}


def _runs(shard: int, offsets: np.ndarray, is_val: np.ndarray) -> np.ndarray:
  """Maximal runs of documents of one class, int64 [n, 4]: shard, start, stop, is_val."""
  cuts = np.flatnonzero(np.diff(is_val.astype(np.int8))) + 1
  first = np.concatenate([[0], cuts]) if len(is_val) else cuts
  last = np.concatenate([cuts, [len(is_val)]]) if len(is_val) else cuts
  return np.stack([np.full(len(first), shard), offsets[first], offsets[last], is_val[first]],
                  1).astype(np.int64)


def split_runs(corpus: shards.Corpus, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(training runs, validation runs) of a corpus, int64 [n, 3] rows (shard, start, stop) in
  corpus order: every k-th document held out, or the tail of the tokens (module docstring)."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
  k = max(2, round(1.0 / val_fraction)) if val_fraction else 0
  runs = [np.zeros((0, 4), np.int64)]
  if k and int(corpus.manifest["documents"]) >= k:
    first_doc = 0
    for s in range(len(corpus.shards)):
      offsets = corpus.doc_offsets(s)
      doc = first_doc + np.arange(len(offsets) - 1)
      runs.append(_runs(s, offsets, doc % k == k - 1))
      first_doc += len(offsets) - 1
  else:  # The tail: shard s holds corpus tokens [begin, begin + n); the cut falls somewhere.
    cut = corpus.n_tokens - (math.ceil(corpus.n_tokens * val_fraction) if k else 0)
    begin = 0
    for s, record in enumerate(corpus.shards):
      n = record["tokens"]
      here = min(max(cut - begin, 0), n)
      runs.append(np.asarray([(s, 0, here, 0), (s, here, n, 1)], np.int64))
      begin += n
  runs = np.concatenate(runs)
  runs = runs[runs[:, 2] > runs[:, 1]]
  return runs[runs[:, 3] == 0, :3], runs[runs[:, 3] == 1, :3]


def val_windows(corpus: shards.Corpus, runs: np.ndarray, length: int, limit: int
                ) -> np.ndarray:
  """The first `limit` windows of the held-out runs concatenated, int32 [<= limit, length]."""
  parts, total = [], 0
  for s, start, stop in runs.tolist():
    if total >= limit * length:
      break
    stop = min(stop, start + limit * length - total)
    parts.append(corpus.read(s, start, stop).astype(np.int32))
    total += stop - start
  return cut_windows(np.concatenate(parts) if parts else np.zeros(0, np.int32), length - 1)


class BatchIterator:
  """Endless, shuffled, resumable batches; `windows` is one window set (an array [N,
  seq_len + 1] or a `Windows`) or a list blended by `weights`. State: `{"position": i}` and
  what must match to resume (seed, batch size, fingerprint of the data)."""

  def __init__(self, windows: Any, batch_size: int, seed: int,
               weights: Sequence[float] | None = None, fingerprint: str | None = None):
    if batch_size <= 0:
      raise ValueError(f"batch size {batch_size} must be > 0")
    parts = list(windows) if isinstance(windows, (list, tuple)) else [windows]
    self.parts = [ArrayWindows(p) if isinstance(p, np.ndarray) else p for p in parts]
    self.blend = sampling.Blend(weights or [1.0] * len(self.parts))
    self.batch_size, self.seed, self.position = batch_size, seed, 0
    self.origin = (0, 0)  # (batch, example): batch i starts at example e0 + (i - i0) * B
    if fingerprint is None:
      arrays = [p.array for p in self.parts if isinstance(p, ArrayWindows)]
      if len(arrays) != len(self.parts):
        raise ValueError("BatchIterator: pass a fingerprint for windows not held in memory")
      crc = 0
      for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
      fingerprint = f"{crc:08x}-" + "+".join(f"{a.shape[0]}x{a.shape[1]}" for a in arrays)
    self.fingerprint = fingerprint

  def examples(self, e: np.ndarray) -> np.ndarray:
    """Examples `e` of the training stream, int32 [len(e), seq_len + 1]."""
    source, rank = self.blend.locate(e)
    out = None
    for s in np.unique(source):
      where = np.flatnonzero(source == s)
      n = len(self.parts[s])
      epoch, index = np.divmod(rank[where], n)
      ids = np.empty_like(index)
      for ep in np.unique(epoch):
        here = epoch == ep
        ids[here] = sampling.permute(index[here], n, (self.seed, int(s), int(ep)))
      rows = self.parts[s].read(ids)
      if out is None:
        out = np.empty((len(e), rows.shape[1]), np.int32)
      out[where] = rows
    return out

  def batch(self, i: int, rows: np.ndarray | None = None) -> Batch:
    """Training batch number `i` (0-based), or only its `rows`, independent of `position`."""
    rows = np.arange(self.batch_size) if rows is None else np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.batch_size):
      raise ValueError(f"rows must lie in [0, batch size {self.batch_size})")
    return to_batch(self.examples(self._first_example(i) + rows))

  def next_rows(self, rows: np.ndarray | None) -> Batch:
    """The given rows of the next batch (all with None); advances by one batch."""
    batch = self.batch(self.position, rows)
    self.position += 1
    return batch

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> Batch:
    return self.next_rows(None)

  @property
  def windows(self) -> np.ndarray:
    """All training windows of a single source, in corpus order (materialised: for small
    corpora, e.g. the DGS runtime's per-worker shards)."""
    if len(self.parts) != 1:
      raise ValueError("train.windows: a blend has no single window order")
    return self.parts[0].read(np.arange(len(self.parts[0])))

  def _first_example(self, i: int) -> int:
    """The stream's example that training batch `i` starts with."""
    first, example = self.origin
    return example + (i - first) * self.batch_size

  @property
  def examples_seen(self) -> int:
    return self._first_example(self.position)

  def state(self) -> dict[str, Any]:
    return {"position": self.position, "examples": self.examples_seen, "seed": self.seed,
            "batch_size": self.batch_size, "fingerprint": self.fingerprint}

  def restore(self, state: dict[str, Any]) -> str | None:
    """Continues from a saved `state()` at its place in the stream, even with another batch
    size or window length; refuses one saved for other data or seed. Returns a note for what
    the caller should know (what changed, and what it means for the data)."""
    notes = []
    saved_id, _, saved_shape = str(state["fingerprint"]).rpartition("-")
    my_id, _, my_shape = self.fingerprint.rpartition("-")
    if "examples" not in state and state["fingerprint"] != self.fingerprint:
      # Saved before content fingerprints (whose digest named input paths and times).
      if saved_shape == my_shape:
        notes.append("the data position predates content fingerprints, so only the data's "
                     f"size was checked ({my_shape} windows x length)")
        saved_id = my_id
    if state["seed"] != self.seed or saved_id != my_id:
      key = "seed" if state["seed"] != self.seed else "fingerprint"
      raise ValueError(
          f"cannot resume the data iterator: checkpoint has {key}={state[key]!r} but this run "
          f"has {key}={getattr(self, key)!r} (the data, tokenizer or seed changed; start a new "
          "workdir, with checkpoint.init_from to keep the weights)")
    position = int(state["position"])
    examples = int(state.get("examples", position * int(state["batch_size"])))
    if saved_shape != my_shape:  # another window length: continue at the same token count
      (_, old_len), (_, new_len) = (map(int, x.split("x")) for x in (saved_shape, my_shape))
      moved = examples * old_len // new_len
      notes.append(f"the window length changed from {old_len} to {new_len} tokens: the data "
                   f"continues at the same number of tokens (example {moved} instead of "
                   f"{examples}), in a new order within the current epoch, so part of that "
                   "epoch's text may be seen again and part not at all")
      examples = moved
    self.position, self.origin = position, (position, examples)
    if int(state["batch_size"]) != self.batch_size:
      notes.append(f"the batch size changed from {state['batch_size']} to {self.batch_size}: "
                   f"the data continues at example {examples} of the same stream (step "
                   f"{position}); the learning-rate schedule stays in steps")
    return "; ".join(notes) or None


def _digest(shards: Any, weights: list[float | None], data_cfg: Any) -> str:
  """The data's identity apart from the window length: shard contents, blend, split."""
  identity = json.dumps([shards, weights, data_cfg.val_fraction])
  return hashlib.sha256(identity.encode()).hexdigest()[:16]


def eval_batches(parts: Sequence[np.ndarray], blend: sampling.Blend, batch_size: int,
                 n_batches: int) -> list[Batch]:
  """The fixed validation set: the first `n_batches` batches of the blended validation
  windows, in order (fewer when there are fewer windows, at least one; a source that runs
  out repeats its windows)."""
  total = sum(len(p) for p in parts)
  if not total or n_batches <= 0:
    return []
  n = max(1, min(n_batches, total // batch_size))
  source, rank = blend.locate(np.arange(n * batch_size))
  rows = np.stack([parts[s][r % len(parts[s])] for s, r in zip(source, rank)])
  return [to_batch(rows[b * batch_size:(b + 1) * batch_size]) for b in range(n)]


_WEIGHTED = re.compile(r"\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)\s*:(.+)")


def parse_source(spec: str) -> list[tuple[float | None, str]]:
  """`data.source` as (weight, entries) per source: a blend `"0.7:a,0.3:b"`, or unweighted
  entries (weight None): each prepared directory its own source, the raw rest one source."""
  entries = [e.strip() for e in spec.split(",") if e.strip()]
  if not entries:
    raise ValueError(f"data.source={spec!r}: expected '{sources.DEFAULT_CORPUS}', paths, "
                     "globs, prepared directories, or a blend '0.7:dirA,0.3:dirB'")
  matches = [_WEIGHTED.fullmatch(e) for e in entries]
  if all(m is not None for m in matches):
    return [(float(m.group(1)), m.group(2).strip()) for m in matches]
  if any(m is not None for m in matches):
    raise ValueError(f"data.source={spec!r}: give every entry of a blend a weight, "
                     "e.g. '0.7:dirA,0.3:dirB'")
  prepared = [e for e in entries if shards.is_prepared(os.path.expanduser(e))]
  raw = [e for e in entries if e not in prepared]
  return [(None, e) for e in prepared] + ([(None, ",".join(raw))] if raw else [])


def prepare_raw(spec: str, tokenizer: str, max_bytes: int, cache_dir: str) -> str:
  """The prepared directory of raw text `spec` in `cache_dir`, preparing it on first use
  (keyed by the files' paths, sizes and times, the cap and the tokenizer). Processes that
  race each prepare a private copy; the first rename wins."""
  files = sources.cap_files([os.path.abspath(f) for f in sources.resolve_files(spec)],
                            max_bytes)
  stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
  key = hashlib.sha256(json.dumps([shards.FORMAT, fingerprint(tokenizer), max_bytes, stats]
                                  ).encode()).hexdigest()[:20]
  target = os.path.join(cache_dir, key)
  if not shards.is_prepared(target):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
      prepare.prepare(spec, tokenizer, tmp, max_bytes=max_bytes, progress=False)
      os.rename(tmp, target)
    except OSError:
      if not shards.is_prepared(target):
        raise
    finally:  # Gone after the rename; a failed or losing copy is removed.
      shutil.rmtree(tmp, ignore_errors=True)
  return target


def open_corpus(directory: str, tokenizer: str, keep_alive: Any = None,
                vocab_size: int | None = None) -> shards.Corpus:
  """A prepared directory, refused when it was tokenized by another tokenizer (or its manifest
  gives another vocabulary size than the tokenizer's `vocab_size`)."""
  corpus = shards.Corpus(directory, keep_alive)
  have, want = corpus.manifest["tokenizer"], fingerprint(tokenizer)
  if have["fingerprint"] != want:
    raise ValueError(f"data.source {directory!r} was prepared with tokenizer "
                     f"{have['spec']!r} ({have['fingerprint'][:19]}) but data.tokenizer="
                     f"{tokenizer!r} is {want[:19]}: use that tokenizer, or prepare the "
                     "source again with this one")
  if vocab_size is not None and corpus.vocab_size != vocab_size:
    raise ValueError(f"{directory}/{shards.MANIFEST}: tokenizer.vocab_size={corpus.vocab_size} "
                     f"but data.tokenizer={tokenizer!r} has {vocab_size} ids; prepare "
                     f"{directory} again")
  return corpus


@dataclasses.dataclass
class Data:
  tokenizer: Tokenizer
  train: BatchIterator
  val: list[Batch]
  n_tokens: int  # of all sources, held-out documents included
  directories: list[str]  # the prepared directories read


def build(data_cfg: Any, seq_len: int, batch_size: int, seed: int, n_eval_batches: int = 8,
          cache_dir: str | None = None) -> Data:
  """The training iterator and validation batches of `data_cfg.source`, read with
  `data_cfg.tokenizer`. Raw sources are prepared into `cache_dir` (None: a temporary
  directory, removed when nothing reads it any more). Raises a one-line error for a missing
  path, a tokenizer mismatch, a corrupt shard or too little text."""
  tokenizer = load_tokenizer(data_cfg.tokenizer)
  scratch = None
  if cache_dir is None:
    scratch = tempfile.TemporaryDirectory(prefix="esjax_data_")
    cache_dir = scratch.name
  length = seq_len + 1
  needed = "one training window" + (" and one validation window" if data_cfg.val_fraction
                                    else "")
  parts, weights, given, vals, corpora = [], [], [], [], []
  for weight, entry in parse_source(data_cfg.source):
    path = os.path.expanduser(entry)
    if not shards.is_prepared(path):
      path = prepare_raw(entry, data_cfg.tokenizer, data_cfg.max_bytes, cache_dir)
    corpus = open_corpus(path, data_cfg.tokenizer, scratch, tokenizer.vocab_size)
    train_runs, val_runs = split_runs(corpus, data_cfg.val_fraction)
    train = CorpusWindows(corpus, train_runs, length)
    val = val_windows(corpus, val_runs, length, n_eval_batches * batch_size)
    if len(train) == 0 or (data_cfg.val_fraction and len(val) == 0):
      raise ValueError(
          f"data.source entry {entry!r} is too small: {corpus.manifest['documents']} "
          f"document(s), {corpus.n_tokens} tokens; {needed} of seq_len + 1 = {length} tokens "
          "are needed")
    parts.append(train)
    weights.append(len(train) if weight is None else weight)
    given.append(weight)  # None: weighted by size
    vals.append(val)
    corpora.append(corpus)
  content = [[[r[k] for k in ("tokens", "documents", "idx_crc32", "block_crc32")]
              for r in c.manifest["shards"]] for c in corpora]
  shape = f"{sum(map(len, parts))}x{length}"
  iterator = BatchIterator(parts, batch_size, seed, weights,
                           fingerprint=f"{_digest(content, given, data_cfg)}-{shape}")
  blend = sampling.Blend(weights)
  return Data(tokenizer=tokenizer, train=iterator,
              val=eval_batches(vals, blend, batch_size, n_eval_batches),
              n_tokens=sum(c.n_tokens for c in corpora),
              directories=[c.directory for c in corpora])
