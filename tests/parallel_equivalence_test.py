"""Every layout computes the single-device train step: loss, router stats, gradients, 3 steps.

The reference is the same step jitted on one device (same microbatch count). Each layout
runs three steps of SGD with momentum from the same parameters; step 1's loss, router
statistics and gradients must equal the reference to 1e-5 relative, and so must the losses
of steps 2 and 3. The compiled step is also checked for the shardings the rules promise:
parameters (against hand-written specs) and every constrained activation (the sharding
the compiler reports for it).
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
from esjax.models.transformer import Transformer
from esjax.parallel import mesh as mesh_lib
from esjax.parallel import rules as rules_lib
from esjax.parallel import step as step_lib

BATCH, SEQ, STEPS = 8, 16, 3

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   n_experts=8, top_k=2, n_shared_experts=1, d_ff_shared=32,
                   shared_expert_gate=True, qkv_bias=True, aux_loss_coef=0.01,
                   seq_aux_loss_coef=0.01, z_loss_coef=1e-3, init_std=0.1,
                   router_init_std=0.5)
DROP = dict(capacity_factor=1.0)  # drops ~20% of assignments with this router init
DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                    init_std=0.1)

slow = pytest.mark.slow

# (name, layout, model overrides); names say what is folded.
LAYOUTS = [
    ("dp8", dict(dp=8), {}),
    ("dp8-fsdp-drop", dict(dp=8, fsdp=True), DROP),
    ("tp4-dp2-dense", dict(dp=2, tp=4), "dense"),
    ("cp4-dp2-drop-position", dict(dp=2, cp=4), dict(DROP, drop_policy="position")),
    ("ep8-over-dp8-drop", dict(dp=8, ep=8), DROP),
    ("tp2-ep4-etp1-folded", dict(dp=4, tp=2, ep=4, etp=1), {}),
    ("ep8-over-dp2xtp4-drop", dict(dp=2, tp=4, ep=8, etp=1), DROP),
    ("ep8-over-dp4xcp2", dict(dp=4, cp=2, ep=8, etp=1), {}),
    ("etp2-ep2-tp2-fsdp-drop", dict(dp=4, tp=2, ep=2, etp=2, fsdp=True), DROP),
    ("etp2-gt-tp1-ep4", dict(dp=8, ep=4, etp=2), {}),
    ("tp4-etp4-ep2-drop-position", dict(dp=2, tp=4, ep=2, etp=4),
     dict(DROP, drop_policy="position")),
    ("dp2-tp4-ep4-microbatch4", dict(dp=2, tp=4, ep=4, etp=1, microbatches=4), DROP),
    ("cp2-ring-tp2-ep4", dict(dp=2, cp=2, tp=2, ep=4, etp=1, cp_impl="ring"), {}),
    ("pp2-dp4", dict(pp=2, dp=4, microbatches=2), {}),
    ("pp2-cp2-tp2-ep4-fsdp-drop", dict(pp=2, cp=2, tp=2, ep=4, etp=1, fsdp=True,
                                       microbatches=2), DROP),
    ("pp2-dp2-cp2-ep4-etp1", dict(pp=2, dp=2, cp=2, ep=4, etp=1, microbatches=4), {}),
]
DEFAULT = {"dp8-fsdp-drop", "cp4-dp2-drop-position", "tp2-ep4-etp1-folded",
           "ep8-over-dp2xtp4-drop", "etp2-ep2-tp2-fsdp-drop", "pp2-cp2-tp2-ep4-fsdp-drop"}
# All five dimensions > 1 at once need 16 devices: run in a child process that has 16.
ALL_FIVE = ("pp2-dp2-cp2-tp2-ep4-16dev", dict(pp=2, dp=2, cp=2, tp=2, ep=4, etp=1,
                                               microbatches=2), DROP)


def model_config(overrides) -> ModelConfig:
  return DENSE if overrides == "dense" else BASE.replace(**overrides)


def make_batch(cfg):
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  mask = (rng.random((BATCH, SEQ)) > 0.1).astype(np.int32)
  return {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]),
          "mask": jnp.asarray(mask)}


def optimizer():
  return optax.sgd(0.5, momentum=0.9)


def init_params(cfg):
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  return graphdef, params


def run_steps(step, params, opt_state, batch):
  out = []
  for _ in range(STEPS):
    params, opt_state, metrics = step(params, opt_state, batch)
    out.append(jax.device_get(metrics))
  return out


@functools.lru_cache(maxsize=None)
def reference(overrides_key, microbatches):
  cfg = model_config(dict(overrides_key) if overrides_key != "dense" else "dense")
  graphdef, params = init_params(cfg)
  tx = optimizer()
  step = step_lib.make_train_step(graphdef, tx, mesh_lib.Layout(dp=1, microbatches=microbatches),
                                  with_grads=True)
  device = jax.devices()[0]
  params = jax.device_put(params, device)
  return run_steps(jax.jit(step), params, tx.init(params), jax.device_put(make_batch(cfg),
                                                                          device))


def expected_specs(fm, cfg):
  """Hand-written specs of a few parameters (independent of the rules table)."""
  ax = lambda n: fm.axes(n) or None  # noqa: E731
  tp, ep, etp = ax("tp"), ax("ep"), ax("etp")
  data = (fm.axes("dp") + fm.axes("cp")) or None if fm.layout.fsdp else None
  edp = ax("edp") if fm.layout.fsdp else None
  kv = tp if cfg.n_kv_heads % fm.layout.tp == 0 else None
  out = {("embed",): P(tp, data), ("lm_head",): P(data, tp),
         ("layers", 0, "attn", "wq"): P(data, tp, None),
         ("layers", 0, "attn", "wk"): P(data, kv, None),
         ("layers", 0, "attn", "wo"): P(tp, None, data)}
  if cfg.is_moe:
    out[("layers", 1, "mlp", "w_gate")] = P(ep, edp, etp)
    out[("layers", 1, "mlp", "w_down")] = P(ep, etp, edp)
    out[("layers", 1, "mlp", "router")] = P(data, None)
  else:
    out[("layers", 1, "mlp", "w_down")] = P(tp, data)
  if fm.layout.pp > 1:  # layer weights are also split over pp, on the first dimension here
    join = lambda e: ("pp", *rules_lib.entry_axes(e))  # noqa: E731
    out = {k: P(join(v[0]), *v[1:]) if k[0] == "layers" else v for k, v in out.items()}
  return out


def rel_close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-12)
  err = np.max(np.abs(actual - expected)) / scale
  assert err <= 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("name,layout_kw,overrides", [
    pytest.param(*case, id=case[0], marks=() if case[0] in DEFAULT else slow)
    for case in LAYOUTS])
def test_layout_equals_single_device(name, layout_kw, overrides):
  del name
  cfg = model_config(overrides)
  layout = mesh_lib.Layout(**layout_kw)
  fm = mesh_lib.make_mesh(layout)
  mesh_lib.check_model(fm.layout, cfg, seq_len=SEQ, batch=BATCH)
  key = "dense" if overrides == "dense" else tuple(sorted(overrides.items()))
  ref = reference(key, fm.layout.microbatches)

  graphdef, params = init_params(cfg)
  tx = optimizer()
  psh = step_lib.param_shardings(params, fm, cfg)
  params = jax.device_put(params, psh)
  opt_state, osh = step_lib.init_opt_state(tx, params, fm, psh)
  step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, with_grads=True), fm,
                                 psh, osh, cfg)
  batch = jax.device_put(make_batch(cfg), step_lib.batch_sharding(fm))
  with rules_lib.record_shardings() as records:
    params1, opt_state, metrics = step(params, opt_state, batch)
  got = [jax.device_get(metrics)] + run_steps(step, params1, opt_state, batch)[:STEPS - 1]

  # Step 1: loss, every router statistic, every gradient.
  for key_ in ("loss", "ce_loss", "moe_loss", "aux_loss", "seq_aux_loss", "z_loss",
               "expert_load", "drop_fraction"):
    if key_ in ref[0]:
      rel_close(got[0][key_], ref[0][key_], key_)
  if "drop_fraction" in ref[0] and cfg.capacity_factor:
    assert ref[0]["drop_fraction"] > 0.05, "the dropping case must drop tokens"
  flat_ref = jax.tree_util.tree_flatten_with_path(ref[0]["grads"])[0]
  flat_got = jax.tree.leaves(got[0]["grads"])
  for (path, g_ref), g in zip(flat_ref, flat_got):
    rel_close(g, g_ref, f"grad {jax.tree_util.keystr(path)}")
  # Three steps: the same losses.
  for i in range(1, STEPS):
    rel_close(got[i]["loss"], ref[i]["loss"], f"loss of step {i + 1}")

  # Shardings: parameters as written by hand, activations as the rules say.
  specs = expected_specs(fm, cfg)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params1)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    keys = tuple(k for k in keys if k != "value")
    if keys in specs:
      want = NamedSharding(fm.mesh, specs[keys])
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (keys, leaf.sharding, want)
  table = rules_lib.layout_rules(fm, cfg)
  assert records, "no constrained activation was compiled"
  for axes, sharding in records:
    spec, ndim = rules_lib.logical_to_spec(axes, table), len(axes)
    if fm.layout.pp > 1 and axes[0] != "act_stage" and sharding.spec[:1] == ("pp",):
      spec, ndim = P("pp", *spec), ndim + 1  # inside the pipeline's vmap over stages
    assert sharding.is_equivalent_to(NamedSharding(fm.mesh, spec), ndim), (
        f"{axes}: compiled {sharding}, rules say {spec}")


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
