"""`esjax.data.prepare`: every input format, shard dtypes, resuming an interrupted prepare,
and the manifest's checks of truncated or corrupt shards."""

import gzip
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from esjax.data import dataset, prepare, shards, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE = tokenizer.ByteTokenizer()
DOCS = [f"document {i}: " + "naïve café ✓ " * (i % 7 + 1) for i in range(30)]


def corpus_tokens(directory):
  """(all tokens, document lengths) of a prepared corpus, read without esjax's reader."""
  m = json.load(open(os.path.join(directory, "manifest.json")))
  tokens, lengths = [], []
  for s in m["shards"]:
    tokens.append(np.fromfile(os.path.join(directory, s["name"] + ".bin"), m["dtype"]))
    lengths.append(np.diff(np.fromfile(os.path.join(directory, s["name"] + ".idx"), "<i8")))
  return np.concatenate(tokens), np.concatenate(lengths)


def reference(texts, tok=BYTE):
  ids = [tok.encode(t) for t in texts]
  return (np.concatenate([np.r_[x, tok.eos_id] for x in ids]),
          np.array([len(x) + 1 for x in ids]))


def check(directory, texts, tok=BYTE):
  got, lengths = corpus_tokens(directory)
  want, want_lengths = reference(texts, tok)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(lengths, want_lengths)


