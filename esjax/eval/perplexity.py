"""Perplexity and bits per byte, of whole documents or of the training side's held-out windows.

Documents (`text_perplexity`) are scored as lm-evaluation-harness scores its perplexity tasks:
every token once (rolling windows), after a prefix token (the tokenizer's BOS if it has one,
else its end-of-text id), and reported as

  word_perplexity = exp(-LL / words)   byte_perplexity = exp(-LL / bytes)
  bits_per_byte   = -LL / (bytes * ln 2)   token_perplexity = exp(-LL / tokens)

with LL the summed natural-log likelihood, bytes the UTF-8 bytes of the text and words the
pieces of `re.split(r"\\s+", text)`.

Windows (`window_perplexity`) are the training data's validation batches (`inputs`, `targets`,
optional `mask`): token perplexity is exp(mean cross-entropy), the same number as the training
loop's `val_loss`; bits per byte divides the summed loss by the bytes the target tokens stand
for (exact for the byte tokenizer: one byte per token, none for end-of-document ids; decoded
text length for other tokenizers).
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np

from esjax.configs import common
from esjax.data import dataset
from esjax.data.tokenizer import ByteTokenizer
from esjax.eval.scoring import rolling_loglikelihoods, score_rows
from esjax.models.transformer import Transformer



def _exp(nll: float) -> float:
  """exp(nll), inf where a float overflows (one long word of a bad model: the other metrics
  of the report stay finite and the evaluation goes on)."""
  return math.exp(nll) if nll < 709.0 else float("inf")

def prefix_id(tokenizer) -> int:
  bos = getattr(tokenizer, "bos_id", None)
  return int(bos) if bos is not None else int(tokenizer.eos_id)


def count_words(text: str) -> int:
  return len(re.split(r"\s+", text))


def text_perplexity(model: Transformer, tokenizer, texts: Sequence[str], *,
                    batch_size: int = 8, max_len: int | None = None,
                    stride: int | None = None) -> dict[str, float]:
  """Word / byte / token perplexity and bits per byte of whole documents (see module doc)."""
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("text_perplexity: no non-empty texts to score")
  docs = [tokenizer.encode(t) for t in texts]
  lls = rolling_loglikelihoods(model, docs, prefix_id(tokenizer), batch_size=batch_size,
                               max_len=max_len, stride=stride)
  ll = float(np.sum(lls))
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  n_words = sum(count_words(t) for t in texts)
  n_tokens = sum(len(d) for d in docs)
  return {
      "word_perplexity": _exp(-ll / n_words),
      "byte_perplexity": _exp(-ll / n_bytes),
      "bits_per_byte": -ll / (n_bytes * math.log(2)),
      "token_perplexity": _exp(-ll / n_tokens),
      "loglikelihood": ll,
      "n_docs": len(texts), "n_tokens": n_tokens, "n_bytes": n_bytes, "n_words": n_words,
  }


def target_bytes(tokenizer, targets: np.ndarray, mask: np.ndarray) -> int:
  """UTF-8 bytes the masked target tokens stand for."""
  if isinstance(tokenizer, ByteTokenizer):
    return int(np.sum((targets != tokenizer.eos_id) & (mask > 0)))
  return sum(len(tokenizer.decode(row[m > 0]).encode("utf-8")) for row, m in zip(targets, mask))


def window_perplexity(model: Transformer, batches: Iterable[dict[str, np.ndarray]],
                      tokenizer=None) -> dict[str, float]:
  """Cross-entropy, token perplexity and (given the tokenizer) bits per byte of batches."""
  nll = n_tokens = n_bytes = 0.0
  for batch in batches:
    targets = np.asarray(batch["targets"])
    mask = np.asarray(batch.get("mask", np.ones(targets.shape)), np.float32)
    ll, _ = score_rows(model, batch["inputs"], targets, mask)
    nll -= float(ll.sum())
    n_tokens += float(mask.sum())
    if tokenizer is not None:
      n_bytes += target_bytes(tokenizer, targets, mask)
  if not n_tokens:
    raise ValueError("window_perplexity: the batches hold no target tokens")
  out = {"loss": nll / n_tokens, "token_perplexity": _exp(nll / n_tokens),
         "n_tokens": int(n_tokens)}
  if tokenizer is not None and n_bytes:
    out.update(bits_per_byte=nll / (n_bytes * math.log(2)), n_bytes=int(n_bytes))
  return out


def val_perplexity(model, config) -> dict:
  """Perplexity and bits per byte of the run's validation windows: the same
  `train.eval_batches` batches that training's `val_loss` scores."""
  if config is None:
    raise ValueError("--tasks=val needs the run's data config: pass --config or a checkpoint "
                     "inside a workdir that holds config.json")
  tc = config.train
  data = dataset.build(config.data, tc.seq_len, tc.batch_size, tc.seed,
                       tc.get("eval_batches", common.base_config().train.eval_batches))
  return {"kind": "perplexity", **window_perplexity(model, data.val, data.tokenizer)}
