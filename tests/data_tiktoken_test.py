"""tiktoken as the encoder of byte-level BPE tokenizer files: the same ids as the `tokenizers`
library (the reference) for GPT-2, Llama 3 and Qwen2 style files, refusal of the files it
cannot run, and the run-time checks that refuse a difference."""

import json
import os
import random
import sysconfig

import numpy as np
import pytest

from esjax.data import prepare, shards, tiktoken_bpe, tokenizer

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("tiktoken")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def training_text():
  root = sysconfig.get_paths()["stdlib"]
  texts = []
  for name in ("json/decoder.py", "textwrap.py", "glob.py", "shlex.py", "fnmatch.py"):
    with open(os.path.join(root, name), encoding="utf-8") as f:
      texts.append(f.read())
  return texts + ["naïve café déjà vu — Straße, ŝ ǅ 東京都 😀👍🏽 1234567 I'LL you'Re"] * 20


def probe_texts(n=600, seed=0):
  """Code, words run together, repeats, unicode (decomposed too), digits, whitespace runs and
  special tokens inside the text."""
  rng = random.Random(seed)
  words = " ".join(training_text()).split()
  out = ["", " ", "\n\n\t  \r\n", "a<|endoftext|>b", "<|endoftext|><|endoftext|>",
         "cafe\u0301 n\u0303 A\u030a", "0123456789" * 5, "x" * 300, "ab" * 97 + "a"]
  for _ in range(n):
    text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
    roll = rng.random()
    if roll < 0.2:
      text = text.replace(" ", "")
    elif roll < 0.35:
      text = text * rng.randint(2, 4)
    elif roll < 0.5:
      text = "".join(rng.choice("ab _=\n\t'sL0") for _ in range(rng.randint(1, 60)))
    elif roll < 0.6:
      text += "".join(chr(rng.randint(0xA0, 0x2FFF)) for _ in range(rng.randint(1, 8)))
    out.append(text)
  return out


def train(path, pre_tokenizer, normalizer=None, vocab=700, edit=None):
  """A byte-level BPE trained on `training_text()`, saved to `path` (its JSON passed through
  `edit` first)."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(training_text(), trainer)
  spec = json.loads(tok.to_str())
  if edit:
    edit(spec)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f)
  return str(path)


def gpt2_style(path, **kw):
  return train(path, tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False), **kw)


def llama3_style(path, **kw):
  pre = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), "isolated"),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  return train(path, pre, **kw)


def complete_merges(spec):
  """Merges as transformers writes them for a tiktoken model (TikTokenConverter: every split
  of every token into two vocabulary entries, in the order of the token's rank), and Llama
  3's `ignore_merges`."""
  vocab = spec["model"]["vocab"]
  merges = []
  for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if token[:i] in vocab and token[i:] in vocab]
    merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
  spec["model"]["merges"] = [list(m) for m in merges]
  spec["model"]["ignore_merges"] = True


def nfc(spec):
  spec["normalizer"] = {"type": "NFC"}


@pytest.mark.parametrize("make, edit", [
    (gpt2_style, None),
    (llama3_style, None),
    (llama3_style, complete_merges),
    (llama3_style, nfc),  # Qwen2's: NFC, then a regex split and bytes
], ids=["gpt2", "llama3", "llama3-converted", "qwen2-nfc"])
def test_tiktoken_ids_are_the_tokenizers_ids(tmp_path, make, edit):
  path = make(tmp_path / "tokenizer.json", edit=edit)
  encode, why_not = tiktoken_bpe.twin(path)
  assert encode is not None, why_not
  reference = tokenizers.Tokenizer.from_file(path)
  texts = probe_texts()
  want = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
  got = [encode(t).tolist() for t in texts]
  differ = [t for t, a, b in zip(texts, got, want) if a != b]
  assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[0]!r}"
  assert got[3] == want[3] and 0 in got[3]  # "<|endoftext|>" in the text is its id
  tok = tokenizer.load_tokenizer(path, "auto")
  assert tok.encoder == "tiktoken"
  assert [x.tolist() for x in tok.encode_batch(texts)] == want


def _metaspace(spec):
  spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                           "split": True}


def _lowercase(spec):
  spec["normalizer"] = {"type": "Lowercase"}


def _prefix_space(spec):
  spec["pre_tokenizer"]["add_prefix_space"] = True


def _plain_added_token(spec):
  spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "hello",
                               "single_word": False, "lstrip": False, "rstrip": False,
                               "normalized": True, "special": False})