def test_text_jsonl_gz_and_parquet_inputs(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.txt").write_text(DOCS[0])
  with open(tmp_path / "in" / "b.jsonl", "w") as f:
    for t in DOCS[1:12]:
      f.write(json.dumps({"body": t, "id": 1}) + "\n\n")  # blank lines are skipped
  with gzip.open(tmp_path / "in" / "c.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"body": t}) + "\n" for t in DOCS[12:18])
  pq.write_table(pa.table({"body": DOCS[18:], "n": list(range(12))}),
                 str(tmp_path / "in" / "d.parquet"), row_group_size=5)
  out = str(tmp_path / "out")
  m = prepare.prepare(str(tmp_path / "in"), "byte", out, text_field="body", shard_bytes=200,
                      progress=False)
  check(out, DOCS)
  assert m["dtype"] == "<u2" and m["tokens"] == len(reference(DOCS)[0])
  assert m["documents"] == len(DOCS) and len(m["shards"]) > 4  # JSONL and Parquet were cut
  assert m["tokenizer"] == {"spec": "byte", "fingerprint": "byte", "vocab_size": 256,
                            "eos_id": 0}
  assert [os.path.basename(s["path"]) for s in m["sources"]] == [
      "a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet"]
  with pytest.raises(ValueError, match=r"b\.jsonl \(byte 0\): expected a JSON object with a "
                                       r"string field 'text', got \['body', 'id'\]"):
    prepare.prepare(str(tmp_path / "in" / "b.jsonl"), "byte", str(tmp_path / "o2"),
                    progress=False)
  with pytest.raises(ValueError, match=r"d\.parquet: no text column 'text'"):
    prepare.prepare(str(tmp_path / "in" / "d.parquet"), "byte", str(tmp_path / "o3"),
                    progress=False)


def test_saved_hugging_face_dataset(tmp_path):
  datasets = pytest.importorskip("datasets")
  ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
  ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
  prepare.prepare(str(tmp_path / "ds"), "byte", str(tmp_path / "out"), progress=False)
  check(str(tmp_path / "out"), DOCS)
  datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
  with pytest.raises(ValueError, match=r"is a saved DatasetDict: name one split's directory"
                                       r", one of \['.*dd/train'\]"):
    prepare.prepare(str(tmp_path / "dd"), "byte", str(tmp_path / "o2"), progress=False)


def test_large_vocabulary_gets_uint32_shards(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  words = [f"w{i}" for i in range(70_000)]
  vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(str(tmp_path / "tok.json"))
  texts = ["w0 w69999 w65535", "w65536 w1 nope"]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  m = prepare.prepare(str(tmp_path / "a.jsonl"), str(tmp_path / "tok.json"),
                      str(tmp_path / "out"), progress=False)
  assert m["dtype"] == "<u4"
  got, _ = corpus_tokens(str(tmp_path / "out"))
  assert got.tolist() == [2, 70001, 65537, 1, 65538, 3, 0, 1]  # ids = word number + 2


def test_interrupted_prepare_finishes_without_redoing_shards(tmp_path, monkeypatch):
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
  kw = dict(shard_bytes=150, progress=False)
  whole = prepare.prepare(str(tmp_path / "in.jsonl"), "byte", str(tmp_path / "whole"), **kw)
  n = len(whole["shards"])
  assert n >= 6

  real, calls = prepare.tokenize_shard, []

  def dies_at_the_fourth(out, index, *args):
    calls.append(index)
    if len(calls) == 4:
      with open(os.path.join(out, shards.shard_name(index) + ".bin.tmp"), "wb") as f:
        f.write(b"\x01\x02\x03")  # a partly written shard, as a killed worker leaves it
      raise KeyboardInterrupt
    return real(out, index, *args)

  out = str(tmp_path / "out")
  monkeypatch.setattr(prepare, "tokenize_shard", dies_at_the_fourth)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(str(tmp_path / "in.jsonl"), "byte", out, **kw)
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  stamps = {i: os.stat(os.path.join(out, shards.shard_name(i) + ".bin")).st_mtime_ns
            for i in range(3)}
  calls.clear()
  monkeypatch.setattr(prepare, "tokenize_shard", lambda *a: (calls.append(a[1]), real(*a))[1])
  again = prepare.prepare(str(tmp_path / "in.jsonl"), "byte", out, **kw)
  assert calls == list(range(3, n))  # only the missing shards
  for i, stamp in stamps.items():
    assert os.stat(os.path.join(out, shards.shard_name(i) + ".bin")).st_mtime_ns == stamp
  assert again["shards"] == whole["shards"]
  check(out, DOCS)
  calls.clear()
  assert prepare.prepare(str(tmp_path / "in.jsonl"), "byte", out, **kw) == again
  assert calls == []  # a finished prepare is not redone
  with pytest.raises(ValueError, match="holds a prepare of other inputs"):
    prepare.prepare(str(tmp_path / "in.jsonl"), "byte", out, shard_bytes=1000, progress=False)
  # Without its plan, a directory's shards are still only reused for the same inputs.
  os.remove(os.path.join(out, "plan.json"))
  os.remove(os.path.join(out, "manifest.json"))
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t.upper()}) + "\n"
                                             for t in DOCS))
  calls.clear()
  prepare.prepare(str(tmp_path / "in.jsonl"), "byte", out, **kw)
  assert len(calls) == len(json.load(open(os.path.join(out, "manifest.json")))["shards"])
  check(out, [t.upper() for t in DOCS])


def test_two_workers_write_what_one_writes(tmp_path):
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
  one = prepare.prepare(str(tmp_path / "in.jsonl"), "byte", str(tmp_path / "one"),
                        shard_bytes=300, progress=False)
  two = prepare.prepare(str(tmp_path / "in.jsonl"), "byte", str(tmp_path / "two"),
                        workers=2, shard_bytes=300, progress=False)
  assert one == two and len(one["shards"]) > 2


def _prepared(tmp_path):
  (tmp_path / "in.jsonl").write_text(
      "".join(json.dumps({"text": t * 3000}) + "\n" for t in DOCS[:12]))  # ~2 MiB of tokens
  out = str(tmp_path / "out")
  prepare.prepare(str(tmp_path / "in.jsonl"), "byte", out, progress=False)
  return out


def _cfg(out):
  return ml_collections.ConfigDict(dict(source=out, tokenizer="byte", max_bytes=0,
                                        val_fraction=0.25))


