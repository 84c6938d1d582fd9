"""Mixture-of-Experts block: router, routed SwiGLU experts, optional shared experts.

The routed part is `esjax.routing.expert_parallel.routed_experts`, the same function on one
device and under any parallel plan (expert parallelism included): routing, token dropping,
the grouped expert compute of `cfg.moe_impl` and the router statistics. Shared experts are a
tensor-parallel MLP on the same tokens.

DeepSeek-V3's expert bias (`cfg.expert_bias`) is an `ExpertBias` variable, not a Param: the
optimizer never sees it; the train step updates it with `update_expert_biases`. A token
`mask` keeps padding out of the router losses and the expert load.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from esjax.models import layers
from esjax.models.config import ModelConfig
from esjax.models.mlp import MLP
from esjax.kernels.gmm import check as gmm_check, ops as gmm_kernel
from esjax.kernels.routing import ops as routing_kernel
from esjax.routing import expert_parallel, router
from esjax.sharding.plan import ParallelPlan


def routing_for(cfg: ModelConfig, logits: jax.Array, bias: jax.Array | None = None
                ) -> router.Routing:
  """Routing of router `logits` [T, E] as `cfg` asks (XLA reference or Pallas kernel);
  `bias` [E]: the layer's expert bias (selection only), when `cfg.expert_bias`."""
  kwargs = dict(score_fn=cfg.score_fn, order=cfg.routing_order,
                renormalize=cfg.renormalize_, scaling=cfg.routed_scaling)
  if cfg.router_impl == "pallas":  # the config allows no bias and no groups with it
    return routing_kernel.route(logits, cfg.top_k, **kwargs)
  return router.route(logits, cfg.top_k, bias=bias, n_groups=cfg.n_expert_groups,
                      top_k_groups=cfg.top_k_groups, **kwargs)


def grouped_kernel(rows, group_sizes, w_gate, w_up, w_down, expected_rows: int | None,
                   backend: str, num_sms: int | None = None):
  """moe_impl='gmm': the grouped SwiGLU on the GPU kernels (esjax.kernels.gmm); `num_sms`:
  the GPU's streaming multiprocessors (the Hopper kernels run one program on each; None:
  an H100 SXM's)."""
  return gmm_kernel.swiglu_gmm(rows, group_sizes, w_gate, w_up, w_down,
                               gmm_kernel.Options(backend, num_sms=num_sms,
                                                  expected_rows=expected_rows))


