"""A byte-level BPE `tokenizer.json` (GPT-2, Llama 3, Qwen2 style) run by tiktoken.

tiktoken encodes such a tokenizer about 3.6x faster per core than the `tokenizers` library
(benchmarks/data.py measures both). The two agree when the file is what tiktoken models: a BPE
whose merge priorities follow its ids, over the GPT-2 byte alphabet, cut into words by one
regex, with no normalizer but NFC and only plain special added tokens. `twin(path)` builds
the encoding for such a file and says why not for any other. Agreement beyond the
structure is checked as it runs: esjax/data/tokenizer.py's HFTokenizer encodes a sample of
every batch with `tokenizers` too and refuses a difference.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Callable

import numpy as np

# What the `tokenizers` ByteLevel pre-tokenizer cuts words with when `use_regex` is true.
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""")


def byte_alphabet() -> dict[str, int]:
  """GPT-2's printable stand-in character for each byte -> the byte."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _pattern(pre: Any) -> str:
  """The word regex of a pre-tokenizer tiktoken can run; ValueError naming what it cannot."""
  def byte_level(p: Any, use_regex: bool) -> bool:
    return (isinstance(p, dict) and p.get("type") == "ByteLevel"
            and not p.get("add_prefix_space", False) and p.get("use_regex", True) == use_regex)

  if byte_level(pre, True):
    return GPT2_PATTERN
  steps = pre.get("pretokenizers", []) if isinstance(pre, dict) else []
  if (isinstance(pre, dict) and pre.get("type") == "Sequence" and len(steps) == 2
      and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
      and not steps[0].get("invert", False) and "Regex" in steps[0].get("pattern", {})
      and byte_level(steps[1], False)):
    return steps[0]["pattern"]["Regex"]
  raise ValueError(f"pre-tokenizer {json.dumps(pre)[:120]} is not ByteLevel, nor one regex "
                   "Split then ByteLevel")


def _ranks(model: dict, added: dict[str, int]) -> dict[bytes, int]:
  """The vocabulary as tiktoken's byte string -> rank; ValueError where its merges would not
  follow the ranks."""
  if model.get("type") != "BPE":
    raise ValueError(f"model type {model.get('type')!r} (expected 'BPE')")
  for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
    if model.get(key):
      raise ValueError(f"model.{key}={model[key]!r} (expected none)")
  alphabet = byte_alphabet()
  ranks: dict[bytes, int] = {}
  for token, rank in model["vocab"].items():
    if token in added:
      continue
    if any(c not in alphabet for c in token):
      raise ValueError(f"vocabulary entry {token!r} is not in the byte-level alphabet")
    ranks[bytes(alphabet[c] for c in token)] = rank
  if len(ranks) != len(set(ranks.values())) or any(bytes([b]) not in ranks for b in range(256)):
    raise ValueError("the vocabulary does not hold each byte once and each id once")
  last = -1
  for merge in model.get("merges", []):
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    merged = model["vocab"].get(left + right)
    if merged is None or merged < last:
      raise ValueError(f"merge {left!r} + {right!r} does not follow the vocabulary's ids")
    last = merged
  return ranks


def twin(path: str) -> tuple[Callable[[str], np.ndarray] | None, str]:
  """(encode, "") for a file tiktoken reproduces, else (None, why not). `encode(text)` gives
  the int32 ids `tokenizers` gives with add_special_tokens=False (special tokens in the text
  included), and raises ValueError if they do not spell every byte of the text."""
  try:
    import tiktoken  # Optional dependency (requirements.txt installs it).
  except ImportError:
    return None, "tiktoken is not installed"
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  normalizer = spec.get("normalizer")
  try:
    if normalizer is not None and normalizer.get("type") != "NFC":
      raise ValueError(f"normalizer {normalizer.get('type')!r} (expected none or NFC)")
    plain = ("single_word", "lstrip", "rstrip")
    if any(not t.get("special") or any(t.get(k) for k in plain)
           for t in spec.get("added_tokens", [])):
      raise ValueError("an added token is not special, or strips or matches single words")
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    ranks = _ranks(spec["model"], added)
    encoding = tiktoken.Encoding(path, pat_str=_pattern(spec.get("pre_tokenizer")),
                                 mergeable_ranks=ranks, special_tokens=added)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    return None, str(e) or type(e).__name__
  # A word regex that skips characters would drop them silently: count each token's bytes.
  token_bytes = np.zeros(max([*ranks.values(), *added.values()]) + 1, np.int64)
  for piece, rank in ranks.items():
    token_bytes[rank] = len(piece)
  for content, rank in added.items():
    token_bytes[rank] = len(content.encode("utf-8"))

  def encode(text: str) -> np.ndarray:
    if normalizer is not None:
      text = unicodedata.normalize("NFC", text)
    ids = np.asarray(encoding.encode(text, allowed_special="all"), np.int32)
    if int(token_bytes[ids].sum()) != len(text.encode("utf-8")):
      raise ValueError(f"tiktoken's encoding of {path} skips characters of the text "
                       f"{text[:40]!r}...: use the tokenizers encoder")
    return ids

  return encode, ""