def test_truncated_shard_is_one_line_error(tmp_path):
  out = _prepared(tmp_path)
  path = os.path.join(out, "shard_00000.bin")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 2)
  with pytest.raises(ValueError) as e:
    dataset.build(_cfg(out), 63, 4, 0)
  assert str(e.value) == (f"data shard {path} has {size - 2} bytes but manifest.json says "
                          f"{size}: it is missing, truncated or was changed; prepare {out} again")


def test_corrupt_block_is_caught_before_it_is_trained_on(tmp_path):
  out = _prepared(tmp_path)
  data = dataset.build(_cfg(out), 63, 4, 0)
  windows = data.train.parts[0]
  checked = windows.corpus._checked[0]
  assert 0 < checked.sum() < len(checked)  # opening did not read the whole shard
  # Flip the first token of training batch 0's first row.
  window = dataset.sampling.permute(np.zeros(1, np.int64), len(windows), (0, 0, 0))
  shard, start = (int(x[0]) for x in windows.locate(window))
  block = start * 2 // shards.BLOCK_BYTES
  path = os.path.join(out, shards.shard_name(shard) + ".bin")
  with open(path, "r+b") as f:
    f.seek(start * 2)
    f.write(b"\x07\x07")
  with pytest.raises(ValueError, match=rf"^data shard {path} is corrupt: block {block} \(bytes "
                                       rf"from {block * shards.BLOCK_BYTES}\) has CRC-32 "
                                       r"[0-9a-f]{8} but manifest.json says [0-9a-f]{8}; "
                                       rf"prepare {out} again$"):
    fresh = dataset.build(_cfg(out), 63, 4, 0)  # raises here if validation reads the block,
    next(fresh.train)  # else here, before any batch comes out


def test_corrupt_index_is_one_line_error(tmp_path):
  out = _prepared(tmp_path)
  path = os.path.join(out, "shard_00000.idx")
  data = bytearray(open(path, "rb").read())
  data[9] ^= 1
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match=rf"data shard {path} is corrupt: the document index"):
    dataset.build(_cfg(out), 63, 4, 0)


def _drop_last_shard(m):
  last = m["shards"].pop()
  m["tokens"] -= last["tokens"]
  m["documents"] -= last["documents"]


def _set(m, key, value):
  m[key] = value


@pytest.mark.parametrize("edit, message", [
    (lambda m: _set(m, "dtype", "|i1"), r"manifest.json: dtype='\|i1', expected one of"),
    (lambda m: _set(m, "dtype", "<u4"), r"shard_00000.bin has \d+ bytes but manifest.json says "
                                        r"tokens=\d+ \(\d+ bytes\)"),
    (lambda m: _set(m["shards"][0], "tokens", m["shards"][0]["tokens"] + 1),
     r"shard_00000.bin has \d+ bytes but manifest.json says tokens="),
    (lambda m: _set(m, "tokens", m["tokens"] + 1), r"manifest.json: tokens=\d+ but its shards "
                                                   r"hold \d+"),
    (lambda m: _set(m["tokenizer"], "vocab_size", 300),
     r"manifest.json: tokenizer.vocab_size=300 but data.tokenizer='byte' has 256 ids"),
    (_drop_last_shard, r"shard_00006.bin is not listed in manifest.json"),
    (lambda m: m["shards"][0]["block_crc32"].pop(),  # issue 28 item 17: was a traceback
     r"shard_00000.bin has 1 blocks but manifest.json lists 0 block_crc32"),
], ids=["dtype-int8", "dtype-uint32", "shard-tokens", "total-tokens", "vocab", "unlisted-shard",
        "short-crc-list"])
