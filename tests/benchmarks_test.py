"""The performance benchmarks: fields, FLOPs from the ledger, memory that grows with size."""

import json

import pytest

from benchmarks import memory, mfu
from esjax.train import flops


def test_mfu_row_matches_ledger(monkeypatch, capsys):
  cfg, _, _ = mfu.CONFIGS["tiny-moe"]
  monkeypatch.setitem(mfu.CONFIGS, "tiny-moe", (cfg.replace(n_layers=1), 2, 16))
  mfu.main(["--configs", "tiny-moe", "--repeats", "2", "--matmul_n", "128"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  row, summary = rows
  assert row["flops_per_token"] == flops.flops_per_token(cfg.replace(n_layers=1), 16)
  tps = row["tokens_per_s"]
  assert tps == pytest.approx(2 * 16 / (row["step_ms"] / 1e3), rel=1e-3)
  assert row["mfu"] == pytest.approx(
      row["flops_per_token"] * tps / (summary["peak_gflops_per_s"] * 1e9), rel=1e-2)
  assert row["peak_bytes"] >= row["argument_bytes"] > 0


@pytest.mark.slow  # four compiles: ~50 s on the shared 2-core CPU
def test_memory_grows_with_experts_and_seq(monkeypatch):
  cfg, _, _ = mfu.CONFIGS["tiny-moe"]
  monkeypatch.setitem(mfu.CONFIGS, "tiny-moe", (cfg.replace(n_layers=1), 2, 16))
  e4, e16 = memory.point("tiny-moe", 4, None), memory.point("tiny-moe", 16, None)
  assert e16["argument_bytes"] > e4["argument_bytes"]  # 4x the expert weights and Adam state
  s16, s128 = memory.point("tiny-moe", None, 16), memory.point("tiny-moe", None, 128)
  assert s128["temp_bytes"] > s16["temp_bytes"]  # activations scale with tokens
