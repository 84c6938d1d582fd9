"""Evaluation: multiple-choice scores, perplexity and bits per byte checked against direct
full-sequence forwards with a float64 numpy log-softmax; GSM8K-style extraction; the JSONL
task format; benchmark converters; the in-training hook; the eval and generate commands."""

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import signal
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from esjax.data import dataset
from esjax.data.tokenizer import ByteTokenizer
from esjax.eval import answers, export, harness, hook, perplexity, scoring, tasks
from esjax.models import Transformer
from esjax.models.presets import get_preset

BYTE = ByteTokenizer()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "tests", "testdata", "eval")
WIDTH = 512  # reference forwards are right-padded to one width: one compilation


@pytest.fixture(scope="module")
def model():
  return Transformer(get_preset("tiny-mixtral", max_seq_len=WIDTH), nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens):
  return model(tokens)[0]


def log_probs(model, ids):
  """float64 log-softmax [len(ids), V] of one unpadded sequence, by a direct forward."""
  tokens = np.zeros((1, WIDTH), np.int32)
  tokens[0, :len(ids)] = ids
  logits = np.asarray(_forward(model, jnp.asarray(tokens)), np.float64)[0, :len(ids)]
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def byte_ids(text):
  return list(text.encode("utf-8"))


def ref_loglikelihood(model, context, continuation):
  """log p(continuation | context): sum of gathered log-probs after the context's bytes."""
  ctx, cont = byte_ids(context), byte_ids(continuation)
  seq = ctx + cont
  logp = log_probs(model, seq[:-1])
  return sum(logp[i - 1, seq[i]] for i in range(len(ctx), len(seq)))


# Multiple choice ------------------------------------------------------------------------------


def test_multiple_choice_matches_direct_loglikelihoods(model):
  task = tasks.load_task(os.path.join(TESTDATA, "tiny_mc"))
  assert task.kind == "multiple_choice" and task.num_fewshot == 2 and len(task.items) == 6
  metrics, samples = harness.run_multiple_choice(model, BYTE, task, batch_size=4)
  # The 2-shot prefix, written out from the format: the first two few-shot items, solved.
  shots = "Question: Which animal barks?\nAnswer: a dog\n\nIce is cold\n\n"
  accs, norms = [], []
  for item, sample in zip(task.items, samples):
    if "choices" in item:
      pairs = [(shots + item["context"], " " + c) for c in item["choices"]]
      lengths = [len(c) for c in item["choices"]]
    else:  # lm-eval divides by the lengths of doc_to_choice: Winogrande's are the contexts
      pairs = [(shots + c, " " + item["continuation"]) for c in item["contexts"]]
      lengths = [len(c) for c in item["contexts"]]
    want = np.asarray([ref_loglikelihood(model, c, x) for c, x in pairs])
    np.testing.assert_allclose(sample["loglikelihoods"], want, rtol=1e-5, atol=1e-3)
    accs.append(float(np.argmax(want) == item["gold"]))
    norms.append(float(np.argmax(want / np.asarray(lengths)) == item["gold"]))
    assert (sample["acc"], sample["acc_norm"]) == (accs[-1], norms[-1])
  assert accs != norms, "the hand-written items should tell acc and acc_norm apart"
  assert metrics["n"] == 6
  assert metrics["acc"] == pytest.approx(np.mean(accs))
  assert metrics["acc_norm"] == pytest.approx(np.mean(norms))
  assert metrics["acc_stderr"] == pytest.approx(np.std(accs, ddof=1) / math.sqrt(6))


def test_loglikelihoods_truncate_context_from_the_left(model):
  ctx, cont = byte_ids("0123456789abcdefghij"), byte_ids("XYZ")
  (ll, _), = scoring.loglikelihoods(model, [(ctx, cont)], max_len=10)
  seq = (ctx + cont)[-11:]
  logp = log_probs(model, seq[:-1])
  assert ll == pytest.approx(sum(logp[i - 1, seq[i]] for i in range(8, 11)), abs=1e-3)
  with pytest.raises(ValueError, match="must both be non-empty"):
    scoring.loglikelihoods(model, [([], cont)])


