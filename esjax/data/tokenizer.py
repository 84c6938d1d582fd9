"""Tokenizers: raw UTF-8 bytes (the default, nothing to download), or a model file.

Every tokenizer has `encode(text) -> np.ndarray[int32]`, `encode_batch(texts)` (the same for
a list, in one call to the library: `esjax.data.prepare` uses it), `decode(ids) -> str`,
`vocab_size` and `eos_id` (appended after each document). `load_tokenizer(spec)` picks one;
`fingerprint(spec)` names its content (a prepared corpus records it):

- `"byte"`: ids are the UTF-8 bytes, vocab 256. Byte 0 (NUL), which never occurs in text,
  is the end-of-document id, so the vocabulary stays 256 and fits the tiny presets.
- a path ending in `.model`: a SentencePiece model (needs the `sentencepiece` package).
- a path ending in `.json`: a Hugging Face `tokenizers` file (needs `tokenizers`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray: ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids; id 0 (NUL) ends a document."""

  vocab_size = 256
  eos_id = 0

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) for i in ids if int(i) != self.eos_id)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece `.model` file."""

  def __init__(self, path: str):
    import sentencepiece as spm  # Optional dependency: imported only when asked for.

    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    eos = int(self._sp.eos_id())
    if eos < 0:
      raise ValueError(f"tokenizer {path!r} has no end-of-sentence id; train it with eos_id >= 0")
    self.eos_id = eos

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face `tokenizers` JSON file (`tokenizer.json`)."""

  EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|end_of_text|>")

  def __init__(self, path: str):
    import tokenizers  # Optional dependency: imported only when asked for.

    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    ids = [self._tok.token_to_id(t) for t in self.EOS_CANDIDATES]
    ids = [i for i in ids if i is not None]
    if not ids:
      raise ValueError(f"tokenizer {path!r} has none of the end-of-text tokens "
                       f"{list(self.EOS_CANDIDATES)}")
    self.eos_id = int(ids[0])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
  """"byte", or the path of a SentencePiece `.model` / `tokenizers` `.json` file."""
  if spec == "byte":
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"data.tokenizer={spec!r}: expected 'byte' or an existing "
                            "SentencePiece .model / tokenizers .json file")
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec)
  if spec.endswith(".json"):
    return HFTokenizer(spec)
  raise ValueError(f"data.tokenizer={spec!r}: expected 'byte', a .model or a .json file")


def fingerprint(spec: str) -> str:
  """What a tokenizer is, independent of where its file lies: 'byte', or the SHA-256 of the
  model file's bytes."""
  if spec == "byte":
    return "byte"
  with open(spec, "rb") as f:
    return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
