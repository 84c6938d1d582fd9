"""KV-cache decoding and generation: the cache reproduces the full forward, batched prompts of
different lengths decode as they would alone, sampling filters match a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from esjax.data.tokenizer import ByteTokenizer
from esjax.eval import generation
from esjax.eval.sampling import Sampling, filter_logits, sample
from esjax.models import Transformer
from esjax.models.cache import init_cache
from esjax.models.presets import get_preset

# MoE generation in the default run: the interop tests' greedy generation against transformers.
PRESETS = ["tiny-llama", pytest.param("tiny-mixtral", marks=pytest.mark.slow),
           pytest.param("tiny-qwen2-moe", marks=pytest.mark.slow)]
PROMPTS = [[5, 9, 100, 3, 77, 12, 40], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
           [200, 201]]


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
  return Transformer(get_preset(request.param), nnx.Rngs(0))


@nnx.jit
def forward(model, tokens):
  return model(tokens)[0]


def greedy_without_cache(model, prompt, n, width=32):
  """Reference: re-run the whole sequence through `model(tokens)` (no cache) for every new
  token. The sequence is right-padded to a fixed width so one compilation serves all steps;
  causal attention keeps the padding out of the logits read at position len - 1."""
  seq = list(prompt)
  for _ in range(n):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(seq)] = seq
    seq.append(int(jnp.argmax(forward(model, jnp.asarray(tokens))[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_cached_logits_equal_full_forward_with_padding(model):
  """Left-padded rows (position -1) prefilled in two chunks, then decoded one token at a
  time, give each row the logits of its own unpadded full forward."""
  cfg = model.cfg
  rows = [list(range(30, 42)), list(range(60, 65))]  # 12 and 5 tokens
  width = 12
  tokens = np.zeros((2, width), np.int32)
  positions = np.full((2, width), -1, np.int32)
  for i, r in enumerate(rows):
    tokens[i, width - len(r):] = r
    positions[i, width - len(r):] = np.arange(len(r))
  cache = init_cache(cfg, 2, 32)
  step = nnx.jit(lambda m, t, p, c: m(t, p, cache=c))
  got = [[] for _ in rows]
  for c in (slice(0, 8), slice(8, 12)):
    logits, _, cache = step(model, jnp.asarray(tokens[:, c]), jnp.asarray(positions[:, c]), cache)
    for i, r in enumerate(rows):
      keep = positions[i, c] >= 0
      got[i] += list(np.asarray(logits[i])[keep])
  extra = np.asarray([[3, 4, 5], [6, 7, 8]], np.int32)
  for t in range(3):
    pos = np.asarray([[len(r) + t] for r in rows], np.int32)
    logits, _, cache = step(model, jnp.asarray(extra[:, t:t + 1]), jnp.asarray(pos), cache)
    for i in range(2):
      got[i].append(np.asarray(logits[i, 0]))
  assert int(cache[0].index) == width + 3
  for i, r in enumerate(rows):
    full = forward(model, jnp.asarray([r + list(extra[i])], jnp.int32))
    np.testing.assert_allclose(np.stack(got[i]), np.asarray(full[0]), rtol=1e-5, atol=2e-5)


def test_batched_cached_generation_equals_uncached(model):
  """Greedy: one batch of 4 prompts (1 to 14 tokens, prefilled in chunks of 4) decodes token
  for token what each prompt decodes alone without a cache."""
  n = 10
  got = generation.generate(model, PROMPTS, max_new_tokens=n, prefill_chunk=4)
  for prompt, out in zip(PROMPTS, got):
    assert out == greedy_without_cache(model, prompt, n)


def test_left_and_right_padded_batches():
  model = Transformer(get_preset("tiny-llama"), nnx.Rngs(1))
  width = max(map(len, PROMPTS))
  left = np.zeros((len(PROMPTS), width), np.int32)
  right = np.zeros_like(left)
  lmask, rmask = np.zeros_like(left), np.zeros_like(left)
  for i, p in enumerate(PROMPTS):
    left[i, width - len(p):], lmask[i, width - len(p):] = p, 1
    right[i, :len(p)], rmask[i, :len(p)] = p, 1
  assert generation.unpad(left, lmask) == generation.unpad(right, rmask) == PROMPTS
  want = [greedy_without_cache(model, p, 6) for p in PROMPTS]
  for toks, mask in ((left, lmask), (right, rmask)):
    assert generation.generate(model, generation.unpad(toks, mask), max_new_tokens=6) == want


def test_eos_and_stop_strings():
  model = Transformer(get_preset("tiny-llama"), nnx.Rngs(2))
  tok = ByteTokenizer()
  prompt = "def f(x):"
  free = generation.generate(model, [list(tok.encode(prompt))], max_new_tokens=12)[0]
  # eos: output ends before the first occurrence of the eos id
  eos = free[4]
  got = generation.generate(model, [list(tok.encode(prompt))], max_new_tokens=12, eos_id=eos)[0]
  assert got == free[:free.index(eos)]
  # stop string: decoding halts once it appears, and the text is cut before it
  full_text = tok.decode(free)
  stop = tok.decode(free[6:8])
  assert stop and stop in full_text
  got = generation.generate(model, [list(tok.encode(prompt))], max_new_tokens=12, stop=[stop],
                            tokenizer=tok)[0]
  assert stop in tok.decode(got) and len(got) <= 8 and got == free[:len(got)]
  text = generation.generate_text(model, tok, [prompt], max_new_tokens=12, stop=[stop])[0]
  assert text == full_text[:full_text.index(stop)]


@pytest.mark.slow
def test_generate_text_batches_keep_order():
  model = Transformer(get_preset("tiny-mixtral"), nnx.Rngs(3))
  tok = ByteTokenizer()
  prompts = ["a", "longer prompt here", "mid one"]
  batched = generation.generate_text(model, tok, prompts, max_new_tokens=5, batch_size=2)
  alone = [generation.generate_text(model, tok, [p], max_new_tokens=5, batch_size=1)[0]
           for p in prompts]
  assert batched == alone


def test_prompt_truncated_to_max_len():
  model = Transformer(get_preset("tiny-llama"), nnx.Rngs(4))
  long = list(range(1, 41))
  got = generation.generate(model, [long], max_new_tokens=4, max_len=20)
  assert got[0] == greedy_without_cache(model, long[-16:], 4)
  with pytest.raises(ValueError, match="max_new_tokens=20 leaves no room"):
    generation.generate(model, [long], max_new_tokens=20, max_len=20)
  with pytest.raises(ValueError, match="at least one token"):
    generation.generate(model, [[1], []], max_new_tokens=2)


def _numpy_filter(logits, temperature, top_k, top_p):
  """Reference filter, one row at a time in float64."""
  out = np.full_like(logits, -np.inf, dtype=np.float64)
  for b, row in enumerate(logits.astype(np.float64) / temperature):
    order = np.argsort(-row, kind="stable")
    keep = set(order[:top_k] if top_k else order)
    p = np.exp(row[order] - row[order].max())
    p /= p.sum()
    mass = 0.0
    nucleus = set()
    for j, idx in enumerate(order):
      if mass >= top_p:
        break
      nucleus.add(idx)
      mass += p[j]
    if top_k:  # top-p runs on the top-k renormalised distribution
      kept = order[:top_k]
      q = np.exp(row[kept] - row[kept].max())
      q /= q.sum()
      nucleus, mass = set(), 0.0
      for j, idx in enumerate(kept):
        if mass >= top_p:
          break
        nucleus.add(idx)
        mass += q[j]
    for idx in keep & nucleus:
      out[b, idx] = row[idx]
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.5), (0.7, 0, 0.9),
                                                     (1.0, 5, 1.0), (1.3, 6, 0.6)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(0), (4, 20)) * 2.0)
  got = np.asarray(filter_logits(jnp.asarray(logits), Sampling(temperature, top_p, top_k)))
  want = _numpy_filter(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_sampling_distribution_and_degenerate_cases():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  n = 20000
  draws = sample(jnp.repeat(logits, n, 0), jax.random.key(0), Sampling(temperature=1.0))
  freq = np.bincount(np.asarray(draws), minlength=4) / n
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
  # top_p=0.7 keeps {0.5, 0.3}: renormalised to 0.625 / 0.375
  draws = sample(jnp.repeat(logits, n, 0), jax.random.key(1), Sampling(1.0, top_p=0.7))
  freq = np.bincount(np.asarray(draws), minlength=4) / n
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
  rows = jax.random.normal(jax.random.key(2), (8, 50))
  greedy = np.asarray(jnp.argmax(rows, -1))
  assert (np.asarray(sample(rows, jax.random.key(3), Sampling(1.0, top_k=1))) == greedy).all()
  assert (np.asarray(sample(rows, jax.random.key(3), Sampling(0.0))) == greedy).all()
  with pytest.raises(ValueError, match="top_p=0"):
    Sampling(1.0, top_p=0.0)


def test_sampled_generation_is_seeded():
  model = Transformer(get_preset("tiny-mixtral"), nnx.Rngs(5))
  how = Sampling(temperature=1.0, top_p=0.9)
  a = generation.generate(model, PROMPTS, max_new_tokens=6, sampling=how, seed=1)
  b = generation.generate(model, PROMPTS, max_new_tokens=6, sampling=how, seed=1)
  c = generation.generate(model, PROMPTS, max_new_tokens=6, sampling=how, seed=2)
  assert a == b and a != c
