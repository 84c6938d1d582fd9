"""Differentiable top-k routing on the Pallas kernel; a drop-in for `router.route`.

`route(...)` returns the same `Routing` as `esjax.routing.router.route` (the reference):
the kernel selects the experts and computes the weights; `probs` (scores over all experts,
for the balance loss) are plain jnp that XLA fuses into their consumers. The backward pass
is the reference's: `router.routing_from_indices` differentiated at the kernel's indices.

Backend: GPU lowers through Triton (chosen explicitly; jax 0.10 would pick Mosaic GPU),
TPU through Mosaic, anything else (CPU) runs the kernel in the Pallas interpreter. With
`interpret=None` the choice is made per platform at lowering time (`lax.platform_dependent`),
so one jitted function exports to every platform.

NaN logits route deterministically (NaN ranks above +inf, lowest index first, weights NaN),
exactly as the reference. `checked=True` adds a host check that raises on NaN instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from esjax.kernels.routing import kernel
from esjax.routing import router


def _select(logits, top_k, opts, interpret, block_tokens):
  """(weights, indices, counts) from the kernel on the backend of the platform."""
  run = functools.partial(kernel.route_topk, top_k=top_k, block_tokens=block_tokens,
                          **dict(opts))
  if interpret:
    return run(logits, backend="triton", interpret=True)
  triton = functools.partial(run, backend="triton")
  fallback = None if interpret is False else functools.partial(triton, interpret=True)
  return jax.lax.platform_dependent(
      logits, cuda=triton, rocm=triton, tpu=functools.partial(run, backend="mosaic"),
      default=fallback)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _route_topk(logits, top_k, opts, interpret, block_tokens):
  return _select(logits, top_k, opts, interpret, block_tokens)


def _route_topk_fwd(logits, top_k, opts, interpret, block_tokens):
  weights, indices, counts = _select(logits, top_k, opts, interpret, block_tokens)
  return (weights, indices, counts), (logits, indices)


def _route_topk_bwd(top_k, opts, interpret, block_tokens, residuals, cotangents):
  del top_k, interpret, block_tokens
  logits, indices = residuals
  _, vjp = jax.vjp(lambda x: router.routing_from_indices(x, indices, **dict(opts)).weights,
                   logits)
  return vjp(cotangents[0])


_route_topk.defvjp(_route_topk_fwd, _route_topk_bwd)


def _raise_on_nan(n_bad_rows):
  if n_bad_rows:
    raise FloatingPointError(f"route: NaN router logits in {int(n_bad_rows)} token rows")


def route_with_counts(logits: jax.Array, top_k: int, *, score_fn: str = "softmax",
                      order: str = "topk_softmax", renormalize: bool | None = None,
                      scaling: float = 1.0, interpret: bool | None = None,
                      checked: bool = False, block_tokens: int | None = None
                      ) -> tuple[router.Routing, jax.Array]:
  """`route` plus the number of assignments per expert in this block of tokens, [E] int32."""
  if logits.ndim != 2:
    raise ValueError(f"logits shape {logits.shape}, expected [tokens, experts]")
  n_experts = logits.shape[1]
  if not 1 <= top_k <= n_experts:
    raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
  router.check_order(score_fn, order)
  if checked:
    n_bad_rows = jnp.sum(jnp.any(jnp.isnan(logits), axis=-1))
    if isinstance(n_bad_rows, jax.core.Tracer):  # under jit: raises when the step runs
      jax.debug.callback(_raise_on_nan, n_bad_rows)
    else:
      _raise_on_nan(n_bad_rows)
  renormalize = router.resolve_renormalize(renormalize, score_fn, top_k)
  opts = (("score_fn", score_fn), ("order", order), ("renormalize", renormalize),
          ("scaling", float(scaling)))  # hashable: static under custom_vjp
  weights, indices, counts = _route_topk(logits, top_k, opts, interpret, block_tokens)
  probs = router.routing_from_indices(logits, indices, **dict(opts)).probs  # weights: DCE
  return router.Routing(weights, indices, probs), counts


def route(logits: jax.Array, top_k: int, *, score_fn: str = "softmax",
          order: str = "topk_softmax", renormalize: bool | None = None, scaling: float = 1.0,
          interpret: bool | None = None, checked: bool = False) -> router.Routing:
  """Top-k routing of `logits` [T, E] on the Pallas kernel; same result as `router.route`.

  Args:
    logits: [tokens, experts] router logits (any float dtype; computed in float32).
    top_k: experts per token, 1 <= top_k <= experts.
    score_fn, order, renormalize, scaling: as `router.route`.
    interpret: None picks per platform (Triton on GPU, Mosaic on TPU, interpreter elsewhere);
      True always runs the interpreter (Triton layout); False never (no CPU fallback).
    checked: raise FloatingPointError (at run time, from the host) if a logit is NaN.
  """
  return route_with_counts(logits, top_k, score_fn=score_fn, order=order,
                           renormalize=renormalize, scaling=scaling, interpret=interpret,
                           checked=checked)[0]


def expert_counts(logits: jax.Array, top_k: int, **kwargs) -> jax.Array:
  """Per-expert assignment counts [E] int32 of this block of tokens, from the kernel."""
  return route_with_counts(logits, top_k, **kwargs)[1]

