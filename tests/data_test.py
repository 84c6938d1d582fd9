"""Tokenizers, text sources, the sampler (shuffle, blend), held-out validation documents and
the resumable iterator over prepared corpora."""

import json
import os

import ml_collections
import numpy as np
import pytest

from esjax.data import dataset, prepare, sampling, sources, tokenizer

TEXT = "The quick brown fox — jumps over the lazy dog. ünïcödé ✓\n"


def data_cfg(source, **kw):
  c = ml_collections.ConfigDict(dict(source=source, tokenizer="byte", max_bytes=0,
                                     val_fraction=0.25))
  c.update(kw)
  return c


def write_jsonl(path, texts):
  with open(path, "w") as f:
    for t in texts:
      f.write(json.dumps({"text": t}) + "\n")


def prepared(tmp_path, name, texts, shard_bytes=prepare.SHARD_BYTES):
  """A prepared byte-level corpus of the given documents (one JSONL line each)."""
  write_jsonl(tmp_path / f"{name}.jsonl", texts)
  out = str(tmp_path / name)
  prepare.prepare(str(tmp_path / f"{name}.jsonl"), "byte", out, shard_bytes=shard_bytes,
                  progress=False)
  return out


def test_byte_tokenizer_is_utf8_and_roundtrips():
  tok = tokenizer.load_tokenizer("byte")
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and tok.vocab_size == 256 and tok.eos_id == 0
  np.testing.assert_array_equal(ids, list(TEXT.encode("utf-8")))
  assert tok.decode(list(ids) + [tok.eos_id]) == TEXT
  assert [list(x) for x in tok.encode_batch([TEXT, "ab"])] == [list(ids), [97, 98]]


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
  texts = ["the lazy dog", TEXT, ""]
  for got, text in zip(loaded.encode_batch(texts), texts):
    np.testing.assert_array_equal(got, tok.encode(text).ids)


def test_sentencepiece_file(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(TEXT * 50 + "a different line about tokens\n" * 50)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=60, model_type="bpe", eos_id=2,
                                 minloglevel=2)
  loaded = tokenizer.load_tokenizer(str(tmp_path / "sp.model"))
  ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  assert loaded.vocab_size == 60 and loaded.eos_id == 2 and loaded.bos_id == ref.bos_id() == 1
  np.testing.assert_array_equal(loaded.encode("the lazy dog"), ref.encode("the lazy dog"))
  assert loaded.decode(loaded.encode("the lazy dog")) == "the lazy dog"
  got = loaded.encode_batch(["the lazy dog", "tokens"])
  assert [list(x) for x in got] == [ref.encode("the lazy dog"), ref.encode("tokens")]


