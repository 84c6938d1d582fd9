"""DeepSeek-V3 routing in the model and the train step, and the token mask of the router
losses: the MoE block against a per-token loop of transformers' DeepSeek-V3 gate, padding
against the unpadded batch, the expert bias as non-trainable state (optimizer, step update,
checkpoints), and aux-loss-free balancing in training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from esjax.models import ModelConfig, Transformer
from esjax.models import moe as moe_lib
from esjax.models import params as params_lib
from esjax.models.loss import lm_loss
from esjax.parallel.pipeline import Engine
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan
from esjax.train import checkpoint, state as state_lib, step as step_lib

D, E, K = 8, 8, 4
DEEPSEEK = ModelConfig(d_model=D, d_ff=6, n_heads=2, n_kv_heads=2, n_experts=E, top_k=K,
                       init_std=0.3, router_init_std=0.5, score_fn="sigmoid",
                       routing_order="softmax_topk", n_expert_groups=4, top_k_groups=2,
                       expert_bias=True, routed_scaling=2.0, moe_block_size=4)
TINY = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32,
                   d_ff_expert=16, n_experts=8, top_k=2, score_fn="sigmoid",
                   routing_order="softmax_topk", router_init_std=0.5, max_seq_len=16,
                   moe_impl="ragged")


def variables(cfg, seed=0):
  """(params, buffers) of Transformer(cfg): N(0, init_std) weights drawn in numpy, unit norm
  scales, zero buffers (no XLA init compile: fast)."""
  rng = np.random.default_rng(seed)
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  _, params, buffers = nnx.split(model, nnx.Param, ...)

  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return jnp.ones(x.shape, x.dtype)
    std = cfg.router_init_std if "router" in jax.tree_util.keystr(path) else cfg.init_std
    return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

  params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params))
  return params, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nnx.to_pure_dict(buffers))


@pytest.mark.parametrize("fields, message", [
    (dict(top_k=1), "routing_order='topk_softmax' with top_k=1"),
    (dict(expert_bias=True), "expert_bias needs score_fn='sigmoid'"),
    (dict(n_expert_groups=3), "n_expert_groups=3 must be >= 1 and divide n_experts=8"),
    (dict(routing_order="softmax_topk", n_expert_groups=4, top_k_groups=3),
     "top_k_groups=3"),
    (dict(routing_order="softmax_topk", top_k=5, n_expert_groups=4, top_k_groups=2),
     "top_k=5 exceeds the 4 experts"),
    (dict(score_fn="sigmoid", routing_order="softmax_topk", expert_bias=True,
          router_impl="pallas"), "router_impl='pallas' has no expert_bias"),
])
def test_config_rejects_what_cannot_route(fields, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(n_experts=8, **fields)


def engine_for(cfg):
  return Engine.build(cfg, make_plan(Layout(dp=1)))


def train_step(engine, tx):
  shapes = state_lib.abstract_train_state(engine, tx)
  return jax.jit(step_lib.make_train_step(engine, tx, optax.constant_schedule(1e-2), shapes))


def start(engine, tx, params, buffers):
  state = state_lib.create_train_state(engine, tx, jax.random.key(0), params)
  return state.replace(buffers=state_lib.buffers_for_state(engine.cfg, engine, buffers))


def canonical(state, engine):
  return state_lib.buffers_from_state(jax.device_get(state.buffers), engine)


def _silu(v):
  return v / (1 + np.exp(-v))


def loop_reference(p, x, bias, mask):
  """Per token, float64: transformers 5.23 DeepseekV3TopkRouter.forward (sigmoid, + bias for
  the choice, groups by the sum of their top 2, 2 of 4 groups, top-k, unbiased weights
  renormalised, times routed_scaling_factor) and DeepseekV3Experts. Returns
  (y [T, D], load [E] over the tokens that count, plain top-k of the normalised scores)."""
  ys, counts, plain = [], np.zeros(E), []
  for tok, valid in zip(x, mask):
    scores = 1 / (1 + np.exp(-(tok @ p["router"])))
    choice = scores + bias
    group_scores = np.sort(choice.reshape(4, -1), -1)[:, -2:].sum(-1)
    keep = np.repeat(np.isin(np.arange(4), np.argsort(-group_scores)[:2]), E // 4)
    idx = np.argsort(-np.where(keep, choice, -np.inf))[:K]
    w = scores[idx] / (scores[idx].sum() + 1e-20) * 2.0
    y = np.zeros(D)
    for wj, e in zip(w, idx):
      y += wj * ((_silu(tok @ p["w_gate"][e]) * (tok @ p["w_up"][e])) @ p["w_down"][e])
    ys.append(y)
    counts[idx] += valid
    plain.append(np.argsort(-scores)[:K])
  return np.array(ys), counts / (mask.sum() * K), np.array(plain)


def test_moe_block_with_bias_and_groups_matches_the_gate_loop():
  rng = np.random.default_rng(0)
  graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: moe_lib.MoE(DEEPSEEK, nnx.Rngs(0))),
                                  nnx.Param, ...)
  p = {k: rng.normal(size=v.shape) * (0.5 if k == "router" else 0.3)
       for k, v in nnx.to_pure_dict(params).items()}
  bias = rng.normal(size=E) * 0.3
  x = rng.normal(size=(2, 5, D))
  mask = np.ones((2, 5))
  mask[1, 3:] = 0
  f32 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)  # noqa: E731
  y, stats = jax.jit(lambda p, b, x, m: nnx.merge(graphdef, p, b)(x, m))(
      f32(p), f32({"expert_bias": bias}), f32(x), f32(mask))
  want_y, want_load, plain = loop_reference(p, x.reshape(-1, D), bias, mask.reshape(-1))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want_y, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(stats["expert_load"]), want_load, rtol=1e-6)
  # The balance loss counts the plain top-k of the scores (Megatron), valid tokens only.
  scores = 1 / (1 + np.exp(-(x.reshape(-1, D) @ p["router"])))
  scores = scores / scores.sum(-1, keepdims=True)
  valid = mask.reshape(-1) > 0
  f = np.bincount(plain[valid].reshape(-1), minlength=E) / (valid.sum() * K)
  np.testing.assert_allclose(float(stats["aux_loss"]), E * np.sum(f * scores[valid].mean(0)),
                             rtol=1e-5)


def test_router_losses_of_a_padded_batch_are_those_of_the_unpadded_batch():
  """Padding at the end of every sequence (mask 0) changes no router loss or load: the
  reference is the same batch without the padding (attention is causal)."""
  cfg = TINY.replace(expert_bias=True, n_expert_groups=2, top_k_groups=1, aux_loss_coef=0.1,
                     seq_aux_loss_coef=0.1, z_loss_coef=0.1)
  graphdef, _, _ = params_lib.abstract_model(cfg)
  params, buffers = variables(cfg)
  buffers["layers"][1]["mlp"]["expert_bias"] = jnp.linspace(-0.2, 0.2, 8)
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, cfg.vocab_size)
  mask = jnp.ones((3, 12)).at[:, 8:].set(0)
  batches = ({"inputs": tokens, "targets": tokens, "mask": mask},
             {"inputs": tokens[:, :8], "targets": tokens[:, :8]},
             {"inputs": tokens, "targets": tokens})
  got, want, unmasked = jax.jit(lambda p, b: [lm_loss(nnx.merge(graphdef, p, b), x)[1]
                                              for x in batches])(params, buffers)
  for key in ("ce_loss", "aux_loss", "seq_aux_loss", "z_loss", "moe_loss", "expert_load"):
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=2e-5,
                               atol=1e-7, err_msg=key)
  assert abs(float(unmasked["aux_loss"]) - float(want["aux_loss"])) > 1e-6  # padding counts


def test_expert_bias_is_state_the_optimizer_never_sees_and_the_step_updates():
  cfg = TINY.replace(expert_bias=True, expert_bias_rate=0.01)
  tx = optax.adam(1e-2)
  engine = engine_for(cfg)
  params, buffers = variables(cfg)
  state = start(engine, tx, params, buffers)
  plain = state_lib.abstract_train_state(engine_for(TINY), tx)
  assert jax.tree.structure(state.params) == jax.tree.structure(plain.params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(plain.opt_state)
  assert set(canonical(state, engine)["layers"]) == {0, 1}
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  assert isinstance(model.layers[0].mlp.expert_bias, moe_lib.ExpertBias)
  assert not isinstance(model.layers[0].mlp.expert_bias, nnx.Param)
  step = train_step(engine, tx)
  tokens = jax.random.randint(jax.random.key(2), (4, 9), 0, cfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.ones((4, 8)).at[:2, 5:].set(0)}
  biases = []
  for _ in range(2):
    before = canonical(state, engine)
    state, metrics = step(state, batch)
    load = np.asarray(metrics["expert_load"], np.float64)
    after = canonical(state, engine)
    for row in range(2):  # Megatron's get_updated_expert_bias on the step's load
      want = (np.asarray(before["layers"][row]["mlp"]["expert_bias"])
              + 0.01 * np.sign(load[row].mean() - load[row]))
      np.testing.assert_allclose(np.asarray(after["layers"][row]["mlp"]["expert_bias"]),
                                 want, rtol=1e-6, atol=1e-8)
    biases.append(np.asarray(after["layers"][0]["mlp"]["expert_bias"]))
  assert np.abs(biases[-1]).max() > 0


def test_checkpoint_saves_and_restores_the_bias(tmp_path):
  cfg = TINY.replace(expert_bias=True)
  tx = optax.sgd(0.1)
  engine = engine_for(cfg)
  bias = jnp.arange(8, dtype=jnp.float32) / 100
  state = start(engine, tx, variables(cfg)[0],
                {"layers": {i: {"mlp": {"expert_bias": bias * (i + 1)}} for i in (0, 1)}})
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(state, {"position": 0}, cfg, engine.fmt)
  ckpt.wait()
  restored, _ = ckpt.restore(0, state_lib.abstract_train_state(engine, tx), engine.fmt)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored.buffers, state.buffers)
  loaded = checkpoint.restore_buffers(str(tmp_path))
  np.testing.assert_array_equal(loaded["layers"][1]["mlp"]["expert_bias"], bias * 2)


def test_bias_balancing_lowers_the_max_expert_load():
  """Balance loss off: after 200 steps the busiest expert's share of the last 20 steps is
  lower with the aux-loss-free bias update than without it (the bias held at 0)."""
  cfg = TINY.replace(n_layers=1, expert_bias=True, expert_bias_rate=0.01)
  tx = optax.adam(1e-2)
  engine = engine_for(cfg)
  step = train_step(engine, tx)  # one compile for both runs
  data = np.random.default_rng(0).integers(0, cfg.vocab_size, (200, 4, 9)).astype(np.int32)
  init = start(engine, tx, *variables(cfg))

  def busiest(balance):
    state, loads = init, []
    for tokens in data:
      state, metrics = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
      state = state if balance else state.replace(buffers=init.buffers)
      loads.append(metrics["expert_load"][0])
    return float(np.asarray(loads)[-20:].mean(0).max())

  on, off = busiest(True), busiest(False)
  assert on < off - 0.05, (on, off)  # uniform: 1/8 = 0.125


def test_expert_bias_under_expert_and_pipeline_parallelism_equals_one_device():
  """The bias routes and is updated the same on pp2 x ep4 as on one device."""
  cfg = TINY.replace(expert_bias=True, expert_bias_rate=0.01)
  tx = optax.sgd(0.1)
  tokens = jax.random.randint(jax.random.key(3), (8, 9), 0, cfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  params, buffers = variables(cfg)
  buffers["layers"][1]["mlp"]["expert_bias"] = jnp.linspace(-0.3, 0.3, 8)
  outs = []
  for layout in (Layout(dp=1), Layout(pp=2, dp=4, ep=4, etp=1, microbatches=2)):
    plan = make_plan(layout)
    engine = Engine.build(cfg.replace(), plan)
    shapes = state_lib.abstract_train_state(engine, tx)
    shard = jax.tree.map(lambda a: a.sharding, shapes)
    step = jax.jit(step_lib.make_train_step(engine, tx, optax.constant_schedule(0.1), shapes),
                   in_shardings=(shard, None), out_shardings=(shard, None))
    state, metrics = step(start(engine, tx, params, buffers), batch)
    outs.append((float(metrics["loss"]), canonical(state, engine)))
  np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), outs[1][1],
               outs[0][1])


@pytest.mark.slow  # two runs of the training loop: ~55 s of CPU
def test_the_loop_saves_and_resumes_the_bias(tmp_path):
  """tiny.py:deepseek through the training loop: 2 steps straight == 1 step, a restart from
  its checkpoint, 1 more (the restored bias routes step 2 as the straight run's did)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from esjax.configs import tiny  # pylint: disable=g-import-not-at-top
  from esjax.train import loop, metrics  # pylint: disable=g-import-not-at-top
  c = tiny.get_config("deepseek,steps=2")
  c.parallel.dp = 1
  c.data.max_bytes = 100_000
  c.train.update(seq_len=16, batch_size=2, log_every=1, eval_every=2, eval_batches=1)
  c.model.update(n_layers=2, expert_bias_rate=0.05)
  c.checkpoint.update(every=1, async_save=False)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  loop.train_and_evaluate(c, straight)
  shutil.copytree(straight, resumed)
  shutil.rmtree(f"{resumed}/checkpoints/2")
  loop.train_and_evaluate(c, resumed)
  a, b = checkpoint.restore_buffers(straight), checkpoint.restore_buffers(resumed)
  assert np.abs(a["layers"][1]["mlp"]["expert_bias"]).max() > 0
  jax.tree.map(np.testing.assert_array_equal, a, b)
  ra, rb = metrics.read_metrics(straight)[-1], metrics.read_metrics(resumed)[-1]
  np.testing.assert_allclose(rb["expert_load"], ra["expert_load"], atol=1e-6)
  assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-6)
