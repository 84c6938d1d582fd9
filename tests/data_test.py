"""Tokenizers, text sources, the train/validation split and the resumable iterator."""

import os

import ml_collections
import numpy as np
import pytest

from esjax.data import dataset, sources, tokenizer

TEXT = "The quick brown fox — jumps over the lazy dog. ünïcödé ✓\n"


def data_cfg(source, **kw):
  c = ml_collections.ConfigDict(dict(source=source, tokenizer="byte", max_bytes=0,
                                     val_fraction=0.25))
  c.update(kw)
  return c


def test_byte_tokenizer_is_utf8_and_roundtrips():
  tok = tokenizer.load_tokenizer("byte")
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and tok.vocab_size == 256 and tok.eos_id == 0
  np.testing.assert_array_equal(ids, list(TEXT.encode("utf-8")))
  assert tok.decode(list(ids) + [tok.eos_id]) == TEXT


def test_hf_tokenizers_file(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "</s>"])
  tok.train_from_iterator([TEXT * 20], trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  loaded = tokenizer.load_tokenizer(path)
  assert loaded.eos_id == tok.token_to_id("</s>")
  ids = loaded.encode("the lazy dog")
  np.testing.assert_array_equal(ids, tok.encode("the lazy dog").ids)
  assert loaded.decode(ids).replace(" ", "") == "thelazydog"


def test_sentencepiece_file(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(TEXT * 50 + "a different line about tokens\n" * 50)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=60, model_type="bpe", eos_id=2,
                                 minloglevel=2)
  loaded = tokenizer.load_tokenizer(str(tmp_path / "sp.model"))
  ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  assert loaded.vocab_size == 60 and loaded.eos_id == 2
  np.testing.assert_array_equal(loaded.encode("the lazy dog"), ref.encode("the lazy dog"))
  assert loaded.decode(loaded.encode("the lazy dog")) == "the lazy dog"


def test_tokenizer_spec_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.tokenizer='nope.model'"):
    tokenizer.load_tokenizer("nope.model")
  (tmp_path / "t.txt").write_text("x")
  with pytest.raises(ValueError, match="expected 'byte', a .model or a .json"):
    tokenizer.load_tokenizer(str(tmp_path / "t.txt"))


def test_sources_files_dirs_globs_in_sorted_order(tmp_path):
  (tmp_path / "b").mkdir()
  for name in ("b/2.txt", "b/1.txt", "a.txt", ".hidden"):
    (tmp_path / name).write_text(name)
  files = sources.resolve_files(f"{tmp_path}/b, {tmp_path}/*.txt, {tmp_path}/a.txt")
  assert [os.path.relpath(f, tmp_path) for f in files] == ["b/1.txt", "b/2.txt", "a.txt"]
  assert list(sources.read_documents(files)) == ["b/1.txt", "b/2.txt", "a.txt"]
  # The cap keeps whole files only, and always the first.
  assert list(sources.read_documents(files, max_bytes=14)) == ["b/1.txt", "b/2.txt"]
  assert list(sources.read_documents(files, max_bytes=1)) == ["b/1.txt"]


def test_missing_source_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.resolve_files(f"{tmp_path}/nowhere")
  with pytest.raises(FileNotFoundError, match=r"\*\.zzz"):
    sources.resolve_files(f"{tmp_path}/*.zzz")


def test_default_corpus_is_real_text_deterministic_and_capped():
  files = sources.stdlib_files()
  assert len(files) > 50 and files == sorted(files)
  assert any(f.endswith(os.sep + "os.py") for f in files)
  cfg = data_cfg("stdlib", max_bytes=1_000_000, val_fraction=0.05)
  a = dataset.build(cfg, seq_len=64, batch_size=4, seed=0)
  b = dataset.build(cfg, seq_len=64, batch_size=4, seed=0)
  assert 500_000 < a.n_tokens <= 1_000_000 + a.n_files
  assert a.train.fingerprint == b.train.fingerprint
  text = a.tokenizer.decode(a.train.windows[:50].ravel())
  assert "def " in text and "import" in text


def test_split_every_kth_window_to_validation():
  tokens = np.arange(10 * 9, dtype=np.int32)  # 10 windows of seq_len + 1 = 9
  train, val = dataset.split_windows(tokens, seq_len=8, val_fraction=0.25)
  np.testing.assert_array_equal(val[:, 0], [27, 63])  # windows 3 and 7 (k = 4)
  assert len(train) == 8 and not set(train[:, 0]) & set(val[:, 0])
  batch = dataset.to_batch(train[:2])
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  assert batch["inputs"].shape == (2, 8) and batch["inputs"].dtype == np.int32


def test_iterator_epochs_are_permutations_and_resume_exactly():
  windows = np.arange(7 * 5, dtype=np.int32).reshape(7, 5)
  it = dataset.BatchIterator(windows, batch_size=3, seed=1)
  straight = [next(it) for _ in range(7)]  # 21 examples = 3 epochs of 7
  firsts = np.concatenate([b["inputs"][:, 0] for b in straight]) // 5
  for epoch in range(3):
    assert sorted(firsts[7 * epoch:7 * epoch + 7]) == list(range(7))
  assert not all(np.array_equal(firsts[:7], firsts[7 * e:7 * e + 7]) for e in (1, 2))
  resumed = dataset.BatchIterator(windows, batch_size=3, seed=1)
  saved = dataset.BatchIterator(windows, batch_size=3, seed=1)
  for _ in range(4):
    next(saved)
  resumed.restore(saved.state())
  for b in straight[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], b["inputs"])
    np.testing.assert_array_equal(got["targets"], b["targets"])
  other = dataset.BatchIterator(windows, batch_size=3, seed=2)
  assert not np.array_equal(other.batch(0)["inputs"], straight[0]["inputs"])


def test_iterator_refuses_a_position_from_other_data():
  windows = np.arange(40, dtype=np.int32).reshape(8, 5)
  state = dataset.BatchIterator(windows, 2, 0).state()
  with pytest.raises(ValueError, match="fingerprint"):
    dataset.BatchIterator(windows + 1, 2, 0).restore(state)
  with pytest.raises(ValueError, match="batch_size"):
    dataset.BatchIterator(windows, 4, 0).restore(state)


def test_empty_and_too_small_datasets_fail_clearly(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"empty\.txt.*too small: 1 file\(s\), 0 tokens"):
    dataset.build(data_cfg(str(tmp_path / "empty.txt")), 16, 2, 0)
  (tmp_path / "short.txt").write_text("x" * 20)
  with pytest.raises(ValueError, match="validation window"):
    dataset.build(data_cfg(str(tmp_path / "short.txt")), 16, 2, 0)


def test_eval_batches_fixed_and_in_order():
  windows = np.arange(5 * 3, dtype=np.int32).reshape(5, 3)
  batches = dataset.eval_batches(windows, batch_size=2, n_batches=8)
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[1]["inputs"][:, 0], [6, 9])
  one = dataset.eval_batches(windows[:1], batch_size=2, n_batches=8)  # repeats to fill
  np.testing.assert_array_equal(one[0]["inputs"], [[0, 1], [0, 1]])
