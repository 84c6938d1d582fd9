"""The planner's FLOP count from the compiled program (esjax.plan.matmuls): small programs
whose FLOPs are known by hand, GPU HLO formats (Triton split-K GEMM fusions, cuBLAS custom
calls), and the training step of tiny models against the FLOP ledger, with the recompute
the remat policy asks for derived by hand."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from esjax.configs import common, tiny
from esjax.plan import analytic, dryrun, matmuls, targets
from esjax.sharding.layout import Layout
from plan_test import needs_plugin

M, K, N = 16, 32, 24
DOT = 2 * M * K * N  # one [M, K] x [K, N] product
PARTS = {"mlp": "mlp", "experts": "experts", "sched": "sched"}


def _count(fn, *shapes, weights=None, target=None, options=None):
  if target is None:
    lowered = jax.jit(fn).lower(*shapes)
  else:
    mesh = jax.sharding.Mesh(dryrun.devices_for(target, 1), ("x",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    lowered = jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
                                  for s in shapes))
  return matmuls.count(lowered.compile(compiler_options=options).as_text(), PARTS, weights)


def _f32(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_a_dot_in_a_scan_counts_once_per_iteration():
  def f(x, ws):
    def body(h, w):
      with jax.named_scope("mlp"):
        return jnp.tanh(h @ w), None
    return lax.scan(body, x, ws)[0]

  c = _count(f, _f32(M, K), _f32(7, K, K))
  assert c.by_part == {"mlp": 7 * 2 * M * K * K}
  assert c.unknown_loops == [] and c.unpriced == {}


def test_a_conditional_counts_by_its_share_of_executions():
  def f(p, x, w):
    with jax.named_scope("sched"):
      return lax.cond(p, lambda: jnp.tanh(x @ w), lambda: jnp.zeros((M, N)))

  shapes = (_f32(dtype=jnp.bool_), _f32(M, K), _f32(K, N))
  assert _count(f, *shapes, weights={"sched": 0.25}).by_part == {"sched": 0.25 * DOT}
  assert _count(f, *shapes).by_part == {"sched": DOT}  # no share known: every execution


def test_a_fused_dot_and_its_gradients_go_to_their_part():
  def loss(x, w, v):
    with jax.named_scope("mlp"):
      h = jax.nn.silu(x @ w) + 1.0
    with jax.named_scope("experts"):
      return jnp.sum(jnp.tanh(h @ v))

  c = _count(jax.grad(loss, argnums=(0, 1, 2)), _f32(M, K), _f32(K, N), _f32(N, K))
  # Forward and both gradients (input and weight) of each product; the first product's
  # input gradient is needed (x is differentiated).
  assert c.by_part == {"mlp": 3 * DOT, "experts": 3 * DOT}


def test_a_convolution_counts_its_multiply_adds():
  def f(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  c = _count(f, _f32(2, 10, 10, 3), _f32(3, 3, 3, 5))
  assert c.total == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)


_GPU_HLO = """HloModule m, entry_computation_layout={()->f32[]}

%gemm_fusion_dot.3_computation (parameter_0: bf16[64,8,32], parameter_1: bf16[8,32,256]) -> f32[8,64,256] {
  %parameter_0 = bf16[64,8,32]{2,1,0} parameter(0)
  %parameter_1 = bf16[8,32,256]{2,1,0} parameter(1)
  ROOT %dot.6 = f32[8,64,256]{2,1,0} dot(%parameter_0, %parameter_1), lhs_batch_dims={1}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}, metadata={op_name="jit(f)/jvp()/while/body/closed_call/mlp/dot_general" scheduling_name="dot.6"}, backend_config={"sizes":["16"]}
}

%body (p.1: (s32[], bf16[64,256], bf16[256,512])) -> (s32[], bf16[64,256], bf16[256,512]) {
  %p.1 = (s32[], bf16[64,256]{1,0}, bf16[256,512]{1,0}) parameter(0)
  %gte.1 = bf16[64,256]{1,0} get-tuple-element(%p.1), index=1
  %gte.2 = bf16[256,512]{1,0} get-tuple-element(%p.1), index=2
  %custom-call.5 = (bf16[64,512]{1,0}, s8[4194304]{0}) custom-call(%gte.1, %gte.2), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/transpose(jvp(experts))/dot_general"}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %custom-call.6 = (f32[64,8], s8[16]{0}) custom-call(%gte.1), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(f)/attn"}
  %custom-call.7 = f32[64,8] custom-call(%gte.1), custom_call_target="my_kernel", backend_config={"cost_estimate": {"flops": "1000", "transcendentals": 0}}
  %custom-call.8 = bf16[64,512]{1,0} custom-call(%gte.1, %gte.2), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(f)/experts/declared_flops_5000/pallas_call"}
  ROOT %t = (s32[], bf16[64,256]{1,0}, bf16[256,512]{1,0}) tuple(%gte.1, %gte.1, %gte.2)
}

