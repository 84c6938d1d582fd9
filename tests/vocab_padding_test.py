"""A vocabulary that tp does not divide is padded as Megatron pads it (to a multiple of
lcm(128, tp)), the padded logits are masked out, and Hugging Face folders never see the
padding. The reference is the unpadded model with the same weights, on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import parallel_expert_test

from esjax.configs import common, presets
from esjax.interop import hf_params
from esjax.models.config import ModelConfig
from esjax.models.loss import lm_loss
from esjax.models.transformer import Transformer
from esjax.parallel import stages
from esjax.sharding.layout import Layout, LayoutError, check_model

VOCAB = 251  # prime: no tp > 1 divides it
CFG = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  init_std=0.1)


def _params(cfg):
  return nnx.to_pure_dict(nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)[1])


def _unpadded(params):
  """The same weights for the unpadded model: the first VOCAB embedding rows and head
  columns."""
  out = jax.tree.map(lambda x: x, params)
  out["embed"] = params["embed"][:VOCAB]
  out["lm_head"] = params["lm_head"][:, :VOCAB]
  return out


def test_a_preset_tp_does_not_divide_is_padded_and_plans_its_layout():
  c = presets.get_config("aquila-dense-7b")
  cfg = common.model_config(c)
  assert (cfg.vocab_size, cfg.vocab_multiple) == (151851, 128)
  assert cfg.padded_vocab == 151936 and cfg.padded_vocab % c.parallel.tp == 0
  layout = Layout.from_config(c.parallel).resolve(presets.CLUSTERS["aquila-dense-7b"][0])
  check_model(layout, cfg, seq_len=c.train.seq_len, batch=c.train.batch_size)
  c.model.vocab_multiple = 1  # set explicitly: the user's value stands, and is refused
  with pytest.raises(LayoutError, match="vocab_size=151851 padded to 151851"):
    check_model(layout, common.model_config(c))


def test_padded_logits_are_masked_and_the_loss_is_the_unpadded_models():
  padded = CFG.replace(vocab_multiple=128)
  params = _params(padded)
  assert params["embed"].shape == (256, 32) and params["lm_head"].shape == (32, 256)
  rng = np.random.default_rng(0)
  tok = jnp.asarray(rng.integers(0, VOCAB, (2, 9)), jnp.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}
  model = nnx.merge(nnx.graphdef(Transformer(padded, nnx.Rngs(0))), params)
  ref = nnx.merge(nnx.graphdef(Transformer(CFG, nnx.Rngs(0))), _unpadded(params))
  logits, _ = model(batch["inputs"])
  want, _ = ref(batch["inputs"])
  np.testing.assert_allclose(logits[..., :VOCAB], want, rtol=1e-6)
  assert np.all(np.asarray(logits[..., VOCAB:]) == np.finfo(np.float32).min)
  np.testing.assert_allclose(lm_loss(model, batch)[0], lm_loss(ref, batch)[0], rtol=1e-6)


def test_tp2_step_on_a_padded_vocabulary_equals_the_unpadded_model():
  """tp=2 x dp=4: the train step's loss and gradients equal those of the unpadded model on
  one device; the padding rows and columns get no gradient."""
  c = common.base_config()
  c.parallel.tp, c.parallel.dp = 2, 4
  for k, v in CFG.to_dict().items():
    c.model[k] = v
  c.model.vocab_multiple = None  # let the config pad it
  cfg = common.model_config(c)
  assert cfg.padded_vocab == 256
  loss_got, stacked = parallel_expert_test._grads(dict(dp=4, tp=2), cfg)  # seed 0, (8, 17)
  grads = stages.unstack(stacked, stages.StageFormat.of(cfg))
  tok = np.random.default_rng(0).integers(0, VOCAB, (8, 17)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
  ref = nnx.graphdef(Transformer(CFG, nnx.Rngs(0)))
  loss, want = jax.value_and_grad(lambda p: lm_loss(nnx.merge(ref, p), batch)[0])(
      _unpadded(_params(cfg)))
  np.testing.assert_allclose(loss_got, loss, rtol=1e-5)
  np.testing.assert_allclose(grads["embed"][:VOCAB], want["embed"], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grads["lm_head"][:, :VOCAB], want["lm_head"], rtol=1e-4,
                             atol=1e-7)
  assert not np.any(np.asarray(grads["embed"][VOCAB:]))
  assert not np.any(np.asarray(grads["lm_head"][:, VOCAB:]))


def test_hugging_face_tensors_strip_the_padding_and_import_restores_it():
  padded = CFG.replace(vocab_multiple=128)
  params = _params(padded)
  tensors = hf_params.esjax_to_hf_tensors(padded, params)
  assert tensors["model.embed_tokens.weight"].shape == (VOCAB, 32)
  assert tensors["lm_head.weight"].shape == (VOCAB, 32)
  np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], params["embed"][:VOCAB])
  np.testing.assert_array_equal(tensors["lm_head.weight"], params["lm_head"][:, :VOCAB].T)
  back = hf_params.hf_to_esjax_params(padded, tensors)
  np.testing.assert_array_equal(back["embed"][:VOCAB], params["embed"][:VOCAB])
  np.testing.assert_array_equal(back["lm_head"][:, :VOCAB], params["lm_head"][:, :VOCAB])
  assert not np.any(np.asarray(back["embed"][VOCAB:]))
  assert not np.any(np.asarray(back["lm_head"][:, VOCAB:]))
