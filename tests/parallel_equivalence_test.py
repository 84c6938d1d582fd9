"""Every layout computes the single-device train step: loss, router stats, gradients, 3 steps.

The reference does not use the parallel engine: `jax.value_and_grad` of the mean of
`esjax.models.loss.lm_loss` over the same microbatches, on the model's own parameter tree on
one device, then three steps of SGD with momentum. Each layout runs the real train step
(`esjax.train.step.make_train_step`) on its mesh from the same parameters: step 1's loss,
router statistics and every gradient must equal the reference to 1e-5 relative, and so must
the losses of steps 2 and 3. The state's shardings are checked against hand-written specs.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from esjax.models.config import ModelConfig
from esjax.models.loss import lm_loss
from esjax.models.transformer import Transformer
from esjax.parallel import stages
from esjax.parallel.batch import split_microbatches
from esjax.parallel.pipeline import Engine
from esjax.sharding.layout import Layout, check_model
from esjax.sharding.plan import make_plan
from esjax.train import state as state_lib, step as step_lib

BATCH, SEQ, STEPS = 8, 16, 3

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   n_experts=8, top_k=2, n_shared_experts=1, d_ff_shared=32,
                   shared_expert_gate=True, qkv_bias=True, aux_loss_coef=0.01,
                   seq_aux_loss_coef=0.01, z_loss_coef=1e-3, init_std=0.1,
                   router_init_std=0.5)
DROP = dict(capacity_factor=1.0)  # drops ~20% of assignments with this router init
DENSE = dict(n_experts=0, n_kv_heads=4, n_shared_experts=0, d_ff_shared=0,
             shared_expert_gate=False, qkv_bias=False)
slow = pytest.mark.slow

# (name, layout, model overrides); names say what is folded.
LAYOUTS = [
    ("dp8", dict(dp=8), {}),
    ("dp8-fsdp-drop", dict(dp=8, fsdp=True), DROP),
    ("tp4-dp2-dense", dict(dp=2, tp=4), DENSE),
    ("cp4-dp2-drop-position", dict(dp=2, cp=4), dict(DROP, drop_policy="position")),
    ("ep8-over-dp8-drop-pad", dict(dp=8, ep=8), dict(DROP, pad_to_capacity=True)),
    ("tp2-ep4-etp1-folded-zero1", dict(dp=4, tp=2, ep=4, etp=1, distributed_optimizer=True),
     {}),
    ("ep8-over-dp2xtp4-drop", dict(dp=2, tp=4, ep=8, etp=1), DROP),
    ("ep8-over-dp4xcp2-maxz", dict(dp=4, cp=2, ep=8, etp=1), dict(max_z_loss_coef=1e-3)),
    ("etp2-ep2-tp2-fsdp-drop", dict(dp=4, tp=2, ep=2, etp=2, fsdp=True), DROP),
    ("etp2-gt-tp1-ep4", dict(dp=8, ep=4, etp=2), {}),
    ("tp4-etp4-ep2-drop-position", dict(dp=2, tp=4, ep=2, etp=4),
     dict(DROP, drop_policy="position")),
    ("dp2-tp4-ep4-microbatch4", dict(dp=2, tp=4, ep=4, etp=1, microbatches=4), DROP),
    ("cp2-ring-tp2-ep4", dict(dp=2, cp=2, tp=2, ep=4, etp=1, cp_impl="ring"), {}),
    ("pp2-dp4-1f1b", dict(pp=2, dp=4, microbatches=2), {}),
    ("pp2-dp4-gpipe-tied", dict(pp=2, dp=4, microbatches=2, schedule="gpipe"),
     dict(tie_embeddings=True)),
    ("pp2-cp2-tp2-ep4-fsdp-drop", dict(pp=2, cp=2, tp=2, ep=4, etp=1, fsdp=True,
                                       microbatches=2), DROP),
    ("pp2-dp2-tp2-interleaved-v2", dict(pp=2, dp=2, tp=2, microbatches=4,
                                        schedule="interleaved", virtual_stages=2),
     dict(n_layers=4)),
    ("pp4-dp2-1f1b-zero1", dict(pp=4, dp=2, microbatches=4, distributed_optimizer=True),
     dict(n_layers=4)),
    ("pp2-dp4-moe-every-2", dict(pp=2, dp=4, microbatches=2), dict(n_layers=8, moe_every=2)),
]
# The default run: folding with ZeRO-1, EP over dp x tp, CP + TP + EP + PP with fsdp, the
# interleaved schedule (fsdp alone and CP alone are inside the fourth).
DEFAULT = {"tp2-ep4-etp1-folded-zero1", "ep8-over-dp2xtp4-drop", "pp2-cp2-tp2-ep4-fsdp-drop",
           "pp2-dp2-tp2-interleaved-v2"}
# All five dimensions > 1 at once need 16 devices: run in a child process that has 16.
ALL_FIVE = ("pp2-dp2-cp2-tp2-ep4-16dev", dict(pp=2, dp=2, cp=2, tp=2, ep=4, etp=1,
                                               microbatches=2), DROP)
STATS = ("loss", "ce_loss", "moe_loss", "aux_loss", "seq_aux_loss", "z_loss", "expert_load",
         "drop_fraction", "max_z_loss", "n_tokens")


def make_batch(cfg):
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  mask = (rng.random((BATCH, SEQ)) > 0.1).astype(np.int32)
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "mask": mask}


def optimizer():
  return optax.sgd(0.5, momentum=0.9)


def init(cfg):
  model = Transformer(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


@functools.lru_cache(maxsize=None)
def reference(overrides: tuple, microbatches: int):
  """Loss metrics and gradients of step 1 and the losses of 3 steps, on one device."""
  cfg = BASE.replace(**dict(overrides))
  graphdef, params = init(cfg)
  batch = make_batch(cfg)

  def loss_fn(p):
    mbs = split_microbatches({k: jnp.asarray(v) for k, v in batch.items()}, microbatches)
    outs = [lm_loss(nnx.merge(graphdef, p), {k: v[i] for k, v in mbs.items()})
            for i in range(microbatches)]
    metrics = jax.tree.map(lambda *x: sum(x) / microbatches, *[o[1] for o in outs])
    return metrics["loss"], metrics

  tx = optimizer()

  @jax.jit
  def step(p, s):
    (_, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, metrics, g

  p, s, out = params, tx.init(params), []
  for _ in range(STEPS):
    p, s, metrics, g = step(p, s)
    out.append((jax.device_get(metrics), jax.device_get(g)))
  return out


def run_layout(layout_kw, overrides):
  cfg = BASE.replace(**overrides)
  plan = make_plan(Layout(**layout_kw))
  check_model(plan.layout, cfg, seq_len=SEQ, batch=BATCH)
  engine = Engine.build(cfg, plan)
  tx = optimizer()
  shapes = state_lib.abstract_train_state(engine, tx)
  shardings = jax.tree.map(lambda s: s.sharding, shapes)
  batch_sh = NamedSharding(plan.mesh, engine.batch_spec())
  step = jax.jit(step_lib.make_train_step(engine, tx, optax.constant_schedule(0.5), shapes,
                                          with_grads=True),
                 in_shardings=(shardings, batch_sh), out_shardings=(shardings, None))
  state = state_lib.create_train_state(engine, tx, jax.random.key(0), init(cfg)[1])
  batch = jax.device_put(make_batch(cfg), batch_sh)
  out = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    out.append(jax.device_get(metrics))
  return cfg, plan, engine, state, out


def rel_close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-12)
  err = np.max(np.abs(actual - expected)) / scale
  assert err <= 1e-5, f"{what}: relative error {err:.2e}"


def expected_specs(plan, cfg):
  """Hand-written master specs of a few parameters (independent of the rules table)."""
  ax = lambda n: plan.axes(n) or None  # noqa: E731
  tp, ep, etp = ax("tp"), ax("ep"), ax("etp")
  fsdp = plan.layout.fsdp
  data = (plan.dp + plan.cp) or None if fsdp else None
  edp = ax("edp") if fsdp else None
  kv = tp if cfg.n_kv_heads % plan.layout.tp == 0 else None
  pp = ax("pp")
  out = {("embed",): P(tp, data), ("stages", 0, "attn", "wq"): P(pp, None, None, data, tp, None),
         ("stages", 0, "attn", "wk"): P(pp, None, None, data, kv, None),
         ("stages", 0, "attn", "wo"): P(pp, None, None, tp, None, data)}
  if not cfg.tie_embeddings:
    out[("lm_head",)] = P(data, tp)
  if cfg.is_moe and not cfg.first_k_dense:
    out[("stages", 0, "mlp", "w_gate")] = P(pp, None, None, ep, edp, etp)
    out[("stages", 0, "mlp", "w_down")] = P(pp, None, None, ep, etp, edp)
  return out


@pytest.mark.parametrize("name,layout_kw,overrides", [
    pytest.param(*case, id=case[0], marks=() if case[0] in DEFAULT else slow)
    for case in LAYOUTS])
def test_layout_equals_single_device(name, layout_kw, overrides):
  del name
  cfg, plan, engine, state, got = run_layout(layout_kw, overrides)
  ref = reference(tuple(sorted(overrides.items())), plan.layout.microbatches)

  # Step 1: loss, every router statistic, every gradient.
  for key in STATS:
    if key in ref[0][0]:
      rel_close(got[0][key], ref[0][0][key], key)
  if cfg.capacity_factor:
    assert ref[0][0]["drop_fraction"] > 0.05, "the dropping case must drop tokens"
  grads = stages.unstack(got[0]["grads"], engine.fmt)
  flat_ref = jax.tree_util.tree_flatten_with_path(ref[0][1])[0]
  flat_got = jax.tree.leaves(grads)
  assert len(flat_ref) == len(flat_got)
  for (path, g_ref), g in zip(flat_ref, flat_got):
    rel_close(g, g_ref, f"grad {jax.tree_util.keystr(path)}")
  # Three steps: the same losses.
  for i in range(1, STEPS):
    rel_close(got[i]["loss"], ref[i][0]["loss"], f"loss of step {i + 1}")

  # Shardings of the master weights, as written by hand (ZeRO-1 adds axes: skipped there).
  if not plan.layout.distributed_optimizer:
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
      keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
      want = expected_specs(plan, cfg).get(keys)
      if want is not None:
        assert leaf.sharding.is_equivalent_to(NamedSharding(plan.mesh, want), leaf.ndim), (
            keys, leaf.sharding, want)


def test_distributed_optimizer_splits_master_weights_over_replicas():
  """ZeRO-1: master weights and moments are split over the axes their compute layout
  replicates them on, so each device stores 1/replicas of them."""
  plan = make_plan(Layout(dp=4, tp=2, ep=4, etp=1, distributed_optimizer=True))
  engine = Engine.build(BASE, plan)
  shapes = state_lib.abstract_train_state(engine, optimizer())
  wq = shapes.params["stages"][0]["attn"]["wq"]  # [1, 1, 2, D, H, hd]; tp on H, dp on D
  shard = wq.sharding.shard_shape(wq.shape)
  assert np.prod(shard) * 8 == np.prod(wq.shape), (wq.sharding, shard)


def test_step_for_another_layout_is_another_trace():
  """The plan is part of the model's graphdef (and of the engine, the step's static part):
  a function jitted with it as a static argument is traced again for another layout, never
  silently reused."""
  plans = [make_plan(Layout(dp=8)), make_plan(Layout(dp=4, tp=2))]
  engines = [Engine.build(BASE, p) for p in plans]
  graphdefs = [e.slot_defs[0] for e in engines]
  assert graphdefs[0] != graphdefs[1] and hash(graphdefs[0]) != hash(graphdefs[1])
  assert engines[0] != engines[1] and hash(engines[0]) != hash(engines[1])

  @functools.partial(jax.jit, static_argnums=0)
  def traced(static, x):
    return x + 1

  for static in (*graphdefs, *engines):
    traced(static, jnp.ones(()))
  assert traced._cache_size() == 4


@pytest.mark.slow
def test_all_five_dimensions_on_16_devices():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
             XLA_FLAGS="--xla_force_host_platform_device_count=16")
  proc = subprocess.run([sys.executable, __file__, "all-five"], env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "all-five: ok" in proc.stdout


if __name__ == "__main__" and sys.argv[1:] == ["all-five"]:
  jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py
  assert jax.device_count() == 16, jax.devices()
  test_layout_equals_single_device(*ALL_FIVE)
  print("all-five: ok")
