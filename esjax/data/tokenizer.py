"""Tokenizers: raw UTF-8 bytes (the default, nothing to download), or a model file.

Every tokenizer has `encode(text) -> np.ndarray[int32]` (no special tokens added),
`encode_batch(texts)` (the same for a list, in one call to the library: `esjax.data.prepare`
uses it), `decode(ids) -> str`, `vocab_size`, `eos_id` (appended after each document),
`eos_ids` (where generation stops: `eos_id` and, for a model file, every `eos_token_id` that
the `generation_config.json`, else `config.json`, beside it lists, as transformers stops) and
`bos_id` (None when the tokenizer has none; evaluation's prefix token is BOS, else
end-of-text, as lm-eval's). `load_tokenizer(spec)` picks one; `fingerprint(spec)`
names its content (a prepared corpus records it):

- `"byte"`: ids are the UTF-8 bytes, vocab 256. Byte 0 (NUL), which never occurs in text,
  is the end-of-document id, so the vocabulary stays 256 and fits the tiny presets.
- a path ending in `.model`: a SentencePiece model (needs the `sentencepiece` package).
- a path ending in `.json`: a Hugging Face `tokenizers` file (needs `tokenizers`). With
  `encoder="auto"` (what `esjax.data.prepare` asks for) `encode_batch` runs on tiktoken where
  the file allows it (esjax/data/tiktoken_bpe.py: Llama 3 / GPT-2 style byte-level BPE,
  ~3.6x faster), checking every 32nd text against `tokenizers`. Its BOS and end-of-text
  tokens are those of the `tokenizer_config.json` (or `special_tokens_map.json`) beside it,
  as transformers' `bos_token_id` / `eos_token_id`, else the `bos_token_id` / `eos_token_id`
  of `generation_config.json` or `config.json` there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Protocol, Sequence

import numpy as np

from esjax.data import tiktoken_bpe


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int
  eos_ids: tuple[int, ...]
  bos_id: int | None
  encoder: str  # the library that encodes: recorded with a prepared shard

  def encode(self, text: str) -> np.ndarray: ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids; id 0 (NUL) ends a document."""

  vocab_size = 256
  eos_id = 0
  eos_ids = (0,)
  bos_id = None
  encoder = "byte"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) for i in ids if int(i) != self.eos_id)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece `.model` file."""

  encoder = "sentencepiece"

  def __init__(self, path: str):
    import sentencepiece as spm  # Optional dependency: imported only when asked for.

    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    eos = int(self._sp.eos_id())
    if eos < 0:
      raise ValueError(f"tokenizer {path!r} has no end-of-sentence id; train it with eos_id >= 0")
    self.eos_id = eos
    self.eos_ids = eos_ids(os.path.dirname(os.path.abspath(path)), eos)
    bos = int(self._sp.bos_id())
    self.bos_id = bos if bos >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face `tokenizers` JSON file (`tokenizer.json`) and the configs beside it."""

  # Only for a tokenizer file with no config beside it naming its end-of-text token.
  EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|end_of_text|>")

  # tiktoken's batches: every VERIFY_EVERY-th text (its first VERIFY_CHARS characters) also
  # goes through tokenizers, so that long documents do not make the check cost their length.
  VERIFY_EVERY, VERIFY_CHARS = 32, 1 << 16

  def __init__(self, path: str, encoder: str = "tokenizers"):
    import tokenizers  # Optional dependency: imported only when asked for.

    self._path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    special = special_tokens(os.path.dirname(os.path.abspath(path)), self._tok.token_to_id)
    eos = special.get("eos")
    if eos is None:
      ids = [self._tok.token_to_id(t) for t in self.EOS_CANDIDATES]
      ids = [i for i in ids if i is not None]
      if not ids:
        raise ValueError(f"tokenizer {path!r}: no tokenizer_config.json, generation_config.json "
                         "or config.json beside it names an end-of-text token, and it has none "
                         f"of {list(self.EOS_CANDIDATES)}")
      eos = ids[0]
    self.eos_id = int(eos)
    self.eos_ids = eos_ids(os.path.dirname(os.path.abspath(path)), self.eos_id)
    self.bos_id = special.get("bos")
    self._twin, why_not = tiktoken_bpe.twin(path) if encoder != "tokenizers" else (None, "")
    if encoder == "tiktoken" and self._twin is None:
      raise ValueError(f"tokenizer {path!r}: encoder='tiktoken' cannot run it ({why_not})")
    self.encoder = "tokenizers" if self._twin is None else "tiktoken"

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def _reference_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    if self._twin is None:
      return self._reference_batch(texts)
    ids = [self._twin(t) for t in texts]
    picked = range(0, len(texts), self.VERIFY_EVERY)
    sample = [texts[i][:self.VERIFY_CHARS] for i in picked]
    got = [ids[i] if len(text) == len(texts[i]) else self._twin(text)
           for i, text in zip(picked, sample)]
    for text, mine, want in zip(sample, got, self._reference_batch(sample)):
      if not np.array_equal(mine, want):
        raise ValueError(f"tokenizer {self._path!r}: tiktoken and tokenizers encode the text "
                         f"{text[:40]!r}... differently; prepare with --encoder=tokenizers")
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def special_tokens(folder: str, token_to_id) -> dict[str, int | None]:
  """{"bos": id or None, "eos": id or None} of a Hugging Face tokenizer folder.

  The token strings of `tokenizer_config.json`, then `special_tokens_map.json` (what
  transformers reads for `bos_token_id` / `eos_token_id`; a key present with null means
  none), else the ids of `generation_config.json`, then `config.json` (a list: its first).
  Keys absent everywhere are left out.
  """
  out: dict[str, int | None] = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    cfg = _read_json(os.path.join(folder, name))
    for kind in ("bos", "eos"):
      if kind in out or f"{kind}_token" not in cfg:
        continue
      token = cfg[f"{kind}_token"]
      token = token.get("content") if isinstance(token, dict) else token
      token_id = None if token is None else token_to_id(token)
      if token is not None and token_id is None:
        raise ValueError(f"{folder}/{name}: {kind}_token={token!r} is not in the vocabulary")
      out[kind] = token_id
  for name in ("generation_config.json", "config.json"):
    cfg = _read_json(os.path.join(folder, name))
    for kind in ("bos", "eos"):
      value = cfg.get(f"{kind}_token_id")
      if kind not in out and value is not None:
        out[kind] = int(value[0] if isinstance(value, list) else value)
  return out