def test_is_greedy_flag(model):
  ctx = byte_ids("hello there")
  logp = log_probs(model, ctx)
  best = int(np.argmax(logp[-1]))
  worst = int(np.argmin(logp[-1]))
  got = scoring.loglikelihoods(model, [(ctx, [best]), (ctx, [worst])])
  assert got[0][1] and not got[1][1]
  assert got[0][0] == pytest.approx(logp[-1, best], abs=1e-4)


def test_encode_pair_moves_trailing_space():
  assert harness.encode_pair(BYTE, "Answer: ", "yes") == (byte_ids("Answer:"), byte_ids(" yes"))
  assert harness.encode_pair(BYTE, "", "yes") == ([BYTE.eos_id], byte_ids("yes"))
  # lm-eval 0.4.13 loglikelihood: a continuation that starts with the prefix token keeps it
  # as the context instead of adding another.
  assert harness.encode_pair(BYTE, "", "\x00yes") == ([BYTE.eos_id], byte_ids("yes"))


class LmEvalContextSampler:
  """lm-eval 0.4.13 lm_eval/api/samplers.py ContextSampler.sample (transcribed)."""

  def __init__(self, df, rnd=None):
    self.rnd, self.df = random.Random(rnd), df

  def sample(self, n, eval_doc=None):
    if n == 0:
      return []
    res = (self.rnd.sample(list(self.df), n) if not eval_doc
           else self.rm_eval_doc(eval_doc, self.rnd.sample(list(self.df), n + 1), n))
    if len(res) < n:
      res = self.rnd.sample([x for x in self.df if x != eval_doc], n)
    return res

  @staticmethod
  def rm_eval_doc(doc, it, n=None):
    return [x for x in it if x != doc] if n is None else [x for x in it if x != doc][:n]


class LmEvalFirstNSampler(LmEvalContextSampler):
  def sample(self, n, eval_doc=None):
    pool = self.rm_eval_doc(eval_doc, self.df) if eval_doc is not None else self.df
    return pool[:n]


def lm_eval_fewshot(docs, fewshot_docs, n, sampler, same_split, seed=1234):
  """ConfigurableTask builds `sampler_cls(fewshot_docs, rnd=None)`; the evaluator calls
  `set_fewshot_seed(1234)` (sampler.set_rnd); `fewshot_context` then runs doc after doc with
  `eval_doc=doc` only when the few-shot split is the test split (lm_eval/api/task.py)."""
  s = {"random": LmEvalContextSampler, "first_n": LmEvalFirstNSampler}[sampler](
      list(fewshot_docs), rnd=None)
  s.rnd = random.Random(seed)
  return [s.sample(n, eval_doc=doc if same_split else None) for doc in docs]


@pytest.mark.parametrize("sampler", ["random", "first_n"])
@pytest.mark.parametrize("split", ["fewshot", "test", "fewshot-same-split-rule"])
def test_fewshot_examples_are_lm_evals(sampler, split):
  """30 items, 5-shot, from a separate 40-item pool or from the items themselves (with an
  exact duplicate of an item in the pool, which the same-split sampler must resample), or
  from the pool under lm-eval's same-split rule (hellaswag, winogrande: both splits unset)."""
  item = lambda i: {"context": f"q{i}", "choices": ["a", "b"], "gold": i % 2}  # noqa: E731
  items = tuple(item(i) for i in range(30)) + (item(3),)  # item 3 twice
  pool = tuple(item(100 + i) for i in range(40))
  rule = split == "fewshot-same-split-rule"
  task = tasks.Task("t", "multiple_choice", items, fewshot=pool, num_fewshot=5,
                    fewshot_sampler=sampler, fewshot_split="fewshot" if rule else split,
                    fewshot_same_split_rule=rule)
  rng = random.Random(1234)  # one per task, item after item
  got = [tasks.fewshot_examples(task, it, rng) for it in items]
  want = lm_eval_fewshot(items, items if split == "test" else pool, 5, sampler,
                         same_split=split != "fewshot")
  assert got == want
  assert all(len(shots) == 5 for shots in got)
  if split == "test":
    assert all(it not in shots for it, shots in zip(items, got))
  prefixes = tasks.fewshot_prefixes(task.replace(description="Desc.\n\n"), items)
  assert prefixes[0] == "Desc.\n\n" + "".join(
      f"{ex['context']} {ex['choices'][ex['gold']]}\n\n" for ex in want[0])
  assert prefixes[7].endswith("".join(f"{ex['context']} {ex['choices'][ex['gold']]}\n\n"
                                      for ex in want[7]))


