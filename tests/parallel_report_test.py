"""The comm report: HLO replica-group formats, loop trip counts, and EP bytes from first principles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from esjax.models.config import ModelConfig
from esjax.parallel.pipeline import Engine
from esjax.plan import report
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan
from esjax.train import state as state_lib, step as step_lib


def test_group_formats():
  assert report._groups("replica_groups={{0,1},{2,3}}, dimensions={0}", 4) == [[0, 1], [2, 3]]
  assert report._groups("replica_groups=[2,4]<=[8], dimensions={0}", 8) == [
      [0, 1, 2, 3], [4, 5, 6, 7]]
  assert report._groups("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == [
      [0, 4], [1, 5], [2, 6], [3, 7]]
  # Mesh format: axis_0 grouped, with a device permutation.
  text = ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) "
          "{'axis_0'}, use_global_device_ids=true")
  ids = np.arange(8).reshape(4, 2).T.reshape(2, 1, 4)
  assert report._groups(text, 8) == [[int(ids[0, 0, j]), int(ids[1, 0, j])] for j in range(4)]
  assert report._groups("replica_groups=mesh['a'=4,'b'=2] {'b'}, x", 8) == [
      [0, 1], [2, 3], [4, 5], [6, 7]]
  assert report._groups("source_target_pairs={{0,1},{1,0},{2,2}}, x", 4) == [[0, 1], [1, 0]]
  assert report._groups("replica_groups={}, to_apply=%add", 4) == [[0, 1, 2, 3]]
  assert report._span([[0, 4], [1, 5]], (2, 2, 2), ("a", "b", "c")) == ("a",)
  assert report._span([[0, 1, 2, 3]], (2, 2, 2), ("a", "b", "c")) == ("b", "c")


def test_loop_trip_counts_multiply():
  hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %all-reduce.1 = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %all-reduce.1)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %all-gather.2 = f32[16]{0} all-gather(%a), channel_id=2, replica_groups={{0,1}}, dimensions={0}
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""
  rows = {c.op: c for c in report.collectives(hlo, (2,), ("x",))}
  assert rows["all-reduce"].count == 3
  assert rows["all-reduce"].bytes == 3 * 2 * (1 / 2) * 32  # 2(n-1)/n * 32 bytes, 3 times
  assert rows["all-gather"].count == 1 and rows["all-gather"].bytes == 0.5 * 64


def test_async_start_ops_count_their_results():
  """XLA:GPU's async collectives print (operands, results[, context]): the results move."""
  hlo = """HloModule m

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %rs = ((f32[8]{0}), f32[4]{0}) reduce-scatter-start(%a), channel_id=1, replica_groups={{0,1}}, dimensions={0}, to_apply=%add
  %ag = (f32[4]{0}, f32[8]{0}) all-gather-start(%a), channel_id=2, replica_groups={{0,1}}, dimensions={0}
  %cp = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%a), channel_id=3, source_target_pairs={{0,1},{1,0}}
  ROOT %r = f32[8]{0} add(%a, %a)
}
"""
  rows = {c.op: c.bytes for c in report.collectives(hlo, (2,), ("x",))}
  assert rows == {"reduce-scatter": 1 * 16, "all-gather": 0.5 * 32, "collective-permute": 32}


def test_conditional_branches_weighted_by_scope():
  """A collective inside the true branch of a conditional traced in a weighted scope runs
  trip count x weight times; one in an unweighted conditional runs every time."""
  hlo = """HloModule m

%yes (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1}}, to_apply=%add
}

%no (q: f32[8]) -> f32[8] {
  ROOT %q = f32[8]{0} parameter(0)
}

%body (b: (s32[], f32[8])) -> (s32[], f32[8]) {
  %b = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%b), index=1
  %c = f32[8]{0} conditional(%pred, %x, %x), true_computation=%yes, false_computation=%no, metadata={op_name="jit(f)/while/body/esjax_unit_f/cond"}
  ROOT %t = (s32[], f32[8]) tuple(%i, %c)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""
  weighted = report.collectives(hlo, (2,), ("x",), {"esjax_unit_f": 0.25})
  assert weighted[0].count == 8 * 0.25 and weighted[0].bytes == 2 * 32 * 0.5 * 8 * 0.25
  assert report.collectives(hlo, (2,), ("x",))[0].count == 8


def test_expert_all_to_all_bytes_match_the_dispatch_buffers():
  """dp=ep=8, one stage: per MoE layer the backward unit's forward sends rows, ids and
  results and its backward two cotangents (the forward unit of the only chunk is skipped).
  Every buffer holds ep * T_l * min(k, E/ep) rows."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                    n_experts=8, top_k=2)
  batch, seq, ep = 8, 16, 8
  plan = make_plan(Layout(dp=8, ep=ep))
  engine = Engine.build(cfg, plan)
  tx = optax.sgd(0.1)
  shapes = state_lib.abstract_train_state(engine, tx)
  sh = jax.tree.map(lambda s: s.sharding, shapes)
  step = jax.jit(step_lib.make_train_step(engine, tx, optax.constant_schedule(0.1), shapes),
                 in_shardings=(sh, None))
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  compiled = step.lower(shapes, {"inputs": tokens, "targets": tokens}).compile()
  rows = report.collectives(compiled.as_text(), tuple(plan.mesh.devices.shape),
                            plan.mesh.axis_names, engine.branch_weights())
  a2a = sum(c.bytes for c in rows if c.op == "all-to-all" and c.axes == plan.ep)
  t_local = batch * seq // 8
  buffer_rows = ep * t_local * min(cfg.top_k, cfg.n_experts // ep)
  per_layer = 4 * buffer_rows * cfg.d_model * 4 + buffer_rows * 4  # 4 f32 row buffers + ids
  assert a2a == cfg.n_layers * per_layer * (ep - 1) / ep
