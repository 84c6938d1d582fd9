"""Checkpoints outlive their layout: a run resumed under another parallel layout (pp,
virtual stages, tp, ep, cp, dp, number of devices, ZeRO-1, fsdp) continues exactly, optimizer
state and data position included, as an uninterrupted run; and a checkpoint written before
the per-layer format (tests/fixtures/legacy_checkpoint, made with commit 697efe8) resumes."""

import json
import os
import shutil

import pytest

from esjax.train import loop, metrics
from fixtures import make_legacy_checkpoint as legacy

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_checkpoint")


def corpus_file(tmp_path) -> str:
  path = tmp_path / "corpus.py.txt"
  path.write_text(legacy.corpus())
  return str(path)


def config(source, steps, **parallel):
  """A 4-layer MoE (8 experts, 2 KV heads: every layout below divides it), 2 microbatches
  of 8."""
  c = legacy.config(source)
  c.model.update(dict(n_layers=4, d_model=32, d_ff=32, n_heads=4, n_kv_heads=2, n_experts=8))
  c.train.steps = steps
  c.checkpoint.every = 1
  c.train.batch_size = 16
  c.parallel.update(dict(pp=1, dp=1, microbatches=2))  # the same microbatches everywhere:
  # the router's balance loss is a function of the microbatch
  c.parallel.update(parallel)
  return c


def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}


# Each resumes the run left by the one before it, for one step.
CHAIN = [
    dict(pp=2),
    dict(pp=1),
    dict(pp=2, virtual_stages=2, schedule="interleaved"),
    dict(tp=2, ep=4, etp=1, dp=2),
    dict(cp=2, dp=4),
    dict(dp=8),
    dict(dp=4),  # 4 of the 8 devices
    dict(dp=8, distributed_optimizer=True),  # ZeRO-1
    dict(dp=2, tp=2, fsdp=True),
]


def test_a_run_resumed_on_each_layout_in_turn_matches_an_uninterrupted_run(tmp_path):
  source = corpus_file(tmp_path)
  straight = str(tmp_path / "straight")
  loop.train_and_evaluate(config(source, len(CHAIN)), straight)
  chain = str(tmp_path / "chain")
  for step, layout in enumerate(CHAIN, start=1):  # the same run (schedule) stopped each step
    summary = loop.train_and_evaluate(config(source, len(CHAIN), **layout), chain,
                                      stop=lambda s, step=step: "next" if s >= step else None)
    assert summary["step"] == step, layout
  want, got = losses(straight), losses(chain)
  assert sorted(got) == sorted(want) == list(range(1, len(CHAIN) + 1))
  for step, layout in enumerate(CHAIN, start=1):
    assert got[step] == pytest.approx(want[step], abs=1e-5), (step, layout)


def test_a_checkpoint_of_the_earlier_format_resumes_on_another_layout(tmp_path, capfd):
  """Step 3 of a pp=2 run saved by the earlier code, resumed on pp=1: steps 4-6 are the
  uninterrupted run's (recorded by that code in the fixture)."""
  work = str(tmp_path / "run")
  shutil.copytree(FIXTURE, work)
  loop.train_and_evaluate(legacy.config(corpus_file(tmp_path), pp=1), work)  # data moved
  err = capfd.readouterr().err
  assert "has the earlier checkpoint format (layers stacked for pp=2" in err
  assert "only the data's size was checked (2350x17 windows x length)" in err
  with open(os.path.join(FIXTURE, "reference_metrics.jsonl")) as f:
    want = {r["step"]: r["loss"] for r in map(json.loads, f)}
  got = losses(work)
  assert sorted(got) == [4, 5, 6]
  for step in (4, 5, 6):
    assert got[step] == pytest.approx(want[step], abs=1e-5), step
