"""Log-likelihood of continuations given contexts, and rolling log-likelihood of documents.

The model sees `(context + continuation)[-(max_len + 1):][:-1]` and the summed log-probability
of the continuation's tokens is read off one full-sequence forward, as lm-evaluation-harness
does for its `loglikelihood` and `loglikelihood_rolling` requests. Requests run longest first
in fixed-size, right-padded batches whose length is a power of two, so the scoring function
compiles once per length bucket.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esjax.eval.generation import length_bucket
from esjax.models.transformer import Transformer

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, inputs, targets, mask):
  """Per row: summed log p(target) over mask, and whether every masked target is the argmax."""
  model = nnx.merge(graphdef, state)
  logits, _ = model(inputs)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
  return jnp.sum(tok * mask, axis=-1), jnp.all(greedy, axis=-1)


def score_rows(model: Transformer, inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
  """Summed masked log-likelihood [B] (float64) and all-greedy flags [B] of padded rows."""
  graphdef, state = nnx.split(model)
  ll, greedy = _score(graphdef, state, jnp.asarray(inputs, jnp.int32),
                      jnp.asarray(targets, jnp.int32), jnp.asarray(mask, jnp.float32))
  return np.asarray(ll, np.float64), np.asarray(greedy)


def loglikelihoods(model: Transformer, requests: Sequence[Request], *, batch_size: int = 8,
                   max_len: int | None = None) -> list[tuple[float, bool]]:
  """(log p(continuation | context), continuation is the greedy decode) per request.

  The context is cut from the left so that context + continuation fits `max_len` inputs
  (default `model.cfg.max_seq_len`). Every continuation needs at least one token, and the
  context too (use the end-of-text id for an empty context).
  """
  max_len = max_len or model.cfg.max_seq_len
  seqs, n_cont = [], []
  for i, (ctx, cont) in enumerate(requests):
    ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
    if not ctx or not cont:
      raise ValueError(f"request {i}: context ({len(ctx)} tokens) and continuation "
                       f"({len(cont)} tokens) must both be non-empty")
    if len(cont) > max_len:
      raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds "
                       f"max_len={max_len}")
    seqs.append((ctx + cont)[-(max_len + 1):])
    n_cont.append(len(cont))
  results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = min(length_bucket(len(seqs[rows[0]]) - 1), max_len)
    inputs = np.zeros((batch_size, width), np.int32)
    targets = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), np.float32)
    for r, i in enumerate(rows):
      s = seqs[i]
      n = len(s) - 1
      inputs[r, :n], targets[r, :n] = s[:-1], s[1:]
      mask[r, n - n_cont[i]:n] = 1.0
    ll, greedy = score_rows(model, inputs, targets, mask)
    for r, i in enumerate(rows):
      results[i] = (float(ll[r]), bool(greedy[r]))
  return results


def rolling_requests(tokens: Sequence[int], prefix_id: int, max_len: int,
                     stride: int | None = None) -> list[Request]:
  """Requests that together score every token of a document exactly once.

  The document is `[prefix_id] + tokens`; window j predicts `stride` tokens (default
  `max_len`, disjoint windows as lm-evaluation-harness's rolling log-likelihood) from up to
  `max_len` tokens of context. A smaller stride gives each prediction more context.
  """
  stride = stride or max_len
  if not 1 <= stride <= max_len:
    raise ValueError(f"stride={stride} must be in [1, max_len={max_len}]")
  seq = [int(prefix_id)] + [int(t) for t in tokens]
  out = []
  for a in range(1, len(seq), stride):
    b = min(a + stride, len(seq))
    out.append((seq[max(0, b - 1 - max_len):a], seq[a:b]))
  return out


def rolling_loglikelihoods(model: Transformer, docs: Iterable[Sequence[int]], prefix_id: int, *,
                           batch_size: int = 8, max_len: int | None = None,
                           stride: int | None = None) -> list[float]:
  """Summed log-likelihood of every token of each document (see `rolling_requests`)."""
  max_len = max_len or model.cfg.max_seq_len
  reqs, owner = [], []
  n_docs = 0
  for d, doc in enumerate(docs):
    r = rolling_requests(doc, prefix_id, max_len, stride)
    reqs += r
    owner += [d] * len(r)
    n_docs += 1
  totals = np.zeros(n_docs, np.float64)
  for d, (ll, _) in zip(owner, loglikelihoods(model, reqs, batch_size=batch_size,
                                              max_len=max_len)):
    totals[d] += ll
  return totals.tolist()