def eos_ids(folder: str, eos_id: int) -> tuple[int, ...]:
  """`eos_id`, then every id of the `eos_token_id` (an id or a list) of the
  `generation_config.json`, else `config.json`, in `folder`: the ids transformers' `generate`
  stops at (instruct models list several)."""
  for name in ("generation_config.json", "config.json"):
    value = _read_json(os.path.join(folder, name)).get("eos_token_id")
    if value is not None:
      listed = value if isinstance(value, list) else [value]
      return tuple(dict.fromkeys([eos_id, *map(int, listed)]))
  return (eos_id,)


ENCODERS = ("auto", "tokenizers", "tiktoken")


def load_tokenizer(spec: str, encoder: str = "tokenizers") -> Tokenizer:
  """"byte", or the path of a SentencePiece `.model` / `tokenizers` `.json` file. `encoder`
  picks what runs a `.json` file's `encode_batch` (one of ENCODERS: "auto" is tiktoken where
  it reproduces the file, else tokenizers)."""
  if encoder not in ENCODERS:
    raise ValueError(f"encoder={encoder!r}: expected one of {', '.join(ENCODERS)}")
  if spec == "byte":
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"data.tokenizer={spec!r}: expected 'byte' or an existing "
                            "SentencePiece .model / tokenizers .json file")
  if not spec.endswith((".model", ".json")):
    raise ValueError(f"data.tokenizer={spec!r}: expected 'byte', a .model or a .json file")
  kind = SentencePieceTokenizer if spec.endswith(".model") else HFTokenizer
  try:
    return kind(spec) if kind is SentencePieceTokenizer else kind(spec, encoder)
  except (ImportError, ValueError):
    raise
  except Exception as e:  # the libraries raise bare Exception / RuntimeError on bad files
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"data.tokenizer={spec!r}: not a readable {kind.__name__} file "
                     f"({first})") from e


# Files of a Hugging Face tokenizer that travel with it into an exported folder.
_BESIDE = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def write_hf_files(spec: str, folder: str) -> list[str]:
  """The tokenizer `spec` in a Hugging Face model folder, so that transformers and esjax
  (eval, generate) load it from there: a `.json` file (with the configs beside it) or a
  SentencePiece `.model` as they are, and "byte" as the equivalent byte-level `tokenizers`
  file (each byte its own id, no merges; end of text: byte 0). Returns the files written."""
  os.makedirs(folder, exist_ok=True)
  if spec == "byte":
    return _write_byte_level(folder)
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"tokenizer {spec!r}: no such file")
  written = [os.path.join(folder, "tokenizer.model" if spec.endswith(".model")
                          else "tokenizer.json")]
  shutil.copyfile(spec, written[0])
  if spec.endswith(".json"):
    for name in _BESIDE:
      src = os.path.join(os.path.dirname(os.path.abspath(spec)), name)
      if os.path.isfile(src) and not os.path.exists(os.path.join(folder, name)):
        written.append(os.path.join(folder, name))
        shutil.copyfile(src, written[-1])
  return written


def _write_byte_level(folder: str) -> list[str]:
  import tokenizers  # Optional dependency: imported only when asked for.

  vocab = tiktoken_bpe.byte_alphabet()  # GPT-2's character for each byte -> the byte: its id
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  paths = [os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer_config.json")]
  tok.save(paths[0])
  eos = next(c for c, b in vocab.items() if b == ByteTokenizer.eos_id)
  with open(paths[1], "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}, f, indent=1)
  return paths


def fingerprint(spec: str) -> str:
  """What a tokenizer is, independent of where its file lies: 'byte', or the SHA-256 of the
  model file's bytes."""
  if spec == "byte":
    return "byte"
  with open(spec, "rb") as f:
    return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
