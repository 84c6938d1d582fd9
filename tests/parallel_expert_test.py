"""The ragged EP exchange (GPU/TPU) against the padded one, and its lowering for CUDA.

XLA:CPU has no `ragged_all_to_all`, so on the CPU the collective is replaced by an
emulation written from its documented contract (operand rows [input_offsets[j],
+send_sizes[j]) go to rank j, at output_offsets[j] of j's output); the offsets and sizes the
dispatcher computes must then give the padded exchange's loss and gradients. The real
collective is lowered for CUDA with `jax.export`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.parallel import expert, mesh as mesh_lib, step as step_lib

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  n_experts=8, top_k=2, init_std=0.1, router_init_std=0.5,
                  aux_loss_coef=0.01)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  del recv_sizes  # implied by the senders' sizes
  me = lax.axis_index(axis_name)
  sources = lax.all_gather(operand, axis_name)
  starts, counts, dests = (lax.all_gather(a, axis_name)[:, me]
                           for a in (input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(operand.shape[0])
  for i in range(sources.shape[0]):
    sent = (rows >= starts[i]) & (rows < starts[i] + counts[i])
    target = jnp.where(sent, dests[i] + rows - starts[i], output.shape[0])
    output = output.at[target].set(sources[i], mode="drop")
  return output


def _use_dispatch(monkeypatch, impl):
  monkeypatch.setattr(expert, "moe_forward_fn",
                      lambda fm: functools.partial(expert.moe_forward, fm, dispatch_impl=impl))


def _step(fm, cfg):
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  tx = optax.sgd(0.1)
  psh = step_lib.param_shardings(params, fm, cfg)
  params = jax.device_put(params, psh)
  opt_state, osh = step_lib.init_opt_state(tx, params, fm, psh)
  step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, with_grads=True), fm,
                                 psh, osh, cfg)
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
  batch = jax.device_put({"inputs": tok[:, :-1], "targets": tok[:, 1:]},
                         step_lib.batch_sharding(fm))
  return step, (params, opt_state, batch)


@pytest.mark.parametrize("layout,overrides", [
    (dict(dp=8, ep=8), {}),
    (dict(dp=2, tp=2, cp=2, ep=4, etp=1), dict(capacity_factor=1.0)),
], ids=["ep8-dropless", "ep4-over-tp-cp-drop"])
def test_ragged_exchange_equals_padded(monkeypatch, layout, overrides):
  cfg = CFG.replace(**overrides)
  fm = mesh_lib.make_mesh(mesh_lib.Layout(**layout))
  results = {}
  for impl in ("padded", "ragged"):
    _use_dispatch(monkeypatch, impl)
    if impl == "ragged":
      monkeypatch.setattr(expert, "ragged_all_to_all", emulated_ragged_all_to_all)
    step, args = _step(fm, cfg)
    results[impl] = jax.device_get(step(*args)[2])
  want, got = results["padded"], results["ragged"]
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got["grads"]), jax.tree.leaves(want["grads"])):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_ragged_exchange_lowers_for_cuda(monkeypatch):
  _use_dispatch(monkeypatch, "ragged")
  fm = mesh_lib.make_mesh(mesh_lib.Layout(dp=8, ep=8))
  graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0)), nnx.Param)
  params = jax.device_put(params, step_lib.param_shardings(params, fm, CFG))
  grads = lambda p, b: step_lib.loss_and_grads(graphdef, p, b)[2]  # noqa: E731
  tok = jnp.zeros((8, 16), jnp.int32)
  batch = jax.device_put({"inputs": tok, "targets": tok}, step_lib.batch_sharding(fm))
  with mesh_lib.activate(fm, CFG):
    exported = jax.export.export(
        jax.jit(grads), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(
            params, batch)
  # Per MoE layer: rows, ids and results forward, and the transposes of rows and results.
  n = exported.mlir_module().count("stablehlo.custom_call @ragged_all_to_all")
  assert n == CFG.n_layers * 5, n
