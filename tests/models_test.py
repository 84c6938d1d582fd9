"""Model smoke and shape tests; parameter counts checked against the built modules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from esjax.models import ModelConfig, Transformer, count_params, layers
from esjax.models.presets import PRESETS

TINY = [k for k in PRESETS if k.startswith("tiny")]


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_build_and_count(name):
  cfg = PRESETS[name]
  model = Transformer(cfg, nnx.Rngs(0))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == count_params(cfg)["total"]
  tokens = jnp.zeros((2, 8), jnp.int32)
  logits, aux = model(tokens)
  assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(aux["moe_loss"]))
  if cfg.is_moe:
    assert aux["expert_load"].shape == (len(cfg.moe_layers), cfg.n_experts)
    np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(-1), 1.0, rtol=1e-6)


def test_causal():
  """Changing a later token never changes earlier logits."""
  cfg = PRESETS["tiny-mixtral"]
  model = Transformer(cfg, nnx.Rngs(0))
  a = jax.random.randint(jax.random.key(0), (1, 12), 0, cfg.vocab_size)
  b = a.at[0, 8].set((a[0, 8] + 1) % cfg.vocab_size)
  la, lb = model(a)[0], model(b)[0]
  np.testing.assert_allclose(la[0, :8], lb[0, :8], rtol=1e-5, atol=1e-6)
  assert not np.allclose(la[0, 8:], lb[0, 8:])


def test_active_params_formula():
  """Mixtral-8x7B: 46.7B total, 12.9B active (the published figures)."""
  c = count_params(PRESETS["mixtral-8x7b"])
  assert round(c["total"] / 1e9, 1) == 46.7 and round(c["active"] / 1e9, 1) == 12.9


def test_bad_config_names_value():
  with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
    ModelConfig(n_heads=6, n_kv_heads=4, d_model=48)
  with pytest.raises(ValueError, match="unknown keys"):
    ModelConfig.from_dict({"d_modle": 3})


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_params_are_counted(qk_norm):
  cfg = ModelConfig(n_heads=4, n_kv_heads=2, qk_norm=qk_norm)
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == count_params(cfg)["total"] > count_params(cfg.replace(qk_norm="none"))["total"]


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_sliding_window_attend_equals_numpy_loop(impl):
  """attend with sliding_window: key j is seen by query i iff 0 <= q_pos - k_pos < window,
  against a float64 loop over (batch, query, head); padded slots (k_valid) never seen."""
  from esjax.kernels.attention import ops  # pylint: disable=g-import-not-at-top
  attend = functools.partial(ops.attend, impl=impl, platform="cpu")
  rng = np.random.RandomState(0)
  b, sq, sk, h, kv, hd, window = 2, 5, 9, 4, 2, 8, 3
  q, k, v = (rng.randn(b, s, n, hd).astype(np.float32)
             for s, n in ((sq, h), (sk, kv), (sk, kv)))
  k_pos = np.stack([np.arange(sk), np.r_[-1, -1, np.arange(sk - 2)]])  # row 1: left padding
  q_pos = k_pos[:, -sq:]
  got = np.asarray(attend(*map(jnp.asarray, (q, k, v, q_pos, k_pos)), jnp.asarray(k_pos >= 0),
                          sliding_window=window))
  want = np.zeros_like(got, np.float64)
  for bi in range(b):
    for i in range(sq):
      dist = q_pos[bi, i] - k_pos[bi]
      seen = (k_pos[bi] >= 0) & (dist >= 0) & (dist < window)
      for hi in range(h):
        g = hi // (h // kv)
        s = k[bi, seen, g].astype(np.float64) @ q[bi, i, hi] / np.sqrt(hd)
        p = np.exp(s - s.max())
        want[bi, i, hi] = (p / p.sum()) @ v[bi, seen, g]
  np.testing.assert_allclose(got, want, atol=1e-5)
  full = np.asarray(attend(*map(jnp.asarray, (q, k, v, q_pos, k_pos)), jnp.asarray(k_pos >= 0)))
  assert np.abs(full - got).max() > 1e-2  # the window matters here


@pytest.mark.parametrize("dtype,scale_shape", [("bfloat16", (64,)), ("float32", (4, 16))])
def test_rms_norm_gradients_equal_float64_autodiff_and_keep_x_not_float32_copies(
    dtype, scale_shape):
  """layers.rms_norm (custom VJP) against autodiff of the plain formula in float64: values
  and both gradients; its backward keeps x in x's dtype and 1/rms, nothing of x's size in
  float32."""
  kx, ks, kg = jax.random.split(jax.random.key(0), 3)
  x = (3 * jax.random.normal(kx, (2, 8, 64))).astype(dtype)
  scale = 1 + 0.1 * jax.random.normal(ks, scale_shape)
  x = x.reshape(2, 8, *(-1,) if len(scale_shape) == 1 else scale_shape)
  dy = jax.random.normal(kg, x.shape).astype(dtype)
  y, pull = jax.vjp(lambda x, s: layers.rms_norm(x, s, 1e-6), x, scale)
  dx, ds = pull(dy)

  def plain(x, s):  # x / rms(x) * s over scale's trailing axes
    dims = tuple(range(-s.ndim, 0))
    return x / jnp.sqrt(jnp.mean(x * x, axis=dims, keepdims=True) + 1e-6) * s

  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
    want_y, pull64 = jax.vjp(plain, f64(x), f64(scale))
    want_dx, want_ds = pull64(f64(dy))
    want = [np.asarray(a) for a in (want_y, want_dx, want_ds)]
  tol = 1e-2 if dtype == "bfloat16" else 1e-5  # bf16: the output and dx are rounded to bf16
  for got, ref in zip((y, dx, ds), want):
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol,
                               atol=tol * np.abs(ref).max())
  assert y.dtype == dx.dtype == x.dtype and ds.dtype == scale.dtype
  stored = [a for a in jax.tree.leaves(pull) if hasattr(a, "shape")]
  big = [a for a in stored if a.size >= x.size]
  assert [(a.shape, a.dtype) for a in big] == [(x.shape, x.dtype)], stored
