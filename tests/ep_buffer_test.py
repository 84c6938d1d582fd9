"""Bounded EP buffers (`model.ep_buffer_factor`): each source's block for one EP rank holds
factor x T k / ep rows (rounded up to 8); routed rows past it are dropped and counted. The
reference is a float64 numpy per-expert loop that drops, per source device and destination
rank, the assignments past the bound in (token, k) order."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from esjax.models.config import ModelConfig
from esjax.models.moe import routing_for
from esjax.routing import expert_parallel
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan

EP, E, K, D, F = 4, 8, 2, 16, 32
CFG = ModelConfig(d_model=D, d_ff=F, n_heads=2, n_kv_heads=2, n_experts=E, top_k=K,
                  moe_impl="blocked", moe_block_size=4)
TOKENS = (8, 12)  # [B, S]: 2 sequences of 12 tokens on each of the 4 devices


def _inputs(seed):
  rng = np.random.default_rng(seed)
  # Tokens share a direction u that the router's experts 0-1 (EP rank 0) align with: an
  # imbalanced, early-training router.
  u = rng.normal(size=D)
  u /= np.linalg.norm(u)
  x = (rng.normal(size=(*TOKENS, D)) + 1.5 * u).astype(np.float32)
  router = rng.normal(size=(D, E)) * 0.3
  router[:, :2] += 1.0 * u[:, None]
  w = [rng.normal(size=s) * 0.3 for s in ((E, D, F), (E, D, F), (E, F, D))]
  return x, [router.astype(np.float32)] + [a.astype(np.float32) for a in w]


def _sharded(cfg, x, w):
  plan = make_plan(Layout(dp=EP, ep=EP, etp=1), jax.devices()[:EP])
  layer = lambda x, w: expert_parallel.routed_experts(  # noqa: E731
      x, *w, cfg=cfg, plan=plan, route=functools.partial(routing_for, cfg))
  specs = (P(plan.dp), (P(), P(plan.ep), P(plan.ep), P(plan.ep)))
  fn = jax.shard_map(layer, mesh=plan.mesh, in_specs=specs, out_specs=(P(plan.dp), P()))
  y, stats = jax.jit(fn)(jnp.asarray(x), tuple(jnp.asarray(a) for a in w))
  return np.asarray(y, np.float64), float(stats["ep_overflow_fraction"])


def _reference(x, w, factor):
  """float64: softmax top-k routing, renormalized (the config's order), per source device
  the assignments to each destination rank in (token, k) order, those past the bound
  dropped; each kept assignment runs its expert's SwiGLU."""
  router, w_gate, w_up, w_down = (a.astype(np.float64) for a in w)
  t = x.reshape(EP, -1, D).astype(np.float64)  # [source, T_l, D]
  n = t.shape[1]
  bound = min(n * min(K, E // EP), -(-int(np.ceil(factor * n * K / EP)) // 8) * 8)
  y, dropped = np.zeros_like(t), 0
  for s in range(EP):
    logits = t[s] @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
    weights = np.take_along_axis(probs, top, -1)
    weights /= weights.sum(-1, keepdims=True)
    sent = np.zeros(EP, int)
    for i in range(n):
      for j in range(K):
        e = top[i, j]
        dest = e // (E // EP)
        sent[dest] += 1
        if sent[dest] > bound:
          dropped += 1
          continue
        h = t[s, i] @ w_gate[e]
        h = h / (1 + np.exp(-h)) * (t[s, i] @ w_up[e])
        y[s, i] += weights[i, j] * (h @ w_down[e])
  return y.reshape(*TOKENS, D), dropped / (EP * n * K)


@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_bounded_blocks_drop_and_count_what_overflows(factor):
  x, w = _inputs(0)
  y, overflow = _sharded(CFG.replace(ep_buffer_factor=factor), x, w)
  want, want_overflow = _reference(x, w, factor)
  assert want_overflow > 0  # the imbalanced router does overflow these bounds
  assert overflow == pytest.approx(want_overflow, rel=1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_zero_factor_is_the_exact_worst_case_bound():
  x, w = _inputs(0)
  y, overflow = _sharded(CFG, x, w)  # ep_buffer_factor=0
  want, want_overflow = _reference(x, w, factor=float(EP))  # the bound is the worst case
  assert overflow == want_overflow == 0
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_block_rows_are_the_balanced_share_times_the_factor():
  n = 24  # rows of one source
  assert expert_parallel.ep_block_rows(CFG, n, EP, None) == n * min(K, E // EP)
  assert expert_parallel.ep_block_rows(CFG.replace(ep_buffer_factor=1.0), n, EP, None) == 16
  assert expert_parallel.ep_block_rows(CFG.replace(ep_buffer_factor=1.25), n, EP, None) == 16
  assert expert_parallel.ep_block_rows(CFG.replace(ep_buffer_factor=2.0), n, EP, None) == 24
  assert expert_parallel.ep_block_rows(CFG.replace(ep_buffer_factor=8.0), n, EP, None) == 48
