"""The data pipeline at scale: start time, data RSS and read throughput on prepared corpora
of growing size, and prepare throughput with a 32k BPE tokenizer at 1 and more workers.

    python -m benchmarks.data                          # 100M and 1B tokens, 1 and 2 workers
    python -m benchmarks.data --sizes 1M --prepare_mb 2 --workers 1   # a quick check

Corpora are generated, not tokenized: random ids below the vocabulary written straight
into the shard format (esjax/data/shards.py) in documents of geometric length (mean
`--doc_tokens`), with the benchmark's tokenizer recorded in the manifest. Each is measured
in a fresh process: `start_s` is `dataset.build` (`--val_fraction`, by default the base
config's) plus the first batch; RSS is read from /proc/self/status before and after
reading `--read_batches` batches of `--batch` x `--seq_len` twice (RssAnon: memory the
process owns; RssFile: file pages mapped into it). Read throughput is the iterator's
(shuffle, blend, checks, read, int32) on a warm page cache: `first_read_tokens_per_s`
includes checksumming each block the first time it is touched (`blocks_checked`: the
fraction checked by then), `read_tokens_per_s` is the second pass, and
`memmap_copy_tokens_per_s` the same number of rows copied straight out of `np.memmap`s in
the same process, the reference it is compared with (`read_vs_memmap_copy`). Each corpus
is deleted after its measurement.

Prepare throughput runs the real CLI (`python -m esjax.data.prepare`, wall clock, process
start included) on JSONL made of the standard library's sources, with a byte-level BPE
tokenizer of 32k ids trained on part of it, once per `--encoders` entry (`tokenizers`: the
Rust library's batch mode; `auto`: tiktoken, which reproduces this file) and worker count.
Its CPU time (workers included) and the machine's load average are reported with it: on a
shared machine the workers compete with everything else running, and tokens per CPU second
is the figure that shows the scaling. The ceiling beside it, `encode_only`, is each
library's own rate on the same text in this process on one core (the texts in memory, one
call), measured in the same run. One JSON line per measurement, then a summary line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import ml_collections
import numpy as np

from esjax.data import dataset, shards, tiktoken_bpe
from esjax.data.tokenizer import fingerprint, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _count(text: str) -> int:
  """'100M' -> 100_000_000."""
  scale = {"K": 10**3, "M": 10**6, "B": 10**9}
  text = text.strip().upper()
  return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def train_tokenizer(path: str, texts: list[str], vocab: int) -> None:
  import tokenizers  # pylint: disable=g-import-not-at-top  # optional: tests-only package

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.save(path)


def synthetic_corpus(out: str, n_tokens: int, tokenizer: dict, doc_tokens: int,
                     shard_tokens: int = 64 << 20, seed: int = 0) -> dict:
  """A prepared directory of `n_tokens` random ids, written directly."""
  rng = np.random.default_rng(seed)
  os.makedirs(out, exist_ok=True)
  dtype = shards.token_dtype(tokenizer["vocab_size"])
  records, left, index = [], n_tokens, 0
  while left > 0:
    size = min(shard_tokens, left)
    lengths = rng.geometric(1.0 / doc_tokens, size // doc_tokens * 2 + 16)
    ends = np.cumsum(lengths)
    lengths = lengths[:np.searchsorted(ends, size) + 1]
    lengths[-1] -= int(lengths.sum()) - size
    lengths = lengths[lengths > 0]
    tokens = rng.integers(1, tokenizer["vocab_size"], size, dtype=np.uint16).astype(dtype)
    tokens[np.cumsum(lengths) - 1] = tokenizer["eos_id"]
    writer = shards.ShardWriter(out, index, dtype)
    writer.add(tokens, lengths)
    records.append(writer.finish())
    left -= size
    index += 1
  header = {"tokenizer": tokenizer, "dtype": dtype.str, "text_field": "text",
            "sources": [{"path": "synthetic", "bytes": 0}]}
  return shards.write_manifest(out, header, records)


def _status_mib() -> dict:
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def measure_reading(directory: str, tokenizer: str, seq_len: int, batch: int, n_batches: int,
                    val_fraction: float) -> dict:
  """Start time, RSS and read throughput of training on `directory` (run in a fresh
  process: `--child`)."""
  cfg = ml_collections.ConfigDict(dict(source=directory, tokenizer=tokenizer, max_bytes=0,
                                       val_fraction=val_fraction))
  before = _status_mib()
  t0 = time.perf_counter()
  data = dataset.build(cfg, seq_len, batch, seed=0, n_eval_batches=8)
  next(data.train)
  start = time.perf_counter() - t0
  at_start = _status_mib()
  rates = []
  for _ in range(2):  # the first pass also checksums every block it touches first
    t0 = time.perf_counter()
    for _ in range(n_batches):
      next(data.train)
    rates.append(round(n_batches * batch * seq_len / (time.perf_counter() - t0)))
  after = _status_mib()
  corpus = data.train.parts[0].corpus
  checked = corpus._checked  # pylint: disable=protected-access
  reference = memmap_copy_tokens_per_s(corpus, seq_len + 1, batch, n_batches)
  return {"start_s": round(start, 3),
          "rss_anon_mib_at_start": round(at_start["RssAnon"] - before["RssAnon"], 1),
          "rss_anon_mib": round(after["RssAnon"] - before["RssAnon"], 1),
          "rss_file_mib": round(after["RssFile"] - before["RssFile"], 1),
          "first_read_tokens_per_s": rates[0], "read_tokens_per_s": rates[1],
          "memmap_copy_tokens_per_s": reference,
          "read_vs_memmap_copy": round(rates[1] / reference, 3),
          "blocks_checked": round(float(np.mean(np.concatenate(checked))), 3),
          "windows": len(data.train.parts[0])}


def memmap_copy_tokens_per_s(corpus: shards.Corpus, length: int, batch: int,
                             n_batches: int, seed: int = 1) -> int:
  """The floor of reading, as a reference: rows of `length` tokens at random places of the
  shards, copied out of `np.memmap`s and widened to int32 (no shuffle, blend or checks);
  the second of two passes over the same rows (a warm page cache, as the reader's)."""
  maps = [np.memmap(os.path.join(corpus.directory, s["name"] + ".bin"), corpus.dtype, "r")
          for s in corpus.shards]
  rng = np.random.default_rng(seed)
  which = rng.integers(0, len(maps), (n_batches, batch))
  starts = rng.integers(0, [len(maps[s]) - length for s in which.ravel()]).reshape(which.shape)
  for _ in range(2):
    t0 = time.perf_counter()
    for shard_ids, begin in zip(which.tolist(), starts.tolist()):
      rows = np.empty((batch, length), corpus.dtype)
      for i, (s, a) in enumerate(zip(shard_ids, begin)):
        rows[i] = maps[s][a:a + length]
      rows.astype(np.int32)
    rate = n_batches * batch * (length - 1) / (time.perf_counter() - t0)
  return round(rate)


def _child(args: list[str]) -> dict:
  out = subprocess.run([sys.executable, "-m", "benchmarks.data", "--child", *args], cwd=ROOT,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def stdlib_jsonl(path: str, max_bytes: int) -> int:
  root = sysconfig.get_paths()["stdlib"]
  total = 0
  with open(path, "w", encoding="utf-8") as f:
    for name in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
      with open(name, "rb") as src:
        text = src.read().decode("utf-8", errors="replace")
      f.write(json.dumps({"text": text}) + "\n")
      total += len(text.encode("utf-8"))
      if total >= max_bytes:
        break
  return total


def measure_encode_only(jsonl: str, tokenizer: str, max_mb: float = 16) -> dict:
  """Tokens per second of each library alone on (the first `max_mb` of) the text, one
  core, one call."""
  texts, size = [], 0
  with open(jsonl, encoding="utf-8") as f:
    for line in f:
      texts.append(json.loads(line)["text"])
      size += len(texts[-1])
      if size >= max_mb * 2**20:
        break
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  out = {}
  twin, why_not = tiktoken_bpe.twin(tokenizer)
  encoders = {"tokenizers": load_tokenizer(tokenizer, "tokenizers").encode_batch,
              "tiktoken": twin and (lambda ts: [twin(t) for t in ts])}
  for encoder, encode in encoders.items():
    if encode is None:
      out[encoder] = why_not
      continue
    t0 = time.process_time()
    n = sum(len(x) for x in encode(texts))
    out[encoder] = round(n / (time.process_time() - t0))
  return out


def measure_prepare(jsonl: str, tokenizer: str, out: str, workers: int, shard_bytes: int,
                    encoder: str) -> dict:
  load = os.getloadavg()[0]
  cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "esjax.data.prepare", f"--source={jsonl}",
                  f"--tokenizer={tokenizer}", f"--out={out}", f"--workers={workers}",
                  f"--shard_bytes={shard_bytes}", f"--encoder={encoder}"], cwd=ROOT,
                 check=True, capture_output=True)
  wall = time.perf_counter() - t0
  cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # workers included
  manifest = shards.read_json(os.path.join(out, shards.MANIFEST))
  tokens = manifest["tokens"]
  used = sorted({r["encoder"] for r in manifest["shards"]})
  shutil.rmtree(out)
  return {"encoder": encoder, "encoded_by": ",".join(used), "workers": workers,
          "tokens": tokens, "wall_s": round(wall, 2),
          "tokens_per_s": round(tokens / wall), "cpu_s": round(cpu, 2),
          "tokens_per_cpu_s": round(tokens / cpu), "load_avg_1min_before": round(load, 2)}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="100M,1B", help="synthetic corpus sizes, tokens")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--read_batches", type=int, default=200)
  p.add_argument("--doc_tokens", type=int, default=1000, help="mean document length")
  p.add_argument("--prepare_mb", type=float, default=64, help="text for the prepare runs")
  p.add_argument("--workers", default="1,2")
  p.add_argument("--encoders", default="tokenizers,auto", help="prepare's --encoder values")
  p.add_argument("--vocab", type=int, default=32_000, help="BPE vocabulary size")
  p.add_argument("--dir", default="", help="scratch directory (default: a temporary one)")
  p.add_argument("--val_fraction", type=float, default=0.02, help="as data.val_fraction "
                 "(the base config's default)")
  p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    directory, tokenizer, seq_len, batch, n, val_fraction = a.child
    print(json.dumps(measure_reading(directory, tokenizer, int(seq_len), int(batch), int(n),
                                     float(val_fraction))))
    return

  scratch = a.dir or tempfile.mkdtemp(prefix="esjax_bench_data_")
  os.makedirs(scratch, exist_ok=True)
  try:
    jsonl = os.path.join(scratch, "stdlib.jsonl")
    text_bytes = stdlib_jsonl(jsonl, int(a.prepare_mb * 2**20))
    tok_path = os.path.join(scratch, "bpe.json")
    with open(jsonl, encoding="utf-8") as f:
      sample = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    train_tokenizer(tok_path, sample, a.vocab)
    tok = load_tokenizer(tok_path)
    identity = {"spec": tok_path, "fingerprint": fingerprint(tok_path),
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    summary: dict = {"summary": "data", "read": {}, "prepare": {},
                     "encode_only_tokens_per_s": measure_encode_only(jsonl, tok_path)}
    print(json.dumps({"encode_only_tokens_per_s": summary["encode_only_tokens_per_s"]}),
          flush=True)
    for size in a.sizes.split(","):
      n_tokens = _count(size)
      corpus = os.path.join(scratch, f"corpus_{size}")
      t0 = time.perf_counter()
      m = synthetic_corpus(corpus, n_tokens, identity, a.doc_tokens)
      made = time.perf_counter() - t0
      disk = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus))
      row = {"corpus_tokens": m["tokens"], "documents": m["documents"],
             "shards": len(m["shards"]), "disk_mib": round(disk / 2**20, 1),
             "generate_s": round(made, 1), "seq_len": a.seq_len, "batch": a.batch,
             **_child([corpus, tok_path, str(a.seq_len), str(a.batch), str(a.read_batches),
                       str(a.val_fraction)])}
      shutil.rmtree(corpus)  # The big one is 2 GB.
      print(json.dumps(row), flush=True)
      summary["read"][size] = row
    shard_bytes = max(1 << 16, int(text_bytes / 16))  # 16 shards: work for every worker
    for encoder in a.encoders.split(","):
      for w in [int(x) for x in a.workers.split(",")]:
        row = {"text_mib": round(text_bytes / 2**20, 1), "shard_bytes": shard_bytes,
               **measure_prepare(jsonl, tok_path, os.path.join(scratch, f"prep{w}"), w,
                                 shard_bytes, encoder)}
        print(json.dumps(row), flush=True)
        summary["prepare"][f"{encoder}/{w}"] = row
    print(json.dumps(summary))
  finally:
    if not a.dir:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  main()