def test_tokenizer_spec_errors_and_fingerprint(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.tokenizer='nope.model'"):
    tokenizer.load_tokenizer("nope.model")
  (tmp_path / "t.txt").write_text("x")
  with pytest.raises(ValueError, match="expected 'byte', a .model or a .json"):
    tokenizer.load_tokenizer(str(tmp_path / "t.txt"))
  (tmp_path / "copy.txt").write_text("x")
  (tmp_path / "other.txt").write_text("y")
  fp = tokenizer.fingerprint
  assert fp("byte") == "byte"
  assert fp(str(tmp_path / "t.txt")) == fp(str(tmp_path / "copy.txt"))  # content, not path
  assert fp(str(tmp_path / "t.txt")) != fp(str(tmp_path / "other.txt"))


def test_sources_files_dirs_globs_in_sorted_order(tmp_path):
  (tmp_path / "b").mkdir()
  for name in ("b/2.txt", "b/1.txt", "a.txt", ".hidden"):
    (tmp_path / name).write_text(name)
  files = sources.resolve_files(f"{tmp_path}/b, {tmp_path}/*.txt, {tmp_path}/a.txt")
  assert [os.path.relpath(f, tmp_path) for f in files] == ["b/1.txt", "b/2.txt", "a.txt"]
  docs = [d for p in sources.pieces(files, 1 << 20) for d in sources.documents(p)]
  assert docs == ["b/1.txt", "b/2.txt", "a.txt"]
  # The cap keeps whole files only, and always the first.
  assert sources.cap_files(files, max_bytes=14) == files[:2]
  assert sources.cap_files(files, max_bytes=1) == files[:1]


def test_missing_source_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.resolve_files(f"{tmp_path}/nowhere")
  with pytest.raises(FileNotFoundError, match=r"\*\.zzz"):
    sources.resolve_files(f"{tmp_path}/*.zzz")


def test_default_corpus_is_real_text_deterministic_and_capped(tmp_path):
  files = sources.stdlib_files()
  assert len(files) > 50 and files == sorted(files)
  assert any(f.endswith(os.sep + "os.py") for f in files)
  cfg = data_cfg("stdlib", max_bytes=1_000_000, val_fraction=0.05)
  a = dataset.build(cfg, seq_len=64, batch_size=4, seed=0, cache_dir=str(tmp_path / "c"))
  b = dataset.build(cfg, seq_len=64, batch_size=4, seed=0)  # a temporary cache
  kept = sources.cap_files(files, 1_000_000)
  assert a.n_tokens == sum(os.path.getsize(f) for f in kept) + len(kept)  # bytes + an eos each
  assert 500_000 < a.n_tokens <= 1_000_000 + len(kept)
  assert a.train.fingerprint == b.train.fingerprint
  np.testing.assert_array_equal(next(a.train)["inputs"], next(b.train)["inputs"])
  text = a.tokenizer.decode(a.train.windows[:50].ravel())
  assert "def " in text and "import" in text
  os.rename(str(tmp_path / "c"), str(tmp_path / "moved"))  # the cache is prepared once:
  c = dataset.build(cfg, seq_len=64, batch_size=4, seed=0, cache_dir=str(tmp_path / "moved"))
  assert c.directories == [os.path.join(str(tmp_path / "moved"), os.path.basename(
      a.directories[0]))]


def test_permute_is_a_uniform_permutation():
  for n in (1, 2, 3, 5, 17, 64, 1000, 4099):
    got = sampling.permute(np.arange(n), n, (0, 7))
    assert sorted(got.tolist()) == list(range(n)), n
  a = sampling.permute(np.arange(50), 50, (1,))
  np.testing.assert_array_equal(a, sampling.permute(np.arange(50), 50, (1,)))
  assert not np.array_equal(a, sampling.permute(np.arange(50), 50, (2,)))
  np.testing.assert_array_equal(sampling.permute(np.array([7, 3]), 50, (1,)), a[[7, 3]])
  # Where item 0 lands over 1600 keys: uniform over 8 places (chi-square, 7 dof, p ~ 1e-6).
  lands = np.array([sampling.permute(np.zeros(1, np.int64), 8, (k,))[0] for k in range(1600)])
  counts = np.bincount(lands, minlength=8)
  assert ((counts - 200) ** 2 / 200).sum() < 38, counts


def test_blend_shares_every_prefix_and_numbers_each_source_in_order():
  weights = [0.5, 0.3, 0.2]
  blend = sampling.Blend(weights)
  n = 3 * sampling.Blend.PERIOD + 777
  source, rank = blend.locate(np.arange(n))
  counts = np.stack([np.cumsum(source == s) for s in range(3)], 1)  # prefix counts
  ideal = np.arange(1, n + 1)[:, None] * np.asarray(weights)[None]
  assert np.abs(counts - ideal).max() <= 1.0
  for s in range(3):  # each source's examples are its 0, 1, 2, ... in stream order
    np.testing.assert_array_equal(rank[source == s], np.arange((source == s).sum()))
  s2, r2 = blend.locate(np.array([5, n - 1]))  # random access agrees
  assert (s2.tolist(), r2.tolist()) == ([source[5], source[-1]], [rank[5], rank[-1]])
  with pytest.raises(ValueError, match="positive"):
    sampling.Blend([1.0, 0.0])


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
  with pytest.raises(ValueError, match="seed=0 but this run has seed=1"):
    dataset.BatchIterator(windows, 2, 1).restore(state)


def test_a_changed_batch_size_continues_the_stream_at_the_same_example():
  """4 batches of 3 (examples 0-11), resumed with batches of 5: examples 12-16, 17-21, ...
  of the same stream (read one example at a time), none skipped or repeated; then a resume
  of that with batches of 2 continues at example 22."""
  windows = np.arange(7 * 5, dtype=np.int32).reshape(7, 5)
  one = dataset.BatchIterator(windows, batch_size=1, seed=1)
  stream = np.concatenate([one.batch(e)["inputs"] for e in range(40)])
  first = dataset.BatchIterator(windows, batch_size=3, seed=1)
  for _ in range(4):
    next(first)
  second = dataset.BatchIterator(windows, batch_size=5, seed=1)
  note = second.restore(first.state())
  assert "batch size changed from 3 to 5" in note and "example 12" in note
  assert second.position == 4  # steps, as the checkpoint's step
  for start in (12, 17):
    np.testing.assert_array_equal(next(second)["inputs"], stream[start:start + 5])
  third = dataset.BatchIterator(windows, batch_size=2, seed=1)
  third.restore(second.state())
  assert third.position == 6
  np.testing.assert_array_equal(next(third)["inputs"], stream[22:24])
  np.testing.assert_array_equal(third.batch(7)["inputs"], stream[24:26])


def test_a_changed_window_length_continues_at_the_same_token_count(tmp_path):
  """6 batches of 4 windows of 17 tokens (408 tokens) resumed with windows of 33: example
  408 // 33 = 12 of the 33-token stream; the same corpus at another path is the same data,
  other text is refused."""
  text = tmp_path / "a.txt"
  text.write_text("".join(f"line {i} of the corpus\n" for i in range(3000)))
  cfg = data_cfg(str(text), max_bytes=0, val_fraction=0.0)
  short = dataset.build(cfg, seq_len=16, batch_size=4, seed=3, n_eval_batches=0).train
  for _ in range(6):
    next(short)
  moved = tmp_path / "moved" / "b.txt"
  moved.parent.mkdir()
  moved.write_text(text.read_text())
  long = dataset.build(data_cfg(str(moved), max_bytes=0, val_fraction=0.0), seq_len=32,
                       batch_size=4, seed=3, n_eval_batches=0).train
  note = long.restore(short.state())
  assert "window length changed from 17 to 33 tokens" in note and "example 12 instead of 24" in note
  one = dataset.build(cfg, seq_len=32, batch_size=1, seed=3, n_eval_batches=0).train
  np.testing.assert_array_equal(next(long)["inputs"],
                                np.concatenate([one.batch(e)["inputs"] for e in range(12, 16)]))
  other = tmp_path / "c.txt"
  other.write_text(text.read_text().replace("corpus", "CORPUS"))
  with pytest.raises(ValueError, match="fingerprint"):
    dataset.build(data_cfg(str(other), max_bytes=0, val_fraction=0.0), seq_len=16,
                  batch_size=4, seed=3, n_eval_batches=0).train.restore(short.state())


def _doc(i):
  return f"<doc {i:03d}> " + "lorem ipsum " * (i % 5 + 2)


def test_validation_is_held_out_documents_across_shards(tmp_path):
  texts = [_doc(i) for i in range(40)]
  out = prepared(tmp_path, "docs", texts, shard_bytes=300)  # several shards
  assert len(json.load(open(os.path.join(out, "manifest.json")))["shards"]) > 3
  data = dataset.build(data_cfg(out, val_fraction=0.25), seq_len=15, batch_size=2, seed=0,
                       n_eval_batches=100)
  decode = data.tokenizer.decode
  val_text = "".join(decode(np.concatenate([b["inputs"][:, :1], b["targets"]], 1).ravel())
                     for b in data.val)
  train_text = decode(data.train.windows.ravel())
  for i, t in enumerate(texts):
    held_out = i % 4 == 3  # every k-th document, k = 1 / val_fraction
    assert (f"<doc {i:03d}>" in val_text) == held_out, i
    assert (f"<doc {i:03d}>" in train_text) == (not held_out), i
  # The validation windows are the held-out documents (each ending with eos), in order.
  val_tokens = np.concatenate([np.r_[tokenizer.ByteTokenizer().encode(t), 0]
                               for i, t in enumerate(texts) if i % 4 == 3])
  n = sum(len(b["inputs"]) for b in data.val)
  want = dataset.cut_windows(val_tokens, 15)[:n]
  got = np.concatenate([np.concatenate([b["inputs"][:, :1], b["targets"]], 1)
                        for b in data.val])
  np.testing.assert_array_equal(got, want)


def test_few_documents_hold_out_the_tail(tmp_path):
  (tmp_path / "one.txt").write_text("".join(_doc(i) for i in range(30)))
  data = dataset.build(data_cfg(str(tmp_path / "one.txt"), val_fraction=0.1), seq_len=15,
                       batch_size=2, seed=0, n_eval_batches=100)
  tokens = np.r_[tokenizer.ByteTokenizer().encode((tmp_path / "one.txt").read_text()), 0]
  cut = len(tokens) - int(np.ceil(len(tokens) * 0.1))
  np.testing.assert_array_equal(data.train.windows, dataset.cut_windows(tokens[:cut], 15))
  val = np.concatenate([np.concatenate([b["inputs"][:, :1], b["targets"]], 1)
                        for b in data.val])
  np.testing.assert_array_equal(val, dataset.cut_windows(tokens[cut:], 15)[:len(val)])


def test_prepared_corpus_batches_resume_exactly_and_rows_are_slices(tmp_path):
  out = prepared(tmp_path, "docs", [_doc(i) for i in range(60)], shard_bytes=500)
  cfg = data_cfg(out, val_fraction=0.1)
  a = dataset.build(cfg, seq_len=15, batch_size=4, seed=3)
  straight = [next(a.train) for _ in range(12)]  # several epochs of the 40-odd windows
  b = dataset.build(cfg, seq_len=15, batch_size=4, seed=3)
  for _ in range(5):
    next(b.train)
  c = dataset.build(cfg, seq_len=15, batch_size=4, seed=3)
  c.train.restore(json.loads(json.dumps(b.train.state())))  # as the checkpoint stores it
  for want in straight[5:]:
    np.testing.assert_array_equal(next(c.train)["inputs"], want["inputs"])
  rows = np.array([1, 3])  # a process that holds rows 1 and 3 of every batch
  d = dataset.build(cfg, seq_len=15, batch_size=4, seed=3)
  for want in straight[:3]:
    got = d.train.next_rows(rows)
    np.testing.assert_array_equal(got["inputs"], want["inputs"][rows])
    np.testing.assert_array_equal(got["targets"], want["targets"][rows])
  windows = {tuple(w) for w in a.train.windows}
  for batch in straight:
    for x, y in zip(batch["inputs"], batch["targets"]):
      assert tuple(np.r_[x, y[-1]]) in windows


def test_blend_of_prepared_sources_is_weighted_and_deterministic(tmp_path):
  a = prepared(tmp_path, "a", ["a" * (50 + i) for i in range(40)])
  b = prepared(tmp_path, "b", ["b" * (50 + i) for i in range(40)])
  cfg = data_cfg(f"0.7:{a}, 0.3:{b}", val_fraction=0.1)
  data = dataset.build(cfg, seq_len=15, batch_size=10, seed=0, n_eval_batches=2)
  from_a = []
  for _ in range(20):
    x = next(data.train)["inputs"]
    assert all(set(r) <= {ord("a"), 0} or set(r) <= {ord("b"), 0} for r in x.tolist())
    from_a += [ord("a") in set(r) for r in x]
  source, _ = sampling.Blend([0.7, 0.3]).locate(np.arange(200))
  np.testing.assert_array_equal(from_a, source == 0)  # row by row as the blend says
  assert abs(np.mean(from_a) - 0.7) <= 0.01
  again = dataset.build(cfg, seq_len=15, batch_size=10, seed=0, n_eval_batches=2)
  np.testing.assert_array_equal(again.train.batch(7)["inputs"], data.train.batch(7)["inputs"])
  val_a = [ord("a") in set(r) for v in data.val for r in v["inputs"]]
  np.testing.assert_array_equal(val_a, source[:20] == 0)
  with pytest.raises(ValueError, match="give every entry of a blend a weight"):
    dataset.build(data_cfg(f"0.7:{a},{b}"), seq_len=15, batch_size=10, seed=0)


def test_tokenizer_mismatch_is_one_line_error(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  out = prepared(tmp_path, "docs", [_doc(i) for i in range(20)])
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.train_from_iterator([TEXT * 20], tokenizers.trainers.BpeTrainer(
      vocab_size=60, special_tokens=["<unk>", "</s>"]))
  tok.save(str(tmp_path / "tok.json"))
  with pytest.raises(ValueError, match=r"prepared with tokenizer 'byte' \(byte\) but "
                                       r"data.tokenizer='.*tok.json' is sha256:") as e:
    dataset.build(data_cfg(out, tokenizer=str(tmp_path / "tok.json")), 15, 2, 0)
  assert "\n" not in str(e.value)


def test_empty_and_too_small_datasets_fail_clearly(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"empty\.txt.*too small: 0 document\(s\), 0 tokens"):
    dataset.build(data_cfg(str(tmp_path / "empty.txt")), 16, 2, 0)
  (tmp_path / "short.txt").write_text("x" * 20)
  with pytest.raises(ValueError, match="validation window"):
    dataset.build(data_cfg(str(tmp_path / "short.txt")), 16, 2, 0)


def test_eval_batches_fixed_and_in_order():
  windows = np.arange(5 * 3, dtype=np.int32).reshape(5, 3)
  one_source = sampling.Blend([1.0])
  batches = dataset.eval_batches([windows], one_source, batch_size=2, n_batches=8)
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[1]["inputs"][:, 0], [6, 9])
  one = dataset.eval_batches([windows[:1]], one_source, batch_size=2, n_batches=8)  # repeats
  np.testing.assert_array_equal(one[0]["inputs"], [[0, 1], [0, 1]])


def _special_tokenizer(folder):
  tokenizers = pytest.importorskip("tokenizers")
  specials = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_end|>"]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator([TEXT * 20], tokenizers.trainers.BpeTrainer(
      vocab_size=80, special_tokens=specials))
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  return tok


