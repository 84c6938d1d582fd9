"""The performance benchmarks: fields, FLOPs from the ledger, memory that grows with size."""

import json
import os

import pytest

from benchmarks import memory, mfu


def test_mfu_row_matches_ledger(monkeypatch, capsys):
  cfg, _, _ = mfu.CONFIGS["tiny-moe"]
  monkeypatch.setitem(mfu.CONFIGS, "tiny-moe", (cfg.replace(n_layers=1), 2, 16))
  mfu.main(["--configs", "tiny-moe", "--repeats", "2", "--matmul_n", "128"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  row, summary = rows
  # Hand count for 1 layer of tiny-mixtral at sequence 16 (d_model 64, 4 query and 2 KV heads
  # of 16, 2 of 8 experts with d_ff 128, vocab 256): multiply-adds per token, then x2 FLOPs
  # x3 for training. Core attention: QK^T and AV over the causal half of 16 keys.
  proj = 64 * 64 + 2 * 64 * 32 + 64 * 64
  core = 2 * (16 // 2) * 4 * 16
  assert row["flops_per_token"] == 6 * (proj + core + 2 * 3 * 64 * 128 + 64 * 256) == 473088
  assert (row["batch_size"], row["seq_len"], row["n_experts"], row["top_k"]) == (2, 16, 8, 2)
  # Timed fields (mfu, tokens_per_s, peak) are the benchmark's to measure, not a test's: on a
  # loaded machine the "peak" matmul can run slower than the step. Only their presence here.
  assert {"mfu", "tokens_per_s", "step_ms"} <= set(row) and "peak_gflops_per_s" in summary
  assert row["peak_bytes"] >= row["argument_bytes"] > 0


@pytest.mark.slow  # four compiles: ~50 s on the shared 2-core CPU
def test_memory_grows_with_experts_and_seq(monkeypatch):
  cfg, _, _ = mfu.CONFIGS["tiny-moe"]
  monkeypatch.setitem(mfu.CONFIGS, "tiny-moe", (cfg.replace(n_layers=1), 2, 16))
  e4, e16 = memory.point("tiny-moe", 4, None), memory.point("tiny-moe", 16, None)
  assert e16["argument_bytes"] > e4["argument_bytes"]  # 4x the expert weights and Adam state
  s16, s128 = memory.point("tiny-moe", None, 16), memory.point("tiny-moe", None, 128)
  assert s128["temp_bytes"] > s16["temp_bytes"]  # activations scale with tokens


def test_routing_rows_compare_kernel_and_reference(capsys):
  from benchmarks import routing  # pylint: disable=g-import-not-at-top
  routing.main(["--shapes", "mixtral,deepseek", "--tokens", "200", "--rounds", "1",
                "--inner", "1"])
  *rows, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["shape"], r["experts"], r["top_k"]) for r in rows] == [("mixtral", 8, 2),
                                                                   ("deepseek", 256, 8)]
  for r in rows:  # 200 tokens: not a block multiple, so the kernel pads and masks
    assert r["same_as_reference"], r
    assert r["floor_bytes"] == 200 * r["experts"] * 4 + 200 * r["top_k"] * 8 + r["experts"] * 4
  assert summary["all_same_as_reference"]


@pytest.mark.slow
def test_folding_pair_reports_bytes_time_and_the_same_loss(capsys):
  from benchmarks import folding  # pylint: disable=g-import-not-at-top
  folding.main(["--layouts", "tp2-etp2-ep4,tp2-etp1-ep8", "--steps", "1"])
  unfolded, folded, summary = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert "edp1-ep4-etp2|" in unfolded["mesh"] and "ep8-etp1|" in folded["mesh"]
  for row in (unfolded, folded):
    assert row["by_op_mib"]["all-to-all"] > 0 and row["step_ms"] > 0
  # ETP's all-gather of tokens before the experts and reduce-scatter of their partial sums
  # after, over the expert-tensor axis: the unfolded layout has them, the folded (etp=1) not.
  assert any(k.startswith("reduce-scatter@") and "tp_etp" in k for k in unfolded["by_axes_mib"])
  assert not any("etp" in k.split("@")[1] for k in folded["by_axes_mib"])
  assert summary["same_loss"]


def test_data_benchmark_reports_start_memory_and_throughput(capsys, tmp_path):
  from benchmarks import data  # pylint: disable=g-import-not-at-top
  data.main(["--sizes", "200K,400K", "--seq_len", "64", "--batch", "4", "--read_batches",
             "5", "--doc_tokens", "100", "--prepare_mb", "0.2", "--workers", "1", "--vocab",
             "300", "--dir", str(tmp_path)])
  rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  summary = rows[-1]
  assert [r["corpus_tokens"] for r in summary["read"].values()] == [200_000, 400_000]
  for r in summary["read"].values():
    assert r["start_s"] > 0 and r["read_tokens_per_s"] > 0 and r["rss_anon_mib"] >= 0
    assert r["windows"] <= r["corpus_tokens"] // 65 and r["disk_mib"] > 0
  assert list(summary["prepare"]) == ["tokenizers/1", "auto/1"]
  slow, fast = summary["prepare"].values()
  assert (slow["encoded_by"], fast["encoded_by"]) == ("tokenizers", "tiktoken")
  assert slow["tokens"] == fast["tokens"] > 0 and fast["tokens_per_cpu_s"] > 0
  assert set(summary["encode_only_tokens_per_s"]) == {"tokenizers", "tiktoken"}
  assert sorted(os.listdir(tmp_path)) == ["bpe.json", "stdlib.jsonl"]  # corpora deleted


def test_attention_layer_temporaries_grow_linearly_with_chunked():
  """benchmarks.memory --attn-seqs at 256, 512, 1024: with the chunked kernel each doubling
  adds twice the bytes of the one before (linear, plus a constant); the plain path grows more
  than 8x over the 4x longer sequence (quadratic)."""
  from benchmarks import attention  # pylint: disable=g-import-not-at-top
  temps = {}
  for impl, seqs in (("xla", (256, 1024)), ("chunked", (256, 512, 1024))):
    cfg = attention.layer_config(2, 1, 8, 16, attention_impl=impl)
    temps[impl] = [attention.layer_memory(cfg, 1, s)["temp_bytes"] for s in seqs]
  t = temps["chunked"]
  assert 1.8 < (t[2] - t[1]) / (t[1] - t[0]) < 2.2, temps
  assert temps["xla"][1] > 8 * temps["xla"][0], temps


def test_attention_benchmark_rows(capsys):
  """One row per kernel; `+plain` tells the kernel the positions are plain: the plain path's
  block split then holds the logits of 3/4 of S x S, and its compiled temporaries shrink."""
  from benchmarks import attention  # pylint: disable=g-import-not-at-top
  attention.main(["--impl", "xla,xla+plain,chunked", "--seq", "64", "--heads", "2",
                  "--kv-heads", "1", "--head-dim", "8", "--repeats", "1"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["impl"], r["resolved"], r["seq"]) for r in rows] == [
      ("xla", "xla", 64), ("xla+plain", "xla", 64), ("chunked", "chunked", 64)]
  assert all(r["fwd_bwd_ms"] > 0 and r["temp_bytes"] > 0 for r in rows)
  assert rows[1]["temp_bytes"] < rows[0]["temp_bytes"]
  with pytest.raises(SystemExit, match="xla\\+fast"):
    attention.main(["--impl", "xla+fast"])


def test_gmm_benchmark_rows_agree_with_ragged(capsys):
  """The CPU smoke run (kernels interpreted): one row per implementation, the kernels'
  output and gradients within bfloat16 rounding of ragged_dot's."""
  from benchmarks import gmm  # pylint: disable=g-import-not-at-top
  gmm.main(["--shapes", "tiny", "--rounds", "1"])
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [r["impl"] for r in rows[:-1]] == ["gmm", "ragged", "dense"]
  assert rows[0]["max_rel_diff_vs_ragged"] < 2e-2 and rows[0]["routed_rows"] == 120
  assert rows[-1]["summary"] == "gmm" and rows[-1]["tiny"]["gmm_over_dense"] > 0


def test_grad_overlap_counts_compute_between_a_reduce_scatters_start_and_done():
  """The schedule reader of benchmarks.grad_overlap, on scheduled HLO text: compute between
  a start and its own done counts (in that computation only); a bare start/done does not."""
  from benchmarks import grad_overlap  # pylint: disable=g-import-not-at-top
  hlo = """%body (p: f32[8]) -> f32[8] {
  %rs = ((f32[8]), f32[4]) reduce-scatter-start(%p), channel_id=1
  %f = f32[8]{0} fusion(%p), kind=kLoop
  %d = f32[4]{0} reduce-scatter-done(%rs)
  %rs.1 = ((f32[8]), f32[4]) reduce-scatter-start(%p), channel_id=2
  %d.1 = f32[4]{0} reduce-scatter-done(%rs.1)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %rs.2 = ((f32[8]), f32[4]) reduce-scatter-start(%a), channel_id=3
  %d.2 = f32[4]{0} reduce-scatter-done(%rs.2)
  ROOT %w = f32[8]{0} while(%a), condition=%c, body=%body
}
"""
  assert grad_overlap.overlaps(hlo) == (3, 1)