def _merges_out_of_order(spec):
  spec["model"]["merges"] = spec["model"]["merges"][::-1]


def _byte_fallback(spec):
  spec["model"]["byte_fallback"] = True


@pytest.mark.parametrize("edit, why", [
    (_metaspace, "pre-tokenizer"), (_lowercase, "normalizer 'Lowercase'"),
    (_prefix_space, "pre-tokenizer"), (_plain_added_token, "added token is not special"),
    (_merges_out_of_order, "does not follow the vocabulary's ids"),
    (_byte_fallback, "byte_fallback"),
])
def test_files_tiktoken_cannot_run_stay_on_tokenizers(tmp_path, edit, why):
  path = gpt2_style(tmp_path / "tokenizer.json", edit=edit)
  encode, why_not = tiktoken_bpe.twin(path)
  assert encode is None and why in why_not
  assert tokenizer.load_tokenizer(path, "auto").encoder == "tokenizers"
  with pytest.raises(ValueError, match="encoder='tiktoken' cannot run it"):
    tokenizer.load_tokenizer(path, "tiktoken")


def test_a_word_regex_that_skips_characters_is_refused(tmp_path):
  pre = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\p{L}+"), "isolated"),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  path = train(tmp_path / "tokenizer.json", pre)
  tok = tokenizer.load_tokenizer(path, "auto")
  assert tok.encoder == "tiktoken"
  with pytest.raises(ValueError, match="skips characters"):
    tok.encode_batch(["words only"])


def test_a_sampled_difference_stops_the_prepare_in_one_line(tmp_path, monkeypatch):
  path = gpt2_style(tmp_path / "tokenizer.json")
  texts = probe_texts(100)
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  real = tiktoken_bpe.twin

  def off_by_one(p):
    encode, _ = real(p)
    return (lambda t: encode(t) + 1 if "import" in t else encode(t)), ""

  monkeypatch.setattr(tiktoken_bpe, "twin", off_by_one)
  with pytest.raises(ValueError, match="encode the text .* differently; prepare with "
                     "--encoder=tokenizers") as e:
    tokenizer.load_tokenizer(path, "auto").encode_batch(
        [t for t in texts if "import" in t] * tokenizer.HFTokenizer.VERIFY_EVERY)
  assert "\n" not in str(e.value)
  # A long document is checked on its first VERIFY_CHARS characters.
  long = "import x\n" * tokenizer.HFTokenizer.VERIFY_CHARS
  with pytest.raises(ValueError, match="differently"):
    tokenizer.load_tokenizer(path, "auto").encode_batch([long])


def test_prepare_auto_writes_the_tokenizers_bytes_and_records_the_encoder(tmp_path):
  path = llama3_style(tmp_path / "tokenizer.json")
  texts = probe_texts(300)
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  made = {}
  for encoder in ("auto", "tokenizers"):
    out = str(tmp_path / encoder)
    m = prepare.prepare(str(tmp_path / "in.jsonl"), path, out, shard_bytes=4096,
                        progress=False, encoder=encoder)
    assert len(m["shards"]) > 3
    made[encoder] = [open(os.path.join(out, s["name"] + ".bin"), "rb").read()
                     for s in m["shards"]]
    assert {s["encoder"] for s in m["shards"]} == {
        "tiktoken" if encoder == "auto" else "tokenizers"}
  assert made["auto"] == made["tokenizers"]
  # An unfinished prepare continued with the other encoder redoes its shards.
  os.remove(os.path.join(tmp_path / "auto", "manifest.json"))
  m = prepare.prepare(str(tmp_path / "in.jsonl"), path, str(tmp_path / "auto"),
                      shard_bytes=4096, progress=False, encoder="tokenizers")
  assert {s["encoder"] for s in m["shards"]} == {"tokenizers"}
  assert shards.read_json(os.path.join(tmp_path / "auto", "manifest.json")) == m


def test_unknown_encoder_is_one_line_error():
  with pytest.raises(ValueError, match="encoder='fast': expected one of auto, tokenizers"):
    tokenizer.load_tokenizer("byte", "fast")


def test_byte_alphabet_is_gpt2s():
  alphabet = tiktoken_bpe.byte_alphabet()
  assert sorted(alphabet.values()) == list(range(256))
  want = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  assert set(alphabet) == set(want)
  assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n")
  assert np.all([alphabet[chr(b)] == b for b in range(ord("!"), ord("~") + 1)])