@pytest.mark.parametrize("files", [
    # Qwen-instruct: no BOS, end-of-text <|im_end|> (generation_config also lists it first)
    {"tokenizer_config.json": {"bos_token": None, "eos_token": "<|im_end|>"},
     "generation_config.json": {"eos_token_id": [4, 3]}},
    # Llama: BOS <s>, EOS </s>, as added-token dicts in special_tokens_map.json
    {"tokenizer_config.json": {"add_bos_token": True},
     "special_tokens_map.json": {"bos_token": {"content": "<s>", "lstrip": False},
                                 "eos_token": {"content": "</s>", "lstrip": False}}},
], ids=["qwen-instruct", "llama"])
def test_hf_tokenizer_special_tokens_are_transformers(tmp_path, files):
  """bos_id / eos_id are transformers' tokenizer.bos_token_id / eos_token_id, and the
  evaluation prefix is lm-eval's prefix_token_id (lm_eval/models/huggingface.py 0.4.13:
  BOS if not None, else EOS)."""
  transformers = pytest.importorskip("transformers")
  from esjax.eval import perplexity  # pylint: disable=g-import-not-at-top
  _special_tokenizer(tmp_path / "tok")
  for name, content in files.items():
    (tmp_path / "tok" / name).write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **content}
        if name == "tokenizer_config.json" else content))
  ours = tokenizer.load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
  want_prefix = hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id
  assert perplexity.prefix_id(ours) == want_prefix


def test_hf_tokenizer_ids_from_generation_config_or_config(tmp_path):
  tok = _special_tokenizer(tmp_path / "tok")
  folder = tmp_path / "tok"
  (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
  loaded = tokenizer.load_tokenizer(str(folder / "tokenizer.json"))
  assert (loaded.bos_id, loaded.eos_id) == (1, 2)
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 3]}))
  loaded = tokenizer.load_tokenizer(str(folder / "tokenizer.json"))
  assert (loaded.bos_id, loaded.eos_id) == (1, tok.token_to_id("<|im_end|>"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
  with pytest.raises(ValueError, match="eos_token='<nope>' is not in the vocabulary"):
    tokenizer.load_tokenizer(str(folder / "tokenizer.json"))
