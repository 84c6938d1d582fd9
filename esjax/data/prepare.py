"""Tokenize a corpus once into memory-mappable token shards (format: esjax/data/shards.py).

    python -m esjax.data.prepare --source='/data/web/*.jsonl' --tokenizer=tokenizer.json \
        --out=/data/web_prepared --workers=8

`--source` takes what `data.source` takes for raw text (files, directories, globs, `stdlib`;
text, JSONL, Parquet, saved Hugging Face datasets: esjax/data/sources.py), `--text_field`
names the JSONL / Parquet / dataset text field. `--encoder=auto` (the default) runs a
`tokenizer.json` on tiktoken where it reproduces the file (esjax/data/tokenizer.py says how
that is checked), `--encoder=tokenizers` always on the `tokenizers` library; each shard
records which. The inputs are cut into shards of about
`--shard_bytes` of input, in order; each worker process tokenizes whole shards (one core
each: the `tokenizers` library's own threads are off) and a progress bar counts input bytes.
Train on the result with `--config.data.source=/data/web_prepared`.

Resumable: `plan.json` records the shards, and a shard counts as done once its record
(`shard_XXXXX.json`) is written after its files. Running the same command again after an
interruption finishes the missing shards and never redoes a finished one; a different
source, tokenizer or text field for the same `--out` is an error. `manifest.json` is
written last.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
import tqdm

from esjax.data import shards as shards_lib, sources
from esjax.data.tokenizer import Tokenizer, fingerprint, load_tokenizer

SHARD_BYTES = 64 << 20
_BATCH_BYTES = 4 << 20  # text handed to the tokenizer per call


def plan(source: str, tokenizer_spec: str, text_field: str = "text", max_bytes: int = 0,
         shard_bytes: int = SHARD_BYTES, encoder: str = "auto") -> dict[str, Any]:
  """What preparing `source` means: the tokenizer's identity, the library that encodes with
  it and the inputs cut into shards (lists of `sources.Piece`), all plain JSON."""
  if shard_bytes <= 0:
    raise ValueError(f"shard_bytes={shard_bytes} must be > 0")
  files = sources.cap_files([os.path.abspath(f) for f in sources.resolve_files(source)],
                            max_bytes)
  tok = load_tokenizer(tokenizer_spec, encoder)
  groups, current, size = [], [], 0
  for piece in sources.pieces(files, shard_bytes):
    current.append(list(piece))
    size += piece.nbytes
    if size >= shard_bytes:
      groups.append(current)
      current, size = [], 0
  if current:
    groups.append(current)
  return {"format": shards_lib.FORMAT,
          "tokenizer": {"spec": tokenizer_spec, "fingerprint": fingerprint(tokenizer_spec),
                        "vocab_size": int(tok.vocab_size), "eos_id": int(tok.eos_id)},
          "encoder": tok.encoder,
          "dtype": shards_lib.token_dtype(tok.vocab_size).str, "text_field": text_field,
          "sources": [{"path": f, "bytes": sources.input_bytes(f)} for f in files],
          "shards": groups}


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str, encoder: str) -> Tokenizer:
  return load_tokenizer(spec, encoder)


def _flush(writer: shards_lib.ShardWriter, tok: Tokenizer, texts: list[str]) -> None:
  ids = [t for t in tok.encode_batch(texts) if len(t)]  # a document without tokens is dropped
  if ids:
    eos = np.full(1, tok.eos_id, np.int32)
    writer.add(np.concatenate([x for t in ids for x in (t, eos)]),
               np.asarray([len(t) + 1 for t in ids], np.int64))


def tokenize_shard(out: str, index: int, pieces: Sequence[Sequence[Any]], tokenizer_spec: str,
                   text_field: str, dtype: str, encoder: str = "tokenizers") -> dict[str, Any]:
  """Tokenizes one shard's pieces into `out` with `encoder` (a library, as
  `Tokenizer.encoder`) and returns its record."""
  tok = _tokenizer(tokenizer_spec, encoder if encoder == "tiktoken" else "tokenizers")
  writer = shards_lib.ShardWriter(out, index, np.dtype(dtype))
  texts, size = [], 0
  for piece in pieces:
    for text in sources.documents(sources.Piece(*piece), text_field):
      texts.append(text)
      size += len(text)
      if size >= _BATCH_BYTES:
        _flush(writer, tok, texts)
        texts, size = [], 0
  _flush(writer, tok, texts)
  return writer.finish(encoder=tok.encoder, inputs=inputs_digest(
      pieces, fingerprint(tokenizer_spec), text_field, dtype, tok.encoder))


def inputs_digest(pieces: Sequence[Sequence[Any]], tokenizer_fingerprint: str,
                  text_field: str, dtype: str, encoder: str) -> str:
  """What a shard is made from, as recorded with it (a finished shard is reused only for
  the same)."""
  what = [list(map(list, pieces)), tokenizer_fingerprint, text_field, dtype, encoder]
  return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _run_task(task: tuple) -> tuple[int, dict[str, Any]]:
  return task[1], tokenize_shard(*task)


def _single_threaded_worker() -> None:
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _comparable(plan_: dict[str, Any], key: str) -> Any:
  """A plan's entry, less the tokenizer's path (the same file elsewhere is the same)."""
  value = plan_.get(key)
  return {k: v for k, v in value.items() if k != "spec"} if key == "tokenizer" else value


def prepare(source: str, tokenizer: str, out: str, workers: int = 1, text_field: str = "text",
            max_bytes: int = 0, shard_bytes: int = SHARD_BYTES, progress: bool = True,
            encoder: str = "auto") -> dict[str, Any]:
  """Prepares `source` into `out` (resuming a partial run there) and returns the manifest.
  `workers` > 1 tokenizes in that many processes, one core each; `encoder` as
  `load_tokenizer`'s."""
  if workers < 1:
    raise ValueError(f"workers={workers} must be >= 1")
  want = plan(source, tokenizer, text_field, max_bytes, shard_bytes, encoder)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file, expected a directory")
  os.makedirs(out, exist_ok=True)
  plan_path = os.path.join(out, "plan.json")
  if os.path.exists(plan_path):
    have = shards_lib.read_json(plan_path)
    for key in ("tokenizer", "text_field", "sources", "shards"):
      if _comparable(have, key) != _comparable(want, key):
        raise ValueError(f"--out={out} holds a prepare of other inputs ({key} differs): "
                         "use another --out, or delete it to start over")
  else:
    shards_lib.write_json(plan_path, want)
  manifest_path = os.path.join(out, shards_lib.MANIFEST)
  if shards_lib.is_prepared(out):
    return shards_lib.read_json(manifest_path)

  groups = want["shards"]
  tok_fp = want["tokenizer"]["fingerprint"]
  records = {i: shards_lib.shard_is_done(out, shards_lib.shard_name(i), inputs_digest(
      g, tok_fp, text_field, want["dtype"], want["encoder"])) for i, g in enumerate(groups)}
  done = {i: r for i, r in records.items() if r is not None}
  tasks = [(out, i, g, tokenizer, text_field, want["dtype"], want["encoder"])
           for i, g in enumerate(groups) if i not in done]
  group_bytes = [sum(p[4] for p in g) for g in groups]
  bar = tqdm.tqdm(total=sum(group_bytes), initial=sum(group_bytes[i] for i in done),
                  unit="B", unit_scale=True, desc="prepare", disable=not progress,
                  dynamic_ncols=True, mininterval=1.0)
  t0, new_tokens = time.perf_counter(), 0

  def finished(i: int, record: dict[str, Any]) -> None:
    nonlocal new_tokens
    done[i] = record
    new_tokens += record["tokens"]
    bar.update(group_bytes[i])
    bar.set_postfix(tokens_per_s=f"{new_tokens / (time.perf_counter() - t0):,.0f}",
                    refresh=False)

  try:
    if workers == 1 or len(tasks) <= 1:
      for task in tasks:
        finished(*_run_task(task))
    else:
      context = multiprocessing.get_context("spawn")
      with context.Pool(min(workers, len(tasks)), initializer=_single_threaded_worker) as pool:
        for i, record in pool.imap_unordered(_run_task, tasks):
          finished(i, record)
  finally:
    bar.close()  # an error's line then starts a line of its own
  header = {k: want[k] for k in ("tokenizer", "dtype", "text_field", "sources")}
  return shards_lib.write_manifest(out, header, [done[i] for i in range(len(groups))])


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m esjax.data.prepare",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--source", required=True, help="files, directories, globs or "
                      "'stdlib', comma-separated (text, JSONL, Parquet, saved HF datasets)")
  parser.add_argument("--tokenizer", default="byte", help="'byte', or a SentencePiece "
                      ".model / tokenizers .json file")
  parser.add_argument("--out", required=True, help="directory of the prepared corpus")
  parser.add_argument("--workers", type=int, default=1, help="tokenizer processes, one core "
                      "each")
  parser.add_argument("--text_field", default="text", help="JSONL / Parquet / dataset field")
  parser.add_argument("--encoder", default="auto", choices=["auto", "tokenizers"],
                      help="what runs a tokenizer.json: tiktoken where it reproduces the file "
                      "(auto), or always the tokenizers library")
  parser.add_argument("--max_bytes", type=int, default=0, help="read at most this much "
                      "input, whole files (0: all)")
  parser.add_argument("--shard_bytes", type=int, default=SHARD_BYTES,
                      help="input bytes per shard")
  args = parser.parse_args(argv)
  for name in ("max_bytes", "shard_bytes", "workers"):  # argparse takes any int
    low = 1 if name != "max_bytes" else 0
    if getattr(args, name) < low:
      sys.exit(f"esjax.data.prepare: error: --{name}={getattr(args, name)}: expected an "
               f"integer >= {low}")
  _single_threaded_worker()  # One worker is one core, also in this process.
  try:
    m = prepare(args.source, args.tokenizer, args.out, args.workers, args.text_field,
                args.max_bytes, args.shard_bytes, encoder=args.encoder)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"esjax.data.prepare: error: {e}")
  except OSError as e:  # --out read-only, a full disk: in a worker or here
    sys.exit(f"esjax.data.prepare: error: {e.filename or args.out}: {e.strerror or e}")
  encoders = sorted({r.get("encoder", "?") for r in m["shards"]})
  print(f"prepared {args.out}: {m['tokens']:,} tokens, {m['documents']:,} documents, "
        f"{len(m['shards'])} shards ({m['dtype']}, encoded by {', '.join(encoders)})")


if __name__ == "__main__":
  main()