def kernel_for(cfg: ModelConfig, plan: ParallelPlan) -> expert_parallel.KernelFn | None:
  """The grouped SwiGLU on the grouped-matmul kernels that this layer hands the dispatcher:
  always for moe_impl='gmm' (a shape they cannot take is then a one-line error); for
  'auto' only where they apply (`gmm_kernel.fits`: a bfloat16 or float16 model, the expert
  widths on a device in whole tiles), so 'auto' runs ragged_dot elsewhere."""
  kernel = functools.partial(grouped_kernel, num_sms=plan.gpu_sms)
  if cfg.moe_impl == "gmm":
    return kernel
  if cfg.moe_impl != "auto" or not plan.native_collectives:
    return None
  etp = plan.size(plan.etp)
  fit = gmm_kernel.fits(expert_parallel.kernel_backend(plan), cfg.dtype, cfg.d_model,
                        cfg.effective_d_ff_expert // etp)
  return kernel if fit else None


def moe_impl(cfg: ModelConfig, plan: ParallelPlan) -> str:
  """What the MoE layers of `cfg` run on `plan` ('auto' resolved)."""
  return expert_parallel.resolve_impl(cfg.moe_impl, plan, kernel_for(cfg, plan))


def pin_unchecked_kernels(cfg: ModelConfig, plan: ParallelPlan,
                          check: Callable[[str, int | None, str], str | None] | None = None
                          ) -> tuple[ModelConfig, str | None]:
  """(cfg, None), or, where moe_impl='auto' would run the grouped-matmul kernels (a GPU or
  TPU plan) and they fail `check(backend, SMs, dtype)` (default: esjax.kernels.gmm.check's,
  once per process) on this process's device, (cfg with moe_impl='ragged', why). For models
  about to run on real devices. A plan with a mesh is one program over every process of the
  job: all processes then run the check and take the same answer."""
  if not cfg.is_moe or cfg.moe_impl != "auto" or moe_impl(cfg, plan) != "gmm":
    return cfg, None
  check = check or gmm_check.on_this_device
  why = check(expert_parallel.kernel_backend(plan), plan.gpu_sms, cfg.dtype)
  if plan.mesh is not None and jax.process_count() > 1:
    failed = np.asarray(multihost_utils.process_allgather(np.int32(why is not None)))
    if why is None and failed.any():
      why = f"the kernels failed their check on processes {np.flatnonzero(failed).tolist()}"
  if why is None:
    return cfg, None
  return cfg.replace(moe_impl="ragged"), (
      f"model.moe_impl='auto' runs lax.ragged_dot here: {why} (set model.moe_impl to choose)")


def checked(cfg: ModelConfig, plan: ParallelPlan | None = None) -> ModelConfig:
  """`cfg` for a model about to run on `plan`'s real devices (default: one device of this
  process): `pin_unchecked_kernels`, the reason printed as a warning (by process 0 for a
  plan over the job)."""
  plan = plan or ParallelPlan.single()
  cfg, why = pin_unchecked_kernels(cfg, plan)
  if why and (plan.mesh is None or jax.process_index() == 0):
    print(f"esjax: warning: {why}", file=sys.stderr, flush=True)
  return cfg


class ExpertBias(nnx.Variable):
  """Per-expert routing bias [E] (DeepSeek-V3's e_score_correction_bias): a non-trainable
  variable (a "buffer", esjax.train.state), updated by the train step, never by the
  optimizer."""


def update_expert_biases(cfg: ModelConfig, biases: jax.Array, expert_load: jax.Array
                         ) -> jax.Array:
  """Biases [..., n_moe_layers, E] after one aux-loss-free update from a step's
  `expert_load` [n_moe_layers, E] (the global batch's, padding excluded)."""
  if not (cfg.expert_bias and cfg.expert_bias_rate):
    return biases
  return router.update_expert_bias(biases, expert_load, cfg.expert_bias_rate)


class MoE(nnx.Module):
  """router [D, E]; experts w_gate/w_up [E, D, F], w_down [E, F, D]; shared MLP [D, S*F_s]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, plan: ParallelPlan | None = None):
    self.cfg = cfg
    self.plan = plan or ParallelPlan.single()
    d, e, f, std, pd = (cfg.d_model, cfg.n_experts, cfg.effective_d_ff_expert, cfg.init_std,
                        cfg.param_dtype)
    self.router = layers.param(rngs, (d, e), ("embed", None), cfg.router_init_std, "float32")
    self.w_gate = layers.param(rngs, (e, d, f), ("exp", "embed_moe", "mlp_moe"), std, pd)
    self.w_up = layers.param(rngs, (e, d, f), ("exp", "embed_moe", "mlp_moe"), std, pd)
    self.w_down = layers.param(rngs, (e, f, d), ("exp", "mlp_moe", "embed_moe"), std, pd)
    if cfg.n_shared_experts:
      self.shared = MLP(d, cfg.n_shared_experts * cfg.effective_d_ff_shared, std, rngs, pd,
                        plan)
      if cfg.shared_expert_gate:
        self.shared_gate = layers.param(rngs, (d, 1), ("embed", None), std, pd)
    if cfg.expert_bias:
      self.expert_bias = ExpertBias(jnp.zeros((e,), jnp.float32))

  def shared_out(self, x: jax.Array) -> jax.Array:
    y = self.shared(x)
    if self.cfg.shared_expert_gate:
      gate = jnp.einsum("...d,do->...o", x, self.shared_gate[...].astype(x.dtype))
      y = jax.nn.sigmoid(gate) * y
    return y

  def __call__(self, x: jax.Array, mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, S_l, D], mask [B, S_c] (1: the token counts in the router losses and the load)
    -> (y [B, S_l, D], per-layer router statistics of the micro-batch)."""
    bias = self.expert_bias[...] if self.cfg.expert_bias else None
    y, stats = expert_parallel.routed_experts(
        x, self.router[...], self.w_gate[...], self.w_up[...], self.w_down[...],
        cfg=self.cfg, plan=self.plan, mask=mask,
        route=functools.partial(routing_for, self.cfg, bias=bias),
        kernel=kernel_for(self.cfg, self.plan))
    if self.cfg.n_shared_experts:
      y = y + self.shared_out(x)
    return y, stats
