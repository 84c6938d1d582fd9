"""Checkpoints: round trip, keep-last-K, atomicity under SIGKILL, init_from and its errors."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from esjax.configs import common
from esjax.models.presets import get_preset
from esjax.parallel import stages
from esjax.parallel.pipeline import Engine
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan
from esjax.train import checkpoint, init_from, state as state_lib

CFG = get_preset("tiny-llama", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


def engine_for(cfg):
  return Engine.build(cfg, make_plan(Layout(dp=1)))


def make_state(cfg=CFG, seed=0):
  tx = optax.adamw(1e-3)
  return state_lib.create_train_state(engine_for(cfg), tx, jax.random.key(seed)), tx


def test_roundtrip_keeps_last_k_and_restores_exactly(tmp_path):
  state, tx = make_state()
  engine = engine_for(CFG)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=True)
  for step in (1, 2, 3):
    state = state.replace(step=jnp.asarray(step, jnp.int32),
                          params=jax.tree.map(lambda p: p + 1.0, state.params))
    ckpt.save(state, {"position": step}, CFG, engine.fmt)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  restored, data = ckpt.restore(3, state_lib.abstract_train_state(engine, tx), engine.fmt)
  ckpt.close()
  assert data == {"position": 3} and int(restored.step) == 3
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
  # restore_params reads weights and model config only (the model's own tree), from the
  # workdir-style path.
  cfg, params = checkpoint.restore_params(str(tmp_path))
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, params,
               state_lib.params_from_state(state.params, engine))


def test_a_state_restores_into_another_layout_each_device_reading_its_shards(tmp_path):
  """Saved from one device, read into pp2 x tp2 x dp2 with ZeRO-1 (8 devices): the same
  values (the host unstacking of both states agrees), every array on the target's sharding."""
  cfg = dataclasses.replace(CFG, n_layers=4)
  state, tx = make_state(cfg)
  one = engine_for(cfg)
  state = state.replace(step=jnp.asarray(1, jnp.int32),
                        opt_state=jax.tree.map(lambda x: x + jnp.asarray(3, x.dtype),
                                                state.opt_state))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save(state, {"position": 1}, cfg, one.fmt)
  other = Engine.build(cfg, make_plan(Layout(pp=2, tp=2, dp=2, microbatches=2,
                                             distributed_optimizer=True)))
  target = state_lib.abstract_train_state(other, tx)
  restored, data = ckpt.restore(1, target, other.fmt)
  ckpt.close()
  assert data == {"position": 1} and int(restored.step) == 1
  jax.tree.map(lambda x, t: x.sharding.is_equivalent_to(t.sharding, x.ndim) or pytest.fail(
      f"{x.sharding} is not {t.sharding}"), restored, target)
  host = lambda tree, fmt: jax.tree.map(np.asarray, stages.unstack(tree, fmt))  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, host(restored.params, other.fmt),
               host(state.params, one.fmt))
  for got, want in zip(jax.tree.leaves(restored.opt_state, is_leaf=_is_params),
                       jax.tree.leaves(state.opt_state, is_leaf=_is_params)):
    if _is_params(want):
      jax.tree.map(np.testing.assert_array_equal, host(got, other.fmt), host(want, one.fmt))
    else:
      np.testing.assert_array_equal(got, want)


def _is_params(x):
  return isinstance(x, dict) and stages.STAGES in x


_SAVER = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, optax
    from esjax.models.presets import get_preset
    from esjax.parallel.pipeline import Engine
    from esjax.sharding.layout import Layout
    from esjax.sharding.plan import make_plan
    from esjax.train import checkpoint, state as state_lib
    cfg = get_preset("tiny-llama", vocab_size=4096, d_model=256, d_ff=1024, n_layers=4,
                     n_heads=4, n_kv_heads=4)  # 6 M parameters, 75 MB with Adam's moments
    engine = Engine.build(cfg, make_plan(Layout(dp=1)))
    state = state_lib.create_train_state(engine, optax.adamw(1e-3), jax.random.key(0))
    ckpt = checkpoint.Checkpointer(sys.argv[1], keep=5, async_save=False)
    for step in (1, 2):
      state = state.replace(step=jnp.asarray(step, jnp.int32))
      print(f"saving {step}", flush=True)
      ckpt.save(state, {"position": step}, cfg, engine.fmt)
    print("done", flush=True)
""")


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], env=env,
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "saving 1"
    assert proc.stdout.readline().strip() == "saving 2"
    deadline = time.time() + 60
    while not any(".orbax-checkpoint-tmp" in d and d.startswith("2")
                  for d in os.listdir(tmp_path)):
      assert time.time() < deadline and proc.poll() is None, "never caught step 2 mid-save"
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # Step 2 is half written.
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not os.path.isdir(tmp_path / "2")
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
  assert sorted(os.listdir(tmp_path)) == ["1"]  # the partial step 2 is deleted at open
  assert ckpt.all_steps() == [1]
  big_cfg = ckpt.model_config(1)
  tx = optax.adamw(1e-3)
  big = engine_for(big_cfg)
  restored, data = ckpt.restore(1, state_lib.abstract_train_state(big, tx), big.fmt)
  expected = state_lib.create_train_state(big, tx, jax.random.key(0))
  assert data == {"position": 1}
  jax.tree.map(np.testing.assert_array_equal, restored.params, expected.params)
  ckpt.save(restored.replace(step=jnp.asarray(2, jnp.int32)), {"position": 2}, big_cfg,
            big.fmt)
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # The partial step-2 directory is gone.


def _init_from_config(path):
  c = common.base_config()
  c.checkpoint.init_from = str(path)
  return c


def _load(path, cfg):
  return init_from.load(_init_from_config(path), cfg, make_plan(Layout(dp=1)))


def test_init_from_loads_params_and_names_misfit_parameter(tmp_path):
  state, _ = make_state(seed=3)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
  engine = engine_for(CFG)
  ckpt.save(state.replace(step=jnp.asarray(7, jnp.int32)), {"position": 7}, CFG, engine.fmt)
  ckpt.close()
  params = _load(tmp_path, CFG)
  jax.tree.map(np.testing.assert_array_equal, params,
               state_lib.params_from_state(state.params, engine))
  for path in (tmp_path / "checkpoints", tmp_path / "checkpoints" / "7"):
    cfg, _ = checkpoint.restore_params(str(path))
    assert cfg == CFG
  # Shapes no load-time conversion (esjax.transforms.online) can reach: the error names the
  # first parameter that differs.
  with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.w_down' has shape \(64, 32\) but "
                                       r"the model expects \(32, 32\)"):
    _load(tmp_path, CFG.replace(d_ff=32))
  with pytest.raises(ValueError, match=r"'embed' has shape \(256, 32\) but the model expects "
                                       r"\(300, 32\)"):
    _load(tmp_path, CFG.replace(vocab_size=300))
  with pytest.raises(FileNotFoundError, match="no such directory"):
    _load(tmp_path / "nope", CFG)
  abstract = {"a": jax.ShapeDtypeStruct((2,), jnp.float32), "b": {0: jax.ShapeDtypeStruct((3,),
                                                                                      jnp.float32)}}
  with pytest.raises(ValueError, match=r"init_from='src': parameter 'b\.0' \(shape \(3,\)\) is "
                                       "missing"):
    init_from.check_fit({"a": np.zeros(2)}, abstract, "src")
  with pytest.raises(ValueError, match=r"parameter 'c' is not in the model"):
    init_from.check_fit({"a": np.zeros(2), "b": {0: np.zeros(3)}, "c": np.zeros(1)}, abstract,
                        "src")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    _load(tmp_path / "empty", CFG)
