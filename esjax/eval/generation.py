"""Batched autoregressive generation with a static-size KV cache, for dense and MoE models.

Prompts of different lengths share one batch: they are left-padded, padding tokens get
position -1 (written to the cache, never attended to) and each row's real tokens keep
positions 0, 1, ..., so every row decodes exactly as it would alone. The prompt is prefilled
in chunks through the same jit-compiled step that then decodes one token at a time; the cache
size is fixed per call, so the step compiles once per (batch, chunk, cache length).

A model with token dropping (`capacity_factor > 0`) routes each call's tokens together, so
its cached decoding is not the same function as its full-sequence forward; dropless MoE is.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from esjax.eval.sampling import Sampling, sample
from esjax.models.cache import init_cache
from esjax.models.transformer import Transformer


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def length_bucket(n: int, lo: int = 16) -> int:
  """The power of two >= max(n, lo): few distinct shapes, so few compilations."""
  return max(lo, 1 << (max(n, 1) - 1).bit_length())


def unpad(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  """Rows of a padded prompt batch [B, S] (left or right padding; mask 1 on real tokens) as
  lists of their real tokens, the form `generate` takes."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  if tokens.shape != mask.shape or tokens.ndim != 2:
    raise ValueError(f"unpad: tokens {tokens.shape} and mask {mask.shape} must both be [B, S]")
  return [[int(t) for t in row[m.astype(bool)]] for row, m in zip(tokens, mask)]


def _decode_step(graphdef, state, cache, tokens, positions, key, sampling: Sampling):
  model = nnx.merge(graphdef, state)
  logits, _, cache = model(tokens, positions, cache=cache)
  return sample(logits[:, -1], key, sampling), cache


@functools.cache
def _jitted_step():
  # Donating the cache lets XLA update it in place; the CPU backend ignores donation (and warns).
  donate = () if jax.default_backend() == "cpu" else ("cache",)
  return jax.jit(_decode_step, static_argnames=("graphdef", "sampling"), donate_argnames=donate)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_id: int | Sequence[int] | None = None,
             stop: Sequence[str] = (), tokenizer=None, seed: int = 0,
             max_len: int | None = None, prefill_chunk: int = 256) -> list[list[int]]:
  """New token ids for each prompt (one batch), up to `max_new_tokens` each.

  A row stops at `eos_id` (an id, or several as transformers' `generation_config` may list;
  not included in its output) or once its decoded text contains one of the `stop` strings
  (the tokens that completed it are included; `generate_text` cuts the text). Prompts longer
  than `max_len - max_new_tokens` (default `model.cfg.max_seq_len`) keep their last tokens,
  as lm-evaluation-harness does.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  prompts = [[int(t) for t in p] for p in prompts]
  eos = {int(eos_id)} if isinstance(eos_id, (int, np.integer)) else set(map(int, eos_id or ()))
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token "
                     f"(got lengths {[len(p) for p in prompts]})")
  if stop and tokenizer is None:
    raise ValueError(f"generate: stop strings {list(stop)} need a tokenizer to decode the text")
  cfg = model.cfg
  max_len = max_len or cfg.max_seq_len
  if max_new_tokens >= max_len:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                     f"max_len={max_len}")
  prompts = [p[-(max_len - max_new_tokens):] for p in prompts]
  lens = np.asarray([len(p) for p in prompts], np.int32)
  b = len(prompts)
  chunk = min(prefill_chunk, length_bucket(int(lens.max())))
  width = round_up(int(lens.max()), chunk)
  tokens = np.zeros((b, width), np.int32)
  positions = np.full((b, width), -1, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    positions[i, width - len(p):] = np.arange(len(p))

  step = _jitted_step()
  graphdef, state = nnx.split(model)
  cache = init_cache(cfg, b, round_up(width + max_new_tokens, 64))
  key = jax.random.key(seed)
  for c in range(0, width, chunk):
    nxt, cache = step(graphdef, state, cache, tokens[:, c:c + chunk], positions[:, c:c + chunk],
                      jax.random.fold_in(key, 0), sampling)

  out: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  for t in range(max_new_tokens):
    ids = np.asarray(nxt)
    for i in np.flatnonzero(~done):
      if int(ids[i]) in eos:
        done[i] = True
        continue
      out[i].append(int(ids[i]))
      if stop and any(s in tokenizer.decode(out[i]) for s in stop):
        done[i] = True
    if done.all() or t == max_new_tokens - 1:
      break
    nxt, cache = step(graphdef, state, cache, ids[:, None], (lens + t)[:, None],
                      jax.random.fold_in(key, t + 1), sampling)
  return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string."""
  cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
  return text[:cut]


def generate_text(model: Transformer, tokenizer, prompts: Sequence[str], *,
                  max_new_tokens: int, sampling: Sampling = Sampling(),
                  stop: Sequence[str] = (), batch_size: int = 8, seed: int = 0,
                  max_len: int | None = None) -> list[str]:
  """Completions of text prompts, cut at the first stop string, in the prompts' order.

  A row stops at any of the tokenizer's `eos_ids`. Prompts run longest first in batches of
  `batch_size` (the last batch is filled up with copies, so every batch has the same shape).
  An empty prompt starts from the end-of-text id.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  ids = [list(tokenizer.encode(p)) or [tokenizer.eos_id] for p in prompts]
  order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
  texts: list[str] = [""] * len(ids)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    batch = [ids[i] for i in rows]
    batch += [batch[-1]] * (batch_size - len(batch))
    new = generate(model, batch, max_new_tokens=max_new_tokens, sampling=sampling,
                   eos_id=tokenizer.eos_ids, stop=stop, tokenizer=tokenizer,
                   seed=seed + start, max_len=max_len)
    for i, toks in zip(rows, new):
      texts[i] = cut_at_stop(tokenizer.decode(toks), stop)
  return texts