def test_fewshot_pool_too_small_names_the_split():
  items = tuple({"context": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(3))
  with pytest.raises(ValueError, match="needs 4 items in the few-shot pool"):
    tasks.Task("t", "multiple_choice", items, num_fewshot=3, fewshot_split="test")
  with pytest.raises(ValueError, match="fewshot_split='train'"):
    tasks.Task("t", "multiple_choice", items, fewshot_split="train")


# Perplexity ----------------------------------------------------------------------------------


def test_text_perplexity_matches_direct_computation(model):
  texts = ["hello world, this is a test.", "x = 1\ny = 2\n", "naïve café ünïcode"]
  got = perplexity.text_perplexity(model, BYTE, texts, batch_size=2)
  ll = 0.0
  for t in texts:
    seq = [BYTE.eos_id] + byte_ids(t)  # prefix token, then every byte is predicted
    logp = log_probs(model, seq[:-1])
    ll += sum(logp[i - 1, seq[i]] for i in range(1, len(seq)))
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  n_words = sum(len(re.split(r"\s+", t)) for t in texts)
  assert got["n_bytes"] == got["n_tokens"] == n_bytes > sum(map(len, texts))  # bytes, not chars
  assert got["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
  assert got["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
  assert got["word_perplexity"] == pytest.approx(math.exp(-ll / n_words), rel=1e-5)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_rolling_windows_score_each_token_once_with_bounded_context(model, stride):
  """Each token j of [prefix] + doc is predicted from the tokens before it inside its window:
  windows of `stride` predictions, each seeing at most max_len = 8 inputs."""
  doc = byte_ids("The quick brown fox jumps over the lazy dog")
  seq = [BYTE.eos_id] + doc
  max_len = 8
  want = 0.0
  for a in range(1, len(seq), stride):
    b = min(a + stride, len(seq))
    c = max(0, b - 1 - max_len)
    logp = log_probs(model, seq[c:b - 1])
    want += sum(logp[j - 1 - c, seq[j]] for j in range(a, b))
  reqs = scoring.rolling_requests(doc, BYTE.eos_id, max_len, stride)
  assert sum(len(cont) for _, cont in reqs) == len(doc)
  got, = scoring.rolling_loglikelihoods(model, [doc], BYTE.eos_id, max_len=max_len,
                                        stride=stride)
  assert got == pytest.approx(want, rel=1e-5)


def test_window_perplexity_of_training_batches(model):
  tokens = dataset.token_stream(["def f(x):\n  return x\n", "print('hi')\n" * 3], BYTE)
  windows = dataset.cut_windows(tokens, 15)
  batches = [dataset.to_batch(windows[i:i + 2]) for i in range(0, len(windows), 2)]
  got = perplexity.window_perplexity(model, batches, BYTE)
  nll, n_tok, n_bytes = 0.0, 0, 0
  for batch in batches:
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      logp = log_probs(model, list(inputs))
      nll -= logp[np.arange(len(targets)), targets].sum()
      n_tok += len(targets)
      n_bytes += int(np.sum(targets != BYTE.eos_id))  # end-of-document ids are no text
  assert got["n_tokens"] == n_tok and got["n_bytes"] == n_bytes < n_tok
  assert got["loss"] == pytest.approx(nll / n_tok, rel=1e-5)
  assert got["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


# Generation tasks ----------------------------------------------------------------------------


def test_answer_extraction_like_lm_eval():
  assert answers.extract_strict("so 3 + 4 = 7\n#### 7") == "7"
  assert answers.extract_strict("no marker, 7") == answers.INVALID
  assert answers.extract_flexible("I think -3, no: $1,000.") == "$1,000."
  assert answers.extract_flexible("nothing here") == answers.INVALID
  assert answers.exact_match("$1,000.", "Total 1000.\n#### 1,000") == 1.0
  assert answers.exact_match("1001", "#### 1,000") == 0.0


def test_generate_task_scores_canned_completions(monkeypatch):
  task = tasks.load_task(os.path.join(TESTDATA, "tiny_gsm"))
  seen = {}

  def fake_generate_text(model, tokenizer, prompts, **kw):
    seen.update(prompts=prompts, **kw)
    return [" 3 + 4 = 7.\n#### 7", " The answer is 1,000.", " I think #### -3 but actually -2"]

  monkeypatch.setattr(harness, "generate_text", fake_generate_text)
  metrics, samples = harness.run_generate(None, BYTE, task)
  shot = "Question: What is 2 times 3?\nAnswer: 2 * 3 = 6.\n#### 6\n\n"
  assert seen["prompts"] == [shot + item["prompt"] for item in task.items]
  assert seen["stop"] == ("Question:",) and seen["max_new_tokens"] == 16
  assert [s["exact_match_strict"] for s in samples] == [1.0, 0.0, 0.0]
  assert [s["exact_match_flexible"] for s in samples] == [1.0, 1.0, 1.0]
  assert metrics["exact_match_strict"] == pytest.approx(1 / 3)
  assert metrics["exact_match_flexible"] == 1.0


# Task files ----------------------------------------------------------------------------------


def test_task_format_errors_name_the_problem(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"context": "q", "choices": ["a", "b"], "gold": 2}\n')
  with pytest.raises(ValueError, match=r"test item 0: 'gold' must be an int in \[0, 2\)"):
    tasks.load_task(str(bad))
  bad.write_text('{"context": "q", "choices": ["a"\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
    tasks.load_task(str(bad))
  folder = tmp_path / "t"
  folder.mkdir()
  (folder / "test.jsonl").write_text('{"text": "abc"}\n')
  (folder / "task.json").write_text('{"num_fewshots": 2}')
  with pytest.raises(ValueError, match=r"unknown options \['num_fewshots'\]"):
    tasks.load_task(str(folder))
  (folder / "task.json").write_text('{"kind": "multiple_choice"}')
  with pytest.raises(ValueError, match="expected 'context' \\+ 'choices'"):
    tasks.load_task(str(folder))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tasks.load_tasks(str(tmp_path / "missing"))


def test_task_groups_and_weighted_means(tmp_path):
  for name, n in (("a", 1), ("b", 3)):
    export.write_task(str(tmp_path / "grp" / name),
                      [{"context": "q", "choices": ["x", "y"], "gold": 0}] * n, [], {})
  group, = tasks.load_tasks(str(tmp_path / "grp"))
  assert isinstance(group, tasks.TaskGroup)
  assert [t.name for t in group.tasks] == ["grp/a", "grp/b"]
  assert [t.kind for t in group.tasks] == ["multiple_choice"] * 2
  agg = harness.group_metrics([{"n": 1, "acc": 1.0, "acc_stderr": None},
                               {"n": 3, "acc": 0.0, "acc_stderr": 0.0}])
  assert agg == {"n": 4, "acc": 0.25}


def test_benchmark_converters_on_dataset_rows(tmp_path):
  arc = export.arc_item({"question": "Which gas do plants take in?",
                         "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]},
                         "answerKey": "B"})
  assert arc == {"context": "Question: Which gas do plants take in?\nAnswer:",
                 "choices": ["oxygen", "carbon dioxide"], "gold": 1}
  hs = export.hellaswag_item({
      "activity_label": "Making tea", "ctx_a": "[header] How to make tea [title] Boil water.",
      "ctx_b": "then", "endings": ["pour it [step] slowly.", " wait."], "label": "1"})
  assert hs == {"context": "Making tea: How to make tea. Boil water. Then",
                "choices": ["pour it slowly.", "wait."], "gold": 1}
  mmlu = export.mmlu_item({"question": " What is 2+2? ", "choices": ["1", "2", "3", "4"],
                           "answer": 3})
  assert mmlu == {"context": "What is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:",
                  "choices": ["A", "B", "C", "D"], "gold": 3}
  assert export.mmlu_description("high_school_physics") == (
      "The following are multiple choice questions (with answers) about high school physics."
      "\n\n")
  wino = export.winogrande_item({
      "sentence": "The trophy doesn't fit into the suitcase because _ is too large.",
      "option1": "the trophy", "option2": "the suitcase", "answer": "1"})
  assert wino == {"contexts": ["The trophy doesn't fit into the suitcase because the trophy",
                               "The trophy doesn't fit into the suitcase because the suitcase"],
                  "continuation": "is too large.", "gold": 0}
  gsm = export.gsm8k_item({"question": "2+3?", "answer": "2+3=5\n#### 5"})
  assert gsm == {"prompt": "Question: 2+3?\nAnswer:", "target": "2+3=5\n#### 5", "answer": "5"}
  export.write_task(str(tmp_path / "wino"), [wino, wino], [wino], {"num_fewshot": 1})
  task = tasks.load_task(str(tmp_path / "wino"))
  assert task.kind == "multiple_choice" and len(task.items) == 2 and task.num_fewshot == 1


# Hook and commands ---------------------------------------------------------------------------


def test_eval_hook_runs_every_n_steps(model):
  task = tasks.load_task(os.path.join(TESTDATA, "tiny_mc"))
  h = hook.EvalHook([task], BYTE, every=5, limit=2, batch_size=4)
  assert h(0, model) == {} and h(3, model) == {}
  got = h(10, model)
  want = harness.evaluate(model, BYTE, [task], limit=2, batch_size=4)["results"]["tiny_mc"]
  assert got["eval/tiny_mc/acc"] == want["acc"] and got["eval/tiny_mc/n"] == 2
  assert got["eval/tiny_mc/acc_norm"] == want["acc_norm"]


def _make_run(workdir, model):
  """An esjax run directory: one checkpoint of `model` and the run's config.json."""
  from esjax.train import checkpoint

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save_params(0, params, model.cfg)
  ckpt.close()
  corpus = os.path.join(workdir, "corpus.txt")
  with open(corpus, "w") as f:
    f.write("def add(a, b):\n  return a + b\n" * 40)
  config = {"data": {"source": corpus, "tokenizer": "byte", "max_bytes": 0,
                     "val_fraction": 0.25},
            "train": {"seq_len": 32, "batch_size": 4, "seed": 0, "eval_batches": 2}}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize("eval_batches", [1, 3])
def test_val_scores_the_runs_eval_batches(tmp_path, model, eval_batches):
  """`--tasks=val` scores the `train.eval_batches` batches training's val_loss scores (it
  scored a fixed 8, and disagreed with the run's val_loss)."""
  (tmp_path / "corpus.txt").write_text("def add(a, b):\n  return a + b\n" * 100)
  config = ml_collections.ConfigDict({
      "data": {"source": str(tmp_path / "corpus.txt"), "tokenizer": "byte", "max_bytes": 0,
               "val_fraction": 0.5},
      "train": {"seq_len": 16, "batch_size": 2, "seed": 0, "eval_batches": eval_batches}})
  want = dataset.build(config.data, 16, 2, 0, eval_batches).val
  assert len(want) == eval_batches
  got = perplexity.val_perplexity(model, config)
  assert got["n_tokens"] == eval_batches * 2 * 16
  assert got["loss"] == pytest.approx(perplexity.window_perplexity(model, want)["loss"])


@pytest.mark.slow
def test_eval_and_generate_commands(tmp_path, model):
  _make_run(str(tmp_path), model)
  out = tmp_path / "report.json"
  tasks_arg = ",".join(["val", os.path.join(TESTDATA, "tiny_mc"),
                        os.path.join(TESTDATA, "tiny_gsm")])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-m", "esjax.eval", f"--checkpoint={tmp_path}",
                  f"--tasks={tasks_arg}", "--batch_size=4", f"--output={out}"],
                 check=True, env=env, capture_output=True, text=True)
  report = json.loads(out.read_text())
  assert set(report["results"]) == {"val", "tiny_mc", "tiny_gsm"}
  mc, _ = harness.run_multiple_choice(model, BYTE, tasks.load_task(
      os.path.join(TESTDATA, "tiny_mc")), batch_size=4)
  assert report["results"]["tiny_mc"]["acc"] == mc["acc"]
  assert report["results"]["tiny_mc"]["acc_norm"] == mc["acc_norm"]
  assert 0.0 <= report["results"]["tiny_gsm"]["exact_match_flexible"] <= 1.0
  val = report["results"]["val"]
  assert val["n_bytes"] == val["n_tokens"] > 0 and val["bits_per_byte"] > 0
  assert report["model_config"] == model.cfg.to_dict()

  gen = subprocess.run([sys.executable, "-m", "esjax.generate", f"--checkpoint={tmp_path}",
                        "--prompt=def add(", "--max_new_tokens=6"],
                       check=True, env=env, capture_output=True, text=True)
  from esjax.eval.generation import generate_text
  want = generate_text(model, BYTE, ["def add("], max_new_tokens=6, batch_size=1)[0]
  assert gen.stdout.startswith("def add(" + want)


def test_eval_report_goes_beside_the_checkpoint_by_default(tmp_path, model):
  """Not into the current directory (the repository root in the README's flow)."""
  run, elsewhere = tmp_path / "run", tmp_path / "cwd"
  run.mkdir(), elsewhere.mkdir()
  _make_run(str(run), model)
  out = subprocess.run([sys.executable, "-m", "esjax.eval", f"--checkpoint={run}/checkpoints/0",
                        f"--tasks={os.path.join(TESTDATA, 'tiny_mc')}", "--limit=1"],
                       cwd=elsewhere, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                           "PYTHONPATH": ROOT},
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert os.listdir(elsewhere) == []
  assert json.loads((run / "eval_report.json").read_text())["results"]["tiny_mc"]["n"] == 1
  assert f"report written to {run / 'eval_report.json'}" in out.stdout


def test_ctrl_c_during_eval_is_one_line(tmp_path, model):
  """SIGINT 1 s in (esjax.eval is importing jax; the whole evaluation takes ~5 s): one line,
  status 130, no report. It was a KeyboardInterrupt traceback or, landing in jax's
  garbage-collection callback, printed as ignored while the evaluation went on to write its
  report with status 0 (issue 30 item 7)."""
  _make_run(str(tmp_path), model)
  tasks_arg = ",".join(["val"] + [os.path.join(TESTDATA, "tiny_mc")] * 40)
  proc = subprocess.Popen([sys.executable, "-m", "esjax.eval", f"--checkpoint={tmp_path}",
                           f"--tasks={tasks_arg}", "--batch_size=1"], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert [l for l in err.splitlines() if l.strip()] == [
      "esjax.eval: interrupted; no report written"]
  assert not (tmp_path / "eval_report.json").exists()


@pytest.mark.parametrize("cli, args, message", [
    ("esjax.eval", ["--tasks=nosuchtask"], "--tasks: 'nosuchtask' does not exist"),
    ("esjax.generate", ["--prompt=hi", "--max_len=100000"], "--max_len=100000 exceeds"),
])
def test_errors_after_loading_a_checkpoint_are_the_only_line(tmp_path, model, cli, args,
                                                              message):
  _make_run(str(tmp_path), model)
  out = subprocess.run([sys.executable, "-m", cli, f"--checkpoint={tmp_path}", *args],
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                       text=True)
  lines = out.stderr.strip().splitlines()  # nothing before it (orbax's lines) or after
  assert out.returncode != 0 and len(lines) == 1, out.stderr
  assert lines[0].startswith(f"{cli}: error: ") and message in lines[0]


# A tiny Hugging Face Llama (built with transformers on CPU) and a tokenizer trained here --------

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Question: What is two plus two?",
          "Answer: four. The answer is four.", "def add(a, b):\n    return a + b\n",
          "A cat sat on a mat; the mat was red and the cat was black."] * 20


@pytest.fixture(scope="module")
def hf_llama_folder(tmp_path_factory):
  """A tiny transformers Llama saved with a tokenizer.json trained here."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  folder = tmp_path_factory.mktemp("hf_llama")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.save(str(folder / "tokenizer.json"))
  cfg = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
  return folder


@pytest.fixture(scope="module")
def hf_llama(hf_llama_folder):
  import transformers
  from esjax.eval import loading
  model, tokenizer, _ = loading.load(str(hf_llama_folder))
  hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_llama_folder)).eval()
  return hf, model, tokenizer


def test_hf_llama_loglikelihoods_equal_transformers(hf_llama):
  import torch

  hf, model, tokenizer = hf_llama
  pairs = [("Question: What is two plus two?\nAnswer:", " four"),
           ("The quick brown fox", " jumps over the lazy dog."),
           ("A cat sat on a", " mat"), ("def add(a, b):", "\n    return a + b")]
  requests = [harness.encode_pair(tokenizer, c, x) for c, x in pairs]
  got = scoring.loglikelihoods(model, requests, batch_size=2)
  for (ctx, cont), (ll, greedy) in zip(requests, got):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
      logp = torch.log_softmax(hf(ids).logits.double(), -1)[0].numpy()
    tokens = [logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)]
    assert ll == pytest.approx(sum(tokens), abs=1e-4)
    assert greedy == all(np.argmax(logp[len(ctx) - 1 + j]) == t for j, t in enumerate(cont))


def test_hf_llama_batched_greedy_generation_equals_transformers(hf_llama):
  import torch

  from esjax.eval.generation import generate

  hf, model, tokenizer = hf_llama
  texts = ["The quick brown", "Question: What is two plus two?\nAnswer:", "def"]
  prompts = [list(tokenizer.encode(t)) for t in texts]
  n = 10
  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):  # transformers decodes left-padded batches
    ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
  with torch.no_grad():
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=tokenizer.eos_id)
  got = generate(model, prompts, max_new_tokens=n, eos_id=tokenizer.eos_id)
  for row, ours in zip(out[:, width:].tolist(), got):
    want = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
    assert ours == want


@pytest.mark.parametrize("where", ["generation_config.json", "config.json"])
def test_generation_stops_at_every_eos_id_as_transformers(hf_llama_folder, tmp_path, where):
  """A model whose `eos_token_id` is a list (instruct models list several): transformers stops
  at any of them, and so does esjax (it stopped only at the tokenizer's one)."""
  import torch
  import transformers

  from esjax.eval import generation, loading

  folder = tmp_path / "hf"
  shutil.copytree(hf_llama_folder, folder)
  model, tokenizer, _ = loading.load(str(folder))
  text = "Question: What is two plus two?\nAnswer:"
  prompt = list(tokenizer.encode(text))
  free = generation.generate(model, [prompt], max_new_tokens=12)[0]
  k = next(k for k in range(1, 12) if free[k] not in free[:k])  # a new token after k others
  assert 2 not in free[:k + 1], free
  listed = [2, free[k]]
  if where == "config.json":  # transformers' fallback when there is no generation_config
    os.remove(folder / "generation_config.json")
  cfg = json.loads((folder / where).read_text())
  (folder / where).write_text(json.dumps({**cfg, "eos_token_id": listed}))

  hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
  with torch.no_grad():
    row = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                      pad_token_id=0)[0, len(prompt):].tolist()
  assert row == free[:k + 1]  # transformers stopped at the listed id, and kept it
  model, tokenizer, _ = loading.load(str(folder))
  assert tokenizer.eos_ids == (2, free[k])
  assert generation.generate(model, [prompt], max_new_tokens=12,
                             eos_id=tokenizer.eos_ids)[0] == free[:k]
  got = generation.generate_text(model, tokenizer, [text], max_new_tokens=12)
  assert got == [tokenizer.decode(free[:k])]


def test_hf_folder_with_only_a_sentencepiece_tokenizer(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  from esjax.eval import loading  # pylint: disable=g-import-not-at-top
  from esjax.interop import hf  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("def add(a, b):\n  return a + b\n" * 50 + "the lazy dog sleeps\n" * 50)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=48, model_type="bpe", minloglevel=2)
  folder = tmp_path / "hf"
  model = Transformer(get_preset("tiny-llama", vocab_size=64), nnx.Rngs(0))
  hf.save_pretrained(model, str(folder))
  os.replace(tmp_path / "sp.model", folder / "tokenizer.model")
  loaded, tok, _ = loading.load(str(folder))
  ref = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
  assert tok.vocab_size == 48
  np.testing.assert_array_equal(tok.encode("the lazy dog"), ref.encode("the lazy dog"))
  assert loaded.cfg.vocab_size == 64
  os.remove(folder / "tokenizer.model")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    loading.load(str(folder))
