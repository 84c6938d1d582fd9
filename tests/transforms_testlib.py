"""Helpers shared by the transform tests: generic random models and a logit comparison."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esjax.models import ModelConfig, Transformer
from esjax.models import params as params_lib
from esjax.transforms import build

SRC = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                  qkv_bias=True, init_std=0.2, max_seq_len=64)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """Transformer(cfg) with generic weights, norm scales and biases (numpy, fast to build)."""
  rng = np.random.default_rng(seed)
  _, state, _ = params_lib.abstract_model(cfg)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    std = 0.3 if any(b in name for b in ("'bq'", "'bk'", "'bv'")) else cfg.init_std
    return (std * rng.standard_normal(x.shape)).astype(x.dtype)

  return model_from(cfg, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))


def model_from(cfg: ModelConfig, params) -> Transformer:
  return params_lib.model_from_params(cfg, jax.tree.map(jnp.asarray, params))


def with_params(model: Transformer, params) -> Transformer:
  return model_from(model.cfg, params)


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 12, seed: int = 7) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size, jnp.int32)


def forward(model: Transformer, toks: jax.Array):
  """Jitted `model(toks)` on one device (gathering sharded parameters): (logits, aux)."""
  cfg = model.cfg
  params = jax.device_get(build.params_of(model))
  return jax.jit(lambda p, t: params_lib.model_from_params(cfg, p)(t))(params, toks)


def logits(model: Transformer, toks: jax.Array) -> np.ndarray:
  return np.asarray(forward(model, toks)[0], np.float64)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| relative to the logit scale max |b|."""
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
