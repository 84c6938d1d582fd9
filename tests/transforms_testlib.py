"""Helpers shared by the transform tests: generic random models and a logit comparison."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esjax.models import ModelConfig, Transformer
from esjax.transforms import build

SRC = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                  qkv_bias=True, init_std=0.2, max_seq_len=64)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """Transformer(cfg) with generic norm scales and biases (not the ones/zeros of init)."""
  model = Transformer(cfg, nnx.Rngs(seed))
  params = build.params_of(model)
  key = jax.random.key(seed + 1000)

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    k = jax.random.fold_in(key, hash(name) % (2 ** 31))
    if "scale" in name:
      return jax.random.uniform(k, x.shape, x.dtype, 0.5, 1.5)
    if any(b in name for b in ("'bq'", "'bk'", "'bv'")):
      return 0.3 * jax.random.normal(k, x.shape, x.dtype)
    return x

  params = jax.tree_util.tree_map_with_path(perturb, params)
  return with_params(model, params)


def with_params(model: Transformer, params) -> Transformer:
  graphdef, state = nnx.split(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 12, seed: int = 7) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size, jnp.int32)


def logits(model: Transformer, toks: jax.Array) -> np.ndarray:
  return np.asarray(model(toks)[0], np.float64)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| relative to the logit scale max |b|."""
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
