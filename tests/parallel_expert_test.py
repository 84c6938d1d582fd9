"""The ragged EP exchange (GPU/TPU) against the padded one, and its lowering for CUDA.

XLA:CPU has no `ragged_all_to_all`, so on the CPU the collective is replaced by an
emulation written from its documented contract (operand rows [input_offsets[j],
+send_sizes[j]) go to rank j, at output_offsets[j] of j's output); the offsets and sizes the
dispatcher computes must then give the padded exchange's loss and gradients. The real
collective is lowered for CUDA with `jax.export`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from jax.sharding import NamedSharding

from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.parallel.pipeline import Engine
from esjax.routing import expert_parallel
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan
from esjax.train import state as state_lib, step as step_lib

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


def _grads(layout_kw, cfg):
  """(loss, gradients) of one train step of `cfg` on `layout_kw` (SGD, one microbatch)."""
  plan = make_plan(Layout(**layout_kw))
  engine = Engine.build(cfg, plan)
  tx = optax.sgd(0.1)
  shapes = state_lib.abstract_train_state(engine, tx)
  sh = jax.tree.map(lambda s: s.sharding, shapes)
  batch_sh = NamedSharding(plan.mesh, engine.batch_spec())
  step = jax.jit(step_lib.make_train_step(engine, tx, optax.constant_schedule(0.1), shapes,
                                          with_grads=True), in_shardings=(sh, batch_sh))
  state = state_lib.create_train_state(engine, tx, jax.random.key(0),
                                       nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0)),
                                                                  nnx.Param)))
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
  batch = jax.device_put({"inputs": tok[:, :-1], "targets": tok[:, 1:]}, batch_sh)
  metrics = jax.device_get(step(state, batch)[1])
  return metrics["loss"], metrics["grads"]


@pytest.mark.parametrize("layout,overrides", [
    pytest.param(dict(dp=8, ep=8), {}, id="ep8-dropless"),
    pytest.param(dict(dp=2, tp=2, cp=2, ep=4, etp=1), dict(capacity_factor=1.0),
                 id="ep4-over-tp-cp-drop", marks=pytest.mark.slow),
    pytest.param(dict(pp=2, dp=4, ep=4, etp=1, microbatches=2), {}, id="pp2-ep4",
                 marks=pytest.mark.slow),
])
def test_ragged_exchange_equals_padded(monkeypatch, layout, overrides):
  """parallel.ep_dispatch='ragged' (what GPUs get) gives the padded exchange's loss and
  gradients; on CPU the collective itself is the emulation above."""
  cfg = CFG.replace(**overrides)
  want = _grads(dict(layout, ep_dispatch="padded"), cfg)
  monkeypatch.setattr(expert_parallel, "ragged_all_to_all", emulated_ragged_all_to_all)
  got = _grads(dict(layout, ep_dispatch="ragged"), cfg)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_ragged_exchange_lowers_for_cuda():
  """The EP step with the GPU exchange, inside the pipeline too, lowers for CUDA: per MoE
  layer and pass over it, rows, ids and results go out, and the backward sends two
  cotangents."""
  plan = make_plan(Layout(pp=2, dp=4, ep=4, etp=1, microbatches=2, ep_dispatch="ragged"))
  engine = Engine.build(CFG, plan)
  shapes = state_lib.abstract_train_state(engine, optax.sgd(0.1))
  tok = jax.ShapeDtypeStruct((8, 16), jnp.int32,
                             sharding=NamedSharding(plan.mesh, engine.batch_spec()))
  grads = lambda p, b: engine.loss_and_grads(engine.compute_params(p), b,  # noqa: E731
                                             engine.master_specs(shapes.params))[1]
  exported = jax.export.export(
      jax.jit(grads), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(
          shapes.params, {"inputs": tok, "targets": tok})
  n = exported.mlir_module().count("stablehlo.custom_call @ragged_all_to_all")
  # One MoE layer per stage; each appears once in the program: the forward unit of a middle
  # chunk (3), the backward unit of the last chunk, forward (3) and backward (2), and the
  # stored pullback of a middle chunk (2: no forward again).
  assert n == 10, n