def test_manifest_that_disagrees_with_its_shards_is_one_line(tmp_path, edit, message):
  """An edited manifest is refused before training (each of these trained on, rc 0)."""
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
  out = str(tmp_path / "out")
  prepare.prepare(str(tmp_path / "in.jsonl"), "byte", out, shard_bytes=600, progress=False)
  path = os.path.join(out, "manifest.json")
  m = json.load(open(path))
  assert len(m["shards"]) == 7
  dataset.build(_cfg(out), 15, 2, 0)  # as prepared: accepted
  edit(m)
  shards.write_json(path, m)
  with pytest.raises(ValueError, match=message + rf".*; prepare {out} again$"):
    dataset.build(_cfg(out), 15, 2, 0)


def test_token_ids_beyond_the_manifest_vocabulary_are_refused(tmp_path):
  out = str(tmp_path / "out")
  (tmp_path / "a.txt").write_text(DOCS[3])
  prepare.prepare(str(tmp_path / "a.txt"), "byte", out, progress=False)
  path = os.path.join(out, "manifest.json")
  m = json.load(open(path))
  assert shards.Corpus(out).read(0, 0, 8).max() < 128  # "document 3: ..." is ASCII
  m["tokenizer"]["vocab_size"] = 128  # "naïve café" holds bytes >= 128
  shards.write_json(path, m)
  with pytest.raises(ValueError, match=r"shard_00000.bin holds token id 2\d\d \(block 0\) but "
                                       r"manifest.json says tokenizer.vocab_size=128"):
    shards.Corpus(out).read(0, 0, 8)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_jsonl_gz_is_one_line_in_prepare_and_training(tmp_path, damage):
  data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 20).encode())
  if damage == "truncated":
    data = data[:len(data) // 2]
  else:  # the deflate stream or the CRC no longer matches
    half = len(data) // 2
    data = data[:half] + bytes([data[half] ^ 0xFF]) + data[half + 1:]
  path = tmp_path / "in.jsonl.gz"
  path.write_bytes(data)
  message = rf"^{path}: not a complete gzip file, truncated or corrupt \(\w+: .+\)$"
  with pytest.raises(ValueError, match=message):
    prepare.prepare(str(path), "byte", str(tmp_path / "out"), progress=False)
  with pytest.raises(ValueError, match=message):  # training prepares raw sources itself
    dataset.build(_cfg(str(path)), 15, 2, 0)


@pytest.mark.parametrize("out, message", [
    ("{tmp}/a.txt", "--out={tmp}/a.txt is a file, expected a directory"),
    ("/sys/esjax_prepare_out", "/sys/esjax_prepare_out: Operation not permitted"),  # read-only
])
def test_cli_out_that_cannot_be_written_is_one_line(tmp_path, out, message):
  (tmp_path / "a.txt").write_text("hello world\n")
  got = subprocess.run([sys.executable, "-m", "esjax.data.prepare", f"--source={tmp_path}/a.txt",
                        f"--out={out.format(tmp=tmp_path)}"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  lines = [l for l in got.stderr.splitlines() if l.startswith("esjax")]
  assert got.returncode != 0 and "Traceback" not in got.stderr, got.stderr[-2000:]
  assert lines == [f"esjax.data.prepare: error: {message.format(tmp=tmp_path)}"]


def test_cli_prepares_and_reports_bad_input_in_one_line(tmp_path):
  (tmp_path / "a.txt").write_text("hello world\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "esjax.data.prepare", *a], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=120)
  ok = run(f"--source={tmp_path}/a.txt", f"--out={tmp_path}/out", "--workers=1")
  assert ok.returncode == 0, ok.stderr
  assert f"prepared {tmp_path}/out: 13 tokens, 1 documents, 1 shards (<u2, encoded by byte)" in ok.stdout
  bad = run(f"--source={tmp_path}/nope", f"--out={tmp_path}/o2")
  assert bad.returncode != 0
  assert bad.stderr.strip() == ("esjax.data.prepare: error: data.source: "
                                f"'{tmp_path}/nope' is not a file, a directory or a glob that "
                                "matches any file")
