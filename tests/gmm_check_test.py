"""moe_impl='auto' on GPUs and TPUs: the grouped-matmul kernels, checked on the device first
(esjax.kernels.gmm.check) and pinned to lax.ragged_dot where they fail."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from esjax.configs import tiny
from esjax.eval import loading
from esjax.kernels.gmm import check, interpret as gmm_interpret, ops
from esjax.models import moe
from esjax.models.config import ModelConfig
from esjax.models.transformer import Transformer
from esjax.sharding.layout import Layout
from esjax.sharding.plan import ParallelPlan, make_plan
from esjax.train import step as step_lib
from esjax.transforms import build

MOE = ModelConfig(d_model=128, d_ff=256, n_heads=2, n_kv_heads=2, n_experts=4, top_k=2,
                  n_layers=2, vocab_size=64, max_seq_len=16, dtype="bfloat16")
TRITON = ops.Options("triton", interpret=True)


def _triton(x, gs, w_gate, w_up, w_down):
  return ops.swiglu_gmm(x, gs, w_gate, w_up, w_down, TRITON)


@jax.custom_vjp
def _grad_times_1_1(w):
  return w


_grad_times_1_1.defvjp(lambda w: (w, None), lambda _, g: (g * 1.1,))


def test_the_check_passes_the_kernels_and_says_what_differs():
  """The Triton kernels (Pallas' interpreter) pass; a 5% error in one weight's forward, a
  10% error in one weight-gradient alone, rows written past the groups, NaNs and a kernel
  that fails to build each get their own one-line answer."""
  assert check.mismatch("triton", interpret=True) is None
  assert check.mismatch("triton", dtype="float16", interpret=True) is None

  def wrong_forward(x, gs, a, b, c):
    return _triton(x, gs, a * 1.05, b, c)

  def wrong_down_grad(x, gs, a, b, c):
    return _triton(x, gs, a, b, _grad_times_1_1(c))

  def past_the_groups(x, gs, a, b, c):
    out = _triton(x, gs, a, b, c)
    return out.at[-1].set(1.0)

  def nan(x, gs, a, b, c):
    return _triton(x, gs, a, b, c).at[0, 0].set(jnp.nan)

  def fails(*_):
    raise RuntimeError("Mosaic GPU: shared memory exceeded\nsecond line")

  cases = {wrong_forward: "output differs from lax.ragged_dot's",
           wrong_down_grad: "d_w_down differs",
           past_the_groups: "wrote output rows past the groups",
           nan: "output is not finite",
           fails: "failed here: RuntimeError: Mosaic GPU: shared memory exceeded"}
  for kernel, want in cases.items():
    got = check.mismatch("triton", kernel=kernel)
    assert got is not None and want in got, (kernel.__name__, got)
    assert "\n" not in got
  assert "d_w_gate" not in check.mismatch("triton", kernel=wrong_down_grad)


@pytest.mark.slow
def test_the_check_passes_the_mosaic_kernels_at_their_own_tiles():
  """The Hopper kernels at the tiles the model runs (Pallas' GPU interpreter; ~20 s)."""
  with gmm_interpret.transposes_supported() as params:
    assert check.mismatch("mosaic", interpret=params) is None


def test_auto_is_pinned_to_ragged_only_where_the_kernels_fail_on_the_device():
  """A GPU or TPU plan checks the backend it would run (Triton on a GPU that is not Hopper,
  megablox on a TPU) and pins 'auto' to 'ragged' when the check fails, saying why. Nothing
  is checked for the CPU plan, a dense model, an explicit choice or a model the kernels do
  not apply to (float32: 'auto' is ragged_dot there already)."""
  asked = []

  def failing(*args):
    asked.append(args)
    return "the triton kernels' output is not finite"

  cfg, why = moe.pin_unchecked_kernels(MOE, ParallelPlan.single("gpu"), failing)
  assert cfg == MOE.replace(moe_impl="ragged") and asked == [("triton", None, "bfloat16")]
  assert why.startswith("model.moe_impl='auto' runs lax.ragged_dot here: the triton kernels'")
  assert moe.pin_unchecked_kernels(MOE, ParallelPlan.single("tpu"),
                                   lambda *a: asked.append(a)) == (MOE, None)
  assert asked[-1] == ("megablox", None, "bfloat16")

  def never(*args):
    raise AssertionError(f"checked {args}")

  for cfg, platform in ((MOE, "cpu"), (MOE.replace(n_experts=0, top_k=0), "gpu"),
                        (MOE.replace(moe_impl="gmm"), "gpu"),
                        (MOE.replace(moe_impl="ragged"), "gpu"),
                        (MOE.replace(dtype="float32"), "gpu")):
    assert moe.pin_unchecked_kernels(cfg, ParallelPlan.single(platform), never) == (cfg, None)


def test_a_job_over_several_processes_takes_one_answer(monkeypatch):
  """A plan with a mesh is one program over every process: a failure on any process pins
  'auto' for all (the answers are gathered); a one-device model decides alone, so a process
  that builds one while the others do not cannot hang in the gathering."""
  gathered = []

  def allgather(x):
    gathered.append(int(x))
    return np.asarray([0, 1])  # process 1 failed

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(moe.multihost_utils, "process_allgather", allgather)
  plan = dataclasses.replace(make_plan(Layout(dp=1), jax.devices()[:1]), platform="gpu")
  cfg, why = moe.pin_unchecked_kernels(MOE, plan, lambda *a: None)
  assert cfg.moe_impl == "ragged" and "failed their check on processes [1]" in why
  assert gathered == [0]
  assert moe.pin_unchecked_kernels(MOE, ParallelPlan.single("gpu"), lambda *a: None) == (
      MOE, None)
  assert gathered == [0]


def test_every_path_that_runs_a_model_here_takes_the_checked_config(monkeypatch, capsys):
  """The training loop's steps, evaluation's models and the transforms' models build with
  what the check decided (here a failing check on a would-be GPU: ragged_dot), and say why
  once per model."""
  def pin(cfg, plan, check=None):
    return (cfg.replace(moe_impl="ragged"), "model.moe_impl='auto' runs lax.ragged_dot here: "
            "stub") if cfg.is_moe else (cfg, None)

  monkeypatch.setattr(moe, "pin_unchecked_kernels", pin)
  cfg = MOE.replace(dtype="float32")
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param))
  assert loading.build_model(cfg, params).cfg.moe_impl == "ragged"
  assert build.build_model(cfg, lambda p: p, params).cfg.moe_impl == "ragged"
  assert capsys.readouterr().err.count("esjax: warning: model.moe_impl='auto' runs") == 2
  config = tiny.get_config("moe")
  run = step_lib.for_config(config)
  assert run.model_cfg.moe_impl == run.steps.engine.cfg.moe_impl == "ragged"
  assert "lax.ragged_dot here: stub" in capsys.readouterr().err