%cond (p.2: (s32[], bf16[64,256], bf16[256,512])) -> pred[] {
  %p.2 = (s32[], bf16[64,256]{1,0}, bf16[256,512]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main () -> f32[] {
  %a = bf16[64,8,32]{2,1,0} constant({...})
  %b = bf16[8,32,256]{2,1,0} constant({...})
  %t0 = (s32[], bf16[64,256]{1,0}, bf16[256,512]{1,0}) constant({...})
  %while.1 = (s32[], bf16[64,256]{1,0}, bf16[256,512]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"},"known_init_step":{"init":"0","step":"1"}}
  %gemm_fusion_dot.3 = f32[8,64,256]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.3_computation, metadata={op_name="jit(f)/mlp/dot_general"}
  ROOT %r = f32[] constant(0)
}
"""


def test_gpu_formats_split_k_fusions_cublas_calls_and_unpriced_kernels():
  """Compiled XLA:GPU text as the deviceless H100 compile prints it (trimmed): a Triton GEMM
  fusion with split-K 8 (K = 8 x 32), a cuBLASLt call in a loop of 3, a cuDNN call without a
  cost, a kernel that declares its cost in its backend config and one (Mosaic GPU's) that
  declares it in its op name."""
  c = matmuls.count(_GPU_HLO, PARTS)
  assert c.by_part == {"mlp": 2 * 64 * 256 * 256,
                       "experts": 3 * 2 * 64 * 512 * 256 + 3 * 5000, matmuls.OTHER: 3 * 1000}
  assert c.unpriced == {"__cudnn$fmhaSoftmax": 3}


@needs_plugin
def test_the_deviceless_h100_compile_is_counted_with_and_without_the_cluster_flags():
  def loss(x, w):
    with jax.named_scope("mlp"):
      return jnp.sum(jnp.tanh(x @ w))

  shapes = (_f32(256, 512, dtype=jnp.bfloat16), _f32(512, 1024, dtype=jnp.bfloat16))
  want = {"mlp": 2 * 2 * 256 * 512 * 1024}  # forward and the weight gradient
  h100 = targets.get("h100")
  grad = jax.grad(loss, argnums=1)
  assert _count(grad, *shapes, target=h100).by_part == want  # Triton GEMM fusions
  assert _count(grad, *shapes, target=h100,
                options=targets.xla_gpu_flags()).by_part == want  # cuBLAS


def test_cluster_flags_are_one_list_for_the_launcher_and_the_planner():
  flags = targets.xla_gpu_flags()
  assert flags["xla_gpu_enable_triton_gemm"] is False
  assert flags["xla_gpu_all_reduce_combine_threshold_bytes"] == "1073741824"


def _tiny(variant, **parallel):
  c = tiny.get_config(variant)
  c.train.batch_size, c.train.seq_len = 8, 32
  for k, v in parallel.items():
    c.parallel[k] = v
  return c


def _ratios(r):
  return {row["part"]: row["ratio"] for row in r.flops}


def test_a_dense_step_runs_the_ledger_flops():
  """One device: projections, MLP and head compile to exactly the model's FLOPs; core
  attention at most the full square (the ledger counts the causal half)."""
  r = dryrun.plan(_tiny("dense"), targets.get("cpu"), 1)
  ratio = _ratios(r)
  for part in ("attn_proj", "mlp", "logits"):
    assert ratio[part] == pytest.approx(1.0, rel=1e-12), part
  assert 1.0 <= ratio["core_attn"] <= 2.0
  assert not set(r.waste) - {"core_attn"}


@pytest.mark.parametrize("parallel", [dict(pp=2, microbatches=2),
                                      dict(pp=2, microbatches=4, virtual_stages=2,
                                           schedule="interleaved")],
                         ids=["1f1b", "interleaved"])
def test_a_pipeline_step_runs_each_chunk_forward_once(parallel):
  """pp=2 at remat=none: every forward unit stores its chunk's residuals and the backward
  unit reuses them, so projections and MLP compile to exactly the model's FLOPs (forward 1 +
  backward 2 per FLOP), as on one device. (Before the residual stash, each chunk but the
  last ran forward again in its backward unit: (3 + 1 + 3) / (2 x 3) = 7/6.)"""
  c = _tiny("dense", **parallel)
  c.model.remat, c.model.n_layers = "none", 4
  ratio = _ratios(dryrun.plan(c, targets.get("cpu"), 2))
  for part in ("attn_proj", "mlp", "logits"):
    assert ratio[part] == pytest.approx(1.0, rel=1e-12), part


def test_a_pipeline_step_recomputes_what_the_remat_policy_asks():
  """remat=full on pp=2: each layer's forward runs again in its backward, as the policy
  says, and nothing more. What the backward reads is recomputed: the attention projections
  all (the block's second norm reads their sum), so (1 + 2 + 1) / 3 = 4/3; of the SwiGLU
  MLP the gate and up products but not the down product (the block output is not read):
  (1 + 2 + 2/3) / 3 = 11/9; the head (not under the layer policy) once."""
  c = _tiny("dense", pp=2, microbatches=2)
  c.model.remat = "full"
  ratio = _ratios(dryrun.plan(c, targets.get("cpu"), 2))
  assert ratio["attn_proj"] == pytest.approx(4 / 3, rel=1e-12)
  assert ratio["mlp"] == pytest.approx(11 / 9, rel=1e-12)
  assert ratio["logits"] == pytest.approx(1.0, rel=1e-12)


@needs_plugin
def test_the_gpu_microbatch_loop_with_tp_runs_each_forward_once():
  """One stage, dp4 tp2, 4 microbatches, compiled for 8 H100s with the cluster flags: the
  model's FLOPs exactly. (With XLA:GPU's pipelined all-gather on, the forward after each tp
  all-gather was cloned: 5/3.)"""
  c = _tiny("dense", tp=2, microbatches=4)
  c.train.batch_size = 32
  c.model.remat = "none"
  ratio = _ratios(dryrun.plan(c, targets.get("h100"), 8))
  for part in ("attn_proj", "mlp", "logits"):
    assert ratio[part] == pytest.approx(1.0, rel=1e-12), part


def test_moe_experts_padded_to_capacity_run_capacity_rows():
  """Token dropping with buffers padded to capacity: each expert multiplies exactly
  C = ceil(T k / E x cf) rows, so the experts run E x C / (T x k) of the model's FLOPs."""
  c = _tiny("moe")
  c.model.capacity_factor, c.model.pad_to_capacity = 1.5, True
  r = dryrun.plan(c, targets.get("cpu"), 1)
  t, k, e = 8 * 32, 2, 8
  cap = -(-t * k * 3 // (e * 2))  # ceil(T k / E x 1.5)
  assert _ratios(r)["experts"] == pytest.approx(e * cap / (t * k), rel=1e-12)
  assert "experts" not in r.waste


def test_dense_expansion_of_ragged_dot_is_flagged_as_waste():
  """XLA:CPU (like XLA:GPU for several local experts) lowers lax.ragged_dot to a dense dot
  against every expert: E x the routed FLOPs, which the plan must flag."""
  c = _tiny("moe")
  c.model.moe_impl = "ragged"
  r = dryrun.plan(c, targets.get("cpu"), 1)
  assert r.waste["experts"] == pytest.approx(8.0, rel=1e-12)
  assert r.to_json()["waste"] == r.waste
  assert any(n.startswith("experts: lax.ragged_dot runs 8.00x") and "moe_impl=auto (or gmm)" in n
             for n in r.notes), r.notes
  blocked = dryrun.plan(_tiny("moe"), targets.get("cpu"), 1)  # auto: blocked on the CPU
  assert not any(n.startswith("experts:") for n in blocked.notes), blocked.notes


def test_the_calibration_plans_the_config_the_mfu_benchmark_times():
  from benchmarks import mfu, plan_calibration  # pylint: disable=g-import-not-at-top
  from esjax.configs import common  # pylint: disable=g-import-not-at-top
  cfg, batch, seq = mfu.CONFIGS["gpu-mixtral"]
  c = plan_calibration.config_for("gpu-mixtral")
  assert common.model_config(c) == cfg.replace(dtype="bfloat16")
  assert (c.train.batch_size, c.train.seq_len) == (batch, seq)


def test_core_attention_is_recomputed_as_the_compiled_kernel_shows():
  """The chunked attention kernel compiled on the CPU: at remat=none a pp2 step runs core
  attention exactly as a pp1 step does (the stash keeps its residuals: no forward again),
  and remat=full or dots_except_mlp adds one forward (2 products) to its 2 + 5. The planner's
  cuDNN price adds a recomputed forward by `Work.attention_recompute`, which must say the
  same."""
  def core(remat, **parallel):
    c = _tiny("dense", **parallel)
    c.model.remat, c.model.n_layers, c.model.attention_impl = remat, 4, "chunked"
    compiled = {row["part"]: row["compiled"] for row in dryrun.plan(c, targets.get("cpu"),
                                                                   2).flops}["core_attn"]
    work = analytic.Work(common.model_config(c), Layout.from_config(c.parallel),
                         c.train.batch_size, c.train.seq_len)
    return compiled, work.attention_recompute

  plain, _ = core("none", dp=2)
  stored, stored_recompute = core("none", pp=2, microbatches=2)
  again, again_recompute = core("full", pp=2, microbatches=2)
  assert stored == plain and stored_recompute == 0.0
  assert again / stored == pytest.approx(9 / 7, rel=1e-12) and again_recompute == 1.0
  # A policy that saves the projections still runs the kernel's forward again (its softmax
  # statistics are not among the saved names).
  named, named_recompute = core("dots_except_mlp", dp=2)
  assert named / plain == pytest.approx(9 / 7, rel=1e-12) and named_recompute == 1.0
