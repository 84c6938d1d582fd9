"""The MoE block against a per-token, per-expert loop reference, values and gradients.

The reference is written independently of esjax: routing decisions (chosen experts, which
assignments fit in capacity) are taken in float64 numpy by looping over tokens and experts;
the differentiable part loops over tokens and their experts with `xp` = numpy (float64
values) or jax.numpy (gradients).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from esjax.models import ModelConfig, Transformer
from esjax.models import moe as moe_lib
from esjax.models.presets import PRESETS
from esjax.routing import expert_parallel
from esjax.sharding.plan import ParallelPlan

B, S, D, E, F, K = 2, 6, 8, 4, 6, 2
BASE = ModelConfig(d_model=D, d_ff=F, n_heads=2, n_kv_heads=2, n_experts=E, top_k=K,
                   init_std=0.3, router_init_std=0.5, moe_block_size=4)
ROUTING = {  # name: config fields
    "topk_softmax": dict(),
    "softmax_topk": dict(routing_order="softmax_topk"),
    "softmax_topk_renorm": dict(routing_order="softmax_topk", renormalize=True),
    "sigmoid": dict(score_fn="sigmoid", routing_order="softmax_topk"),  # renormalised
    "sigmoid_raw": dict(score_fn="sigmoid", routing_order="softmax_topk", renormalize=False),
    "sigmoid_renorm_scaled": dict(score_fn="sigmoid", routing_order="softmax_topk",
                                  renormalize=True, routed_scaling=2.5),
    "shared": dict(n_shared_experts=2, d_ff_shared=5),
    "shared_gated": dict(routing_order="softmax_topk", n_shared_experts=1,
                         shared_expert_gate=True),
}
DISPATCH = {
    "dropless": dict(),
    "drop_probs": dict(capacity_factor=0.75, drop_policy="probs"),
    "drop_position": dict(capacity_factor=0.75, drop_policy="position"),
    "pad_probs": dict(capacity_factor=0.75, drop_policy="probs", pad_to_capacity=True),
    "pad_position": dict(capacity_factor=0.75, drop_policy="position", pad_to_capacity=True),
}


def make(cfg, seed=0):
  model = moe_lib.MoE(cfg, nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed + 100), (B, S, D))
  return model, x


def flat(state, dtype=np.float64):
  """{'router': .., 'w_gate': .., 'shared.w_up': .., ...} of a Param state as numpy arrays."""
  d = nnx.to_pure_dict(state)
  out = {k: np.asarray(v, dtype) for k, v in d.items() if not isinstance(v, dict)}
  out.update({f"shared.{k}": np.asarray(v, dtype) for k, v in d.get("shared", {}).items()})
  return out


def params_of(model):
  return flat(nnx.state(model, nnx.Param))


def _np_scores(l, cfg):
  if cfg.score_fn == "softmax":
    e = np.exp(l - l.max())
    return e / e.sum()
  return 1 / (1 + np.exp(-l))


def ref_decisions(p, x, cfg):
  """Chosen experts [T, k] and kept [T, k] bool, by looping over tokens and experts."""
  tokens = np.asarray(x, np.float64).reshape(-1, D)
  n_tok = tokens.shape[0]
  indices, weights = [], []
  for tok in tokens:
    l = tok @ p["router"]
    s = _np_scores(l, cfg)
    idx = np.argsort(-(l if cfg.routing_order == "topk_softmax" else s), kind="stable")[:K]
    indices.append(idx)
    weights.append(route_weights(l, idx, cfg, np))
  indices, weights = np.array(indices), np.array(weights)
  keep = np.ones(indices.shape, bool)
  if cfg.capacity_factor:
    cap = math.ceil(n_tok * K / E * cfg.capacity_factor)
    for e in range(E):
      members = [(t, j) for t in range(n_tok) for j in range(K) if indices[t, j] == e]
      if cfg.drop_policy == "probs":
        members.sort(key=lambda tj: (-weights[tj], tj[0]))
      for tj in members[cap:]:
        keep[tj] = False
  return indices, keep


def route_weights(l, idx, cfg, xp):
  if cfg.routing_order == "topk_softmax":
    lt = l[idx]
    w = xp.exp(lt - xp.max(lt))
    w = w / xp.sum(w)
  else:
    s = xp.exp(l - xp.max(l)) / xp.sum(xp.exp(l - xp.max(l))) if cfg.score_fn == "softmax" \
        else 1 / (1 + xp.exp(-l))
    w = s[idx]
    if renormalised(cfg):
      w = w / xp.sum(w)
  return w * cfg.routed_scaling


def renormalised(cfg):
  """Megatron's topk_routing_with_score_function: sigmoid weights are divided by their sum
  when k > 1, pre-softmax ones are not; an explicit `renormalize` overrides (HF Qwen2-MoE
  norm_topk_prob, or the sigmoid opt-out)."""
  if cfg.renormalize is None:
    return cfg.score_fn == "sigmoid" and cfg.top_k > 1
  return cfg.renormalize


def ref_forward(p, x, cfg, indices, keep, xp):
  """y [B, S, D]: for each token, sum over its kept experts of w * SwiGLU_e(x) (+ shared)."""
  silu = lambda v: v / (1 + xp.exp(-v))
  tokens = x.reshape(-1, D)
  ys = []
  for t in range(tokens.shape[0]):
    tok = tokens[t]
    w = route_weights(tok @ p["router"], indices[t], cfg, xp)
    y = xp.zeros(D)
    for j, e in enumerate(indices[t]):
      if keep[t, j]:
        h = silu(tok @ p["w_gate"][e]) * (tok @ p["w_up"][e])
        y = y + w[j] * (h @ p["w_down"][e])
    if cfg.n_shared_experts:
      sh = silu(tok @ p["shared.w_gate"]) * (tok @ p["shared.w_up"]) @ p["shared.w_down"]
      if cfg.shared_expert_gate:
        sh = sh / (1 + xp.exp(-(tok @ p["shared_gate"])))
      y = y + sh
    ys.append(y)
  return xp.stack(ys).reshape(x.shape)


def check_values(cfg, seed=0, model=None, x=None):
  if model is None:
    model, x = make(cfg, seed)
  y, stats = jax.jit(lambda m, x: m(x))(model, x)
  p = params_of(model)
  indices, keep = ref_decisions(p, x, cfg)
  want = ref_forward(p, np.asarray(x, np.float64), cfg, indices, keep, np)
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-6)
  counts = np.bincount(indices.reshape(-1), minlength=E)
  np.testing.assert_allclose(np.asarray(stats["expert_load"]), counts / indices.size, rtol=1e-6)
  np.testing.assert_allclose(float(stats["drop_fraction"]), 1 - keep.mean(), rtol=1e-6,
                             atol=1e-7)
  return keep


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
@pytest.mark.parametrize("routing", list(ROUTING))
def test_routing_modes_match_loop_reference(routing, impl):
  check_values(BASE.replace(moe_impl=impl, **ROUTING[routing]))


@pytest.mark.parametrize("dispatch_mode,impl", [
    ("drop_probs", "ragged"), ("drop_probs", "blocked"), ("drop_position", "ragged"),
    ("drop_position", "blocked"), ("pad_probs", "blocked"), ("pad_position", "blocked")])
@pytest.mark.parametrize("routing", list(ROUTING))
def test_dropping_matches_loop_reference(dispatch_mode, impl, routing):
  keep = check_values(BASE.replace(moe_impl=impl, **ROUTING[routing], **DISPATCH[dispatch_mode]))
  assert not keep.all()  # capacity 0.75 must drop something, or the test proves nothing


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
def test_collapsed_routing_is_dropless(impl):
  """Every token picks experts 0 and 1: groups of T rows, two experts empty; nothing drops."""
  cfg = BASE.replace(moe_impl=impl)
  model, x = make(cfg)
  x = jnp.abs(x)
  model.router[...] = jnp.zeros((D, E)).at[:, 0].set(2.0).at[:, 1].set(1.0)
  keep = check_values(cfg, model=model, x=x)
  assert keep.all()


@pytest.mark.parametrize("pad", [False, True])
def test_large_capacity_equals_dropless(pad):
  """capacity_factor = E / k gives capacity T: nothing can drop, the output is dropless."""
  dropless = BASE.replace(routing_order="softmax_topk")
  model, x = make(dropless)
  y0, s0 = model(x)
  model_c, _ = make(dropless.replace(capacity_factor=E / K, pad_to_capacity=pad))
  y1, s1 = model_c(x)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-6, atol=1e-7)
  assert float(s1["drop_fraction"]) == 0.0


GRAD_CASES = [
    ("topk_softmax", "dropless", "ragged"),
    ("topk_softmax", "dropless", "blocked"),
    ("sigmoid_renorm_scaled", "drop_probs", "blocked"),
    ("softmax_topk_renorm", "drop_position", "ragged"),
    ("shared_gated", "pad_probs", "ragged"),
]


@pytest.mark.parametrize("routing,dispatch_mode,impl", GRAD_CASES)
def test_gradients_match_loop_reference(routing, dispatch_mode, impl):
  cfg = BASE.replace(moe_impl=impl, **ROUTING[routing], **DISPATCH[dispatch_mode])
  model, x = make(cfg, seed=1)
  ct = jax.random.normal(jax.random.key(7), x.shape)
  indices, keep = ref_decisions(params_of(model), x, cfg)

  def loss(m, x):
    return jnp.sum(m(x)[0] * ct)

  g_model, g_x = jax.jit(nnx.grad(loss, argnums=(0, 1)))(model, x)
  g_model = flat(g_model, np.float32)

  def ref_loss(p, x):
    return jnp.sum(ref_forward(p, x, cfg, indices, keep, jnp) * ct)

  p32 = {k: jnp.asarray(v, jnp.float32) for k, v in params_of(model).items()}
  g_ref, g_xref = jax.grad(ref_loss, argnums=(0, 1))(p32, x)
  np.testing.assert_allclose(np.asarray(g_x), np.asarray(g_xref), rtol=1e-4, atol=1e-5)
  assert set(g_model) == set(g_ref)
  for name in g_ref:
    np.testing.assert_allclose(g_model[name], np.asarray(g_ref[name]), rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_auto_impl_follows_the_plan_platform():
  """'auto' is decided by the platform the step is compiled for (a deviceless GPU compile
  runs on the CPU backend but must get the GPU paths), not by jax.default_backend()."""
  assert BASE.moe_impl == "auto"
  gpu = ParallelPlan.single("gpu")
  bf16 = BASE.replace(dtype="bfloat16", d_model=128, d_ff=256)
  assert moe_lib.moe_impl(bf16, ParallelPlan.single("cpu")) == "blocked"
  assert moe_lib.moe_impl(bf16, gpu) == "gmm"
  assert moe_lib.moe_impl(bf16, ParallelPlan.single("tpu")) == "gmm"
  assert moe_lib.moe_impl(bf16.replace(moe_impl="blocked"), gpu) == "blocked"
  # Where the kernels do not apply, 'auto' is ragged_dot: float32, or widths off the tiles.
  assert moe_lib.moe_impl(bf16.replace(dtype="float32"), gpu) == "ragged"
  assert moe_lib.moe_impl(bf16.replace(d_model=96), gpu) == "ragged"
  assert moe_lib.moe_impl(bf16.replace(d_ff=160), ParallelPlan.single("tpu")) == "ragged"
  assert ParallelPlan.single("cpu").ep_dispatch == "padded"
  assert ParallelPlan.single("gpu").ep_dispatch == "ragged"
  with pytest.raises(ValueError, match="moe_impl='fast'"):
    BASE.replace(moe_impl="fast")


def test_model_blocked_equals_ragged_logits_and_grads():
  """A whole Mixtral-style model: the two grouped matmuls give the same logits and grads."""
  cfg = PRESETS["tiny-mixtral"].replace(moe_block_size=8)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
  results = []
  for impl in ("ragged", "blocked"):
    model = Transformer(cfg.replace(moe_impl=impl), nnx.Rngs(0))

    def loss(m):
      logits, aux = m(tokens)
      return jnp.mean(logits ** 2) + aux["moe_loss"]

    results.append(jax.jit(nnx.value_and_grad(loss))(model))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_bfloat16_blocked_matches_ragged():
  """bf16 compute (float32 params): both grouped matmuls round alike, to bf16 accuracy."""
  cfg = BASE.replace(dtype="bfloat16")
  model, x = make(cfg)
  x = x.astype(jnp.bfloat16)
  outs = []
  for impl in ("ragged", "blocked"):
    m = moe_lib.MoE(cfg.replace(moe_impl=impl), nnx.Rngs(0))
    y, _ = jax.jit(lambda m, x: m(x))(m, x)
    assert y.dtype == jnp.bfloat16
    outs.append(np.asarray(y, np.float32))
  np.testing.assert_allclose(outs[1], outs[0], rtol=2e-2, atol=2e-2)
  p = params_of(model)
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  ref = ref_forward(p, x64, cfg, *ref_decisions(p, x64, cfg), np)
  np.testing.assert_allclose(outs[1], ref, rtol=5e-2, atol=5e-2)


def test_gmm_impl_off_a_gpu_or_in_float32_is_a_one_line_error():
  """The Hopper kernels of moe_impl='gmm' do not run on the CPU backend, nor multiply float32:
  said, not tried."""
  with pytest.raises(ValueError, match=r"moe_impl='gmm' multiplies in bfloat16 or float16"):
    BASE.replace(moe_impl="gmm", dtype="float32")
  with pytest.raises(ValueError, match=r"moe_impl='gmm' runs on GPUs and TPUs, not on 'cpu'"):
    expert_parallel.grouped_fn(BASE.replace(moe_impl="gmm", dtype="bfloat16"),
                               ParallelPlan.single("cpu"), None, None, None)


def test_the_hopper_kernels_get_the_plans_multiprocessor_count(monkeypatch):
  """The kernels the MoE layer hands over run one program per multiprocessor of the plan's
  GPU (114 on an H100 PCIe, where an H100 SXM's 132 would queue 18 programs behind the
  rest), and an H100 SXM's 132 where the device does not say; the device check gets the
  same count."""
  seen = []
  monkeypatch.setattr(moe_lib.gmm_kernel, "swiglu_gmm", lambda *args: seen.append(args[-1]))
  cfg = BASE.replace(moe_impl="gmm", dtype="bfloat16")
  for sms, want in ((114, 114), (None, 132)):
    monkeypatch.setattr(ParallelPlan, "gpu_sms", property(lambda self, s=sms: s))
    kernel = moe_lib.kernel_for(cfg, ParallelPlan.single("gpu"))
    kernel(None, None, None, None, None, 96, "mosaic")
    assert (seen[-1].num_sms, seen[-1].expected_rows, seen[-1].backend) == (want, 96, "mosaic")
  monkeypatch.setattr(ParallelPlan, "gpu_sms", property(lambda self: 114))
  asked = []
  moe_lib.pin_unchecked_kernels(cfg.replace(moe_impl="auto", d_model=128, d_ff=256),
                                ParallelPlan.single("gpu"), lambda *a: asked.append(a))
  assert asked == [("triton", 114, "bfloat16")]


def test_gmm_picks_mosaic_on_hopper_triton_on_other_gpus_megablox_on_tpus(monkeypatch):
  """The kernels' backend follows the plan: Mosaic GPU (wgmma) at compute capability 9.0,
  Triton on any other (or unknown) GPU, megablox on a TPU."""
  cfg = BASE.replace(moe_impl="gmm", dtype="bfloat16")
  seen = []
  kernel = lambda *args: seen.append(args[-2:])  # (expected_rows, backend)
  plan = ParallelPlan.single("gpu")
  for arch, backend in (("9.0", "mosaic"), ("8.0", "triton"), ("10.0", "triton"),
                        (None, "triton")):
    monkeypatch.setattr(ParallelPlan, "gpu_arch", property(lambda self, a=arch: a))
    expert_parallel.grouped_fn(cfg, plan, None, None, None, kernel, 96)(None, None)
    assert seen[-1] == (96, backend)
  expert_parallel.grouped_fn(cfg, ParallelPlan.single("tpu"), None, None, None, kernel,
                             96)(None, None)
  assert seen[-1] == (96, "megablox")
