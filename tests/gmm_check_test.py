"""moe_impl='auto' on GPUs and TPUs: the grouped-matmul kernels, checked on the device first
(esjax.kernels.gmm.check) and pinned to lax.ragged_dot where they fail."""

import jax
import jax.numpy as jnp
import pytest

from esjax.kernels.gmm import check, interpret as gmm_interpret, ops
from esjax.models import moe
from esjax.models.config import ModelConfig
from esjax.sharding.plan import ParallelPlan

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

  def failing(backend, num_sms):
    asked.append((backend, num_sms))
    return "the triton kernels' output is not finite"

  cfg, why = moe.pin_unchecked_kernels(MOE, ParallelPlan.single("gpu"), failing)
  assert cfg == MOE.replace(moe_impl="ragged") and asked == [("triton", None)]
  assert why.startswith("model.moe_impl='auto' runs lax.ragged_dot here: the triton kernels'")
  assert moe.pin_unchecked_kernels(MOE, ParallelPlan.single("tpu"),
                                   lambda *a: asked.append(a)) == (MOE, None)
  assert asked[-1] == ("megablox", None)

  def never(*args):
    raise AssertionError(f"checked {args}")

  for cfg, platform in ((MOE, "cpu"), (MOE.replace(n_experts=0, top_k=0), "gpu"),
                        (MOE.replace(moe_impl="gmm"), "gpu"),
                        (MOE.replace(moe_impl="ragged"), "gpu"),
                        (MOE.replace(dtype="float32"), "gpu")):
    assert moe.pin_unchecked_kernels(cfg, ParallelPlan.single(platform), never) == (cfg, None)
