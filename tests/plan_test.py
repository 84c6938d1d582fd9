"""The dry-run planner: argument bytes from first principles, fitting, the GPU paths compiled
deviceless for H100s, and the layout search."""

import dataclasses
import importlib.util
import json
import math
import re

import pytest

from esjax.configs import common, presets, tiny
from esjax.parallel.schedule import make_schedule
from esjax.plan import dryrun, hlo, matmuls, search, table, targets
from esjax.routing import expert_parallel
from esjax.sharding.layout import Layout, check_model
from parallel_residuals_test import bf16_moe_pipeline, compiled_stash



def _has_cuda_plugin() -> bool:
  try:  # find_spec of a submodule raises when its namespace package is absent too
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


GPU = _has_cuda_plugin()
needs_plugin = pytest.mark.skipif(
    not GPU, reason="jax-cuda12-plugin is not installed (pip install -r requirements-plan.txt)")


def dense_config(**parallel):
  c = tiny.get_config("dense")
  c.train.batch_size, c.train.seq_len = 8, 32
  for k, v in parallel.items():
    c.parallel[k] = v
  return c


def test_argument_bytes_are_the_state_shards():
  """Arguments = master weights + two Adam moments (float32) of this device's shards + the
  int32 step counters (Adam's, the learning-rate schedule's, the train step's) + this
  device's rows of the batch. Shards from the layout by hand: tp=2 splits heads, MLP width
  and vocabulary; the norms are replicated; dp replicates everything (no ZeRO)."""
  c = dense_config(dp=4, tp=2)
  r = dryrun.plan(c, targets.get("cpu"), 8)
  cfg = common.model_config(c)
  d, v, layers, h, kv, f = (cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.n_heads,
                            cfg.n_kv_heads, cfg.d_ff)
  hd = cfg.effective_head_dim
  tp = 2
  per_layer = (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f) / tp + 2 * d
  params = layers * per_layer + 2 * v * d / tp + d
  counters = 3 * 4
  batch = 2 * (c.train.batch_size // 4) * c.train.seq_len * 4  # inputs, targets over dp
  assert r.memory["arguments"] == 3 * 4 * params + counters + batch


def test_distributed_optimizer_divides_the_state():
  plain = dryrun.plan(dense_config(dp=8), targets.get("cpu"), 8)
  zero1 = dryrun.plan(dense_config(dp=8, distributed_optimizer=True), targets.get("cpu"), 8)
  # Every matrix splits over the 8 replicas; norms and counters are small.
  assert zero1.memory["arguments"] < plain.memory["arguments"] / 6


def test_a_layout_that_cannot_fit_says_so():
  small = dataclasses.replace(targets.get("cpu"), memory_bytes=1e6)
  r = dryrun.plan(dense_config(dp=8), small, 8)
  assert not r.fits and r.to_json()["fits"] is False
  text = table.format_result(r, small)
  assert "fits: NO" in text
  # Strict JSON (no Infinity), links of fake devices are not NVLink, sizes in readable units.
  json.dumps(dryrun.plan(dense_config(dp=8), targets.get("cpu"), 8).to_json(), allow_nan=False)
  assert {c["link"] for c in r.collectives} == {"host"}
  assert " MiB" in text or " KiB" in text


@needs_plugin
def test_the_peak_is_the_allocation_not_the_remat_passs_estimate():
  """A loop carrying 50 GiB whose body takes one of two branches, each making a 30 GiB
  cuBLAS output, compiled deviceless for one H100: the executable allocates 50 + 30 GiB (one
  branch runs at a time); XLA's rematerialization pass estimates 50 + 30 + 30 (it adds the
  branches up) and logs that it cannot get under its limit. The plan's peak is the
  allocation, with the estimate beside it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  h100 = targets.get("h100")
  sharding = jax.sharding.SingleDeviceSharding(dryrun.devices_for(h100, 1)[0])
  gib, cols = 2**30, 1 << 16
  carry_rows, temp_rows = 50 * gib // 2 // cols, 30 * gib // 2 // cols  # bf16

  def temporary(x, i):  # a [temp_rows, cols] GEMM output, reduced by another GEMM
    big = (jnp.broadcast_to(x[:64], (temp_rows, 64)) * (i + 1).astype(x.dtype)
           ) @ jnp.broadcast_to(x, (64, cols))
    return (jnp.ones((1, temp_rows), x.dtype) @ big)[0]

  def f(x):
    def body(i, carry):
      row = lax.cond(i % 2 == 0, lambda: temporary(x, i), lambda: temporary(3 * x, i))
      return lax.dynamic_update_index_in_dim(carry, row[None], i, 0)
    return lax.fori_loop(0, 4, body, jnp.zeros((carry_rows, cols), x.dtype))[:, :8].sum()

  lowered = jax.jit(f).lower(jax.ShapeDtypeStruct((cols,), jnp.bfloat16, sharding=sharding))
  with dryrun._compiler_log() as log:  # pylint: disable=protected-access
    compiled = lowered.compile()
  memory = dryrun._memory(  # pylint: disable=protected-access
      compiled.memory_analysis(), log[0], h100)
  assert "remat_reached" in memory
  assert memory["remat_reached"] == pytest.approx(110 * gib, rel=0.01)
  assert memory["peak"] == pytest.approx(80 * gib, rel=0.01)


def test_a_failed_remat_pass_is_shown_beside_the_allocation():
  """The compiler's log line is parsed into the estimate and the limit; the peak stays the
  larger of the allocation and the compiler's own peak."""
  log = ("W1207 hlo_rematerialization.cc:3231] Can't reduce memory use below 60.55GiB "
         "(65017464044 bytes) by rematerialization; only reduced to 137.37GiB (147497037887 "
         "bytes), down from 138.19GiB (148379039531 bytes) originally\n")
  stats = dataclasses.make_dataclass("Stats", [
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes", "peak_memory_in_bytes"])(8, 4, 4, 100, 90)
  memory = dryrun._memory(stats, log, targets.get("h100"))  # pylint: disable=protected-access
  assert "remat_reached" in memory
  assert (memory["remat_limit"], memory["remat_reached"]) == (65017464044, 147497037887)
  assert memory["buffers"] == memory["peak"] == 8 + 4 - 4 + 100
  assert "remat_reached" not in dryrun._memory(stats, "", targets.get("h100"))  # pylint: disable=protected-access


@needs_plugin
def test_tiny_moe_compiles_for_8_h100s_with_the_gpu_paths():
  """Deviceless XLA:GPU: the step compiles for sm_90 with the GPU code paths (ragged EP
  exchange, ragged_dot experts), and the prediction is a real number."""
  c = tiny.get_config("moe")
  c.train.batch_size, c.train.seq_len = 16, 64
  c.parallel.dp, c.parallel.tp, c.parallel.ep, c.parallel.etp = 4, 2, 8, 1
  c.parallel.pp, c.parallel.microbatches = 1, 2
  r = dryrun.plan(c, targets.get("h100"), 8)
  ops = {x["op"] for x in r.collectives}
  assert "ragged-all-to-all" in ops and r.fits
  j = r.to_json()
  for key in ("peak_bytes_per_device", "fits", "collective_bytes_per_step",
              "predicted_step_s", "predicted_mfu"):
    assert key in j
  assert 0 < j["predicted_mfu"] < 1 and j["predicted_step_s"] > 0
  assert {x["link"] for x in r.collectives} <= {"nvlink"}  # one node of 8


def test_search_enumerates_valid_layouts_and_ranks_fitting_first():
  c = dense_config()
  cfg = common.model_config(c)
  lays = list(search.layouts(cfg, 8, 8, 32, per_node=8))
  assert lays and all(l.n_devices == 8 for l in lays)
  assert len({str(l) for l in lays}) == len(lays)
  assert all(cfg.n_heads % l.tp == 0 and cfg.n_layers % l.pp == 0 for l in lays)
  target = targets.get("h100")
  ranked = search.candidates(cfg, 8, 8, 32, target)
  fits = [x.memory <= target.usable_bytes for x in ranked]
  assert fits == sorted(fits, reverse=True)  # fitting ones first
  times = [x.time for x in ranked if x.memory <= target.usable_bytes]
  assert times == sorted(times)
  assert math.isfinite(times[0])


@pytest.mark.parametrize("name", sorted(presets.CLUSTERS))
def test_every_shipped_preset_layout_fits_its_model(name):
  """Each GPU preset's layout, at its own cluster size, passes the model checks the step
  makes before compiling (vocabularies tp does not divide are padded, not refused)."""
  c = presets.get_config(name)
  layout = Layout.from_config(c.parallel).resolve(presets.CLUSTERS[name][0])
  check_model(layout, common.model_config(c), seq_len=c.train.seq_len,
              batch=c.train.batch_size)


@pytest.mark.slow
@needs_plugin
@pytest.mark.parametrize("name", sorted(presets.CLUSTERS))
def test_every_shipped_preset_compiles_for_its_cluster(name):
  r = dryrun.plan(presets.get_config(name), targets.get("h100"), presets.CLUSTERS[name][0])
  assert r.memory["peak"] > 0 and r.prediction["predicted_step_s"] > 0
  assert {row["part"] for row in r.flops} >= {"attn_proj", "core_attn", "logits"}


def test_long_context_step_memory_is_the_activations_that_must_live():
  """The tiny MoE's step at sequence 16,384 (compiled, not run): its temporaries stay within
  2x the float32 activations the backward needs per token, counted by hand: per layer the
  residual, the two norms, q, the attention output and its projection, the MLP input and
  output (8 d), k and v (2 kv hd), the router logits (E), and per routed assignment the
  gathered row and the expert output (2 d) and gate, up and their product (3 F); then the
  logits, their softmax and gradient (3 V). Linear in S: the scan over layers once kept
  every attention block's mask (5.4 GiB here, O(S^2))."""
  c = tiny.get_config("moe")
  c.train.seq_len = c.model.max_seq_len = 16384
  c.train.batch_size = 1
  cfg = common.model_config(c)
  d, f, k = cfg.d_model, cfg.effective_d_ff_expert, cfg.top_k
  per_layer = 8 * d + 2 * cfg.n_kv_heads * cfg.effective_head_dim + cfg.n_experts + k * (
      2 * d + 3 * f)
  per_token = 4 * (cfg.n_layers * per_layer + 3 * cfg.vocab_size)
  r = dryrun.plan(c, targets.get("cpu"), 1)
  assert r.memory["temporaries"] <= 2 * per_token * 16384, (
      r.memory["temporaries"] / 2**20, per_token * 16384 / 2**20)


def _expert_operand_widths(hlo_text: str) -> list[tuple[int, str]]:
  """(last dimension, instruction) of each array of rank >= 2 that a matmul (dot or custom
  call: cuBLAS, a kernel) in the routed experts' scope produces or reads."""
  shapes = {}
  found = []
  for line in hlo_text.splitlines():
    m = hlo.INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    shapes[name] = shape
    if (opcode not in ("dot", "custom-call")
        or expert_parallel.SCOPE_EXPERTS not in hlo.scopes(hlo.op_name(line))):
      continue
    for operand in [name, *matmuls._operands(rest)]:  # pylint: disable=protected-access
      for _, dims in hlo.dims(shapes.get(operand, "")):
        if len(dims) >= 2:
          found.append((dims[-1], f"{operand}: {line.strip()[:160]}"))
  return found


@needs_plugin
def test_qwen2_experts_on_h100_read_no_operand_wider_than_a_weight():
  """Qwen2-57B-A14B's MoE layer (64 experts, 16 per EP rank, D 3584, F 2560) compiled for 8
  H100s deviceless with the preset's moe_impl ('auto': the grouped-matmul kernels on GPUs):
  no array in the experts' scope is wider than the widest weight (moe_impl='ragged' lowers
  to a dense dot over [rows, 16 x 3584])."""
  c = presets.get_config("qwen2-57b-a14b")
  c.model.n_layers, c.train.batch_size, c.train.seq_len = 1, 8, 1024
  assert common.model_config(c).moe_impl == "auto"
  for k, v in dict(pp=1, dp=4, tp=2, ep=4, etp=1, schedule="1f1b", virtual_stages=1,
                   microbatches=1).items():
    c.parallel[k] = v
  r = dryrun.plan(c, targets.get("h100"), 8)
  cfg = common.model_config(c)
  widest = max(cfg.d_model, cfg.effective_d_ff_expert)
  assert "mosaic_gpu" in r.hlo  # the Hopper kernels: an H100 topology reports 9.0
  widths = _expert_operand_widths(r.hlo)
  assert widths, "no instruction in the experts' scope"
  too_wide = [w for w in widths if w[0] > widest]
  assert not too_wide, too_wide[:3]
  experts = {x["part"]: x for x in r.flops}["experts"]
  # The model's FLOPs times remat="full"'s recomputed forward (4/3) times the row blocks
  # (1,024 tokens x top-8 in 128-row blocks, one more per local expert: 80 / 64); ragged_dot
  # multiplies every row by all 16 local experts.
  assert experts["ratio"] <= 4 / 3 * 80 / 64 + 1e-9, experts


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_searchs_stash_estimate_is_the_compiled_stash_within_2x(remat):
  """`search.stash_bytes` against the stash the compiled pp2 step of a bf16 MoE carries
  through its tick loop (its arrays with one row per slot): within a factor 2 at remat none
  (every residual) and full (the chunk inputs)."""
  c = bf16_moe_pipeline(remat)
  r = dryrun.plan(c, targets.get("cpu"), 4)
  lay = Layout.from_config(c.parallel).resolve(4)
  slots = make_schedule(lay.schedule, lay.pp, lay.microbatches, lay.virtual_stages).slots
  compiled = sum(b for *_, b in compiled_stash(r.hlo, slots))
  estimate = search.stash_bytes(common.model_config(c), lay, c.train.batch_size,
                                c.train.seq_len)
  assert 0.5 <= estimate / compiled <= 2, (estimate, compiled)
