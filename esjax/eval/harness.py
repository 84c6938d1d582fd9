"""Runs tasks on a model: multiple choice (acc, acc_norm), generation (exact match), perplexity.

Multiple choice follows lm-evaluation-harness: each choice's continuation (target delimiter +
choice) is scored by log p(continuation | n-shot prompt); `acc` takes the argmax of the summed
log-likelihoods, `acc_norm` the argmax after dividing each by its choice's length in
characters (lm-eval's `doc_to_choice`: for Winogrande-style items, the contexts). Generation
tasks decode greedily until a stop string and compare the extracted answer with the
reference (strict and flexible extraction, see `answers`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from esjax.eval import answers
from esjax.eval.generation import generate_text
from esjax.eval.perplexity import prefix_id, text_perplexity
from esjax.eval.scoring import loglikelihoods
from esjax.eval.tasks import Task, TaskGroup, choice_pairs, fewshot_prefixes
from esjax.models.transformer import Transformer


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Token ids of (context, continuation) as lm-eval splits them: trailing spaces of the
  context move to the continuation, and the continuation's ids are those of the joined text
  after the context's. An empty context becomes the prefix (BOS or end-of-text) token, or
  the continuation's first token when that is the prefix token (lm-eval 0.4.13's
  `loglikelihood`)."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  if not context:
    cont, prefix = [int(t) for t in tokenizer.encode(continuation)], prefix_id(tokenizer)
    return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
  whole = [int(t) for t in tokenizer.encode(context + continuation)]
  ctx = [int(t) for t in tokenizer.encode(context)]
  return ctx, whole[len(ctx):]


def mean_stderr(values: Sequence[float]) -> float | None:
  """Standard error of the mean (sample standard deviation / sqrt(n)), as lm-eval reports."""
  if len(values) < 2:
    return None
  return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def choice_metrics(lls: Sequence[float], choice_texts: Sequence[str], gold: int
                   ) -> dict[str, float]:
  lls = np.asarray(lls, np.float64)
  lengths = np.asarray([float(len(c)) for c in choice_texts])
  return {"acc": float(np.argmax(lls) == gold),
          "acc_norm": float(np.argmax(lls / lengths) == gold)}


def _items(task: Task, limit: int) -> Sequence[dict[str, Any]]:
  return task.items[:limit] if limit else task.items


def run_multiple_choice(model: Transformer, tokenizer, task: Task, *, batch_size: int = 8,
                        max_len: int | None = None, limit: int = 0
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  items = _items(task, limit)
  requests, counts = [], []
  for item, prefix in zip(items, fewshot_prefixes(task, items)):
    contexts, conts, _ = choice_pairs(item)
    requests += [encode_pair(tokenizer, prefix + c, task.target_delimiter + x)
                 for c, x in zip(contexts, conts)]
    counts.append(len(contexts))
  results = loglikelihoods(model, requests, batch_size=batch_size, max_len=max_len)
  samples, start = [], 0
  for i, (item, n) in enumerate(zip(items, counts)):
    lls = [ll for ll, _ in results[start:start + n]]
    start += n
    samples.append({"index": i, "gold": item["gold"], "loglikelihoods": lls,
                    **choice_metrics(lls, choice_pairs(item)[2], item["gold"])})
  return _summarise(samples, ("acc", "acc_norm")), samples


def run_generate(model: Transformer, tokenizer, task: Task, *, batch_size: int = 8,
                 max_len: int | None = None, limit: int = 0
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  items = _items(task, limit)
  prompts = [p + item["prompt"] for item, p in zip(items, fewshot_prefixes(task, items))]
  outputs = generate_text(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens,
                          stop=task.until, batch_size=batch_size, max_len=max_len)
  samples = []
  for i, (item, out) in enumerate(zip(items, outputs)):
    reference = item["answer"] if "answer" in item else item["target"]
    strict = answers.extract_strict(out, task.answer_regex)
    flexible = answers.extract_flexible(out)
    samples.append({
        "index": i, "completion": out, "reference": reference, "strict": strict,
        "flexible": flexible,
        "exact_match_strict": answers.exact_match(strict, reference, task.ignore),
        "exact_match_flexible": answers.exact_match(flexible, reference, task.ignore)})
  return _summarise(samples, ("exact_match_strict", "exact_match_flexible")), samples


def run_perplexity(model: Transformer, tokenizer, task: Task, *, batch_size: int = 8,
                   max_len: int | None = None, limit: int = 0
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  texts = [item["text"] for item in _items(task, limit)]
  return text_perplexity(model, tokenizer, texts, batch_size=batch_size, max_len=max_len), []


RUNNERS = {"multiple_choice": run_multiple_choice, "generate": run_generate,
           "perplexity": run_perplexity}


def _summarise(samples: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
  out: dict[str, Any] = {"n": len(samples)}
  for k in keys:
    values = [s[k] for s in samples]
    out[k] = float(np.mean(values))
    out[f"{k}_stderr"] = mean_stderr(values)
  return out


def group_metrics(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Size-weighted means of the metrics every task of a group reports (stderrs left out)."""
  keys = set.intersection(*(set(r) for r in results)) - {"n"}
  keys = {k for k in keys if not k.endswith("_stderr")
          and all(isinstance(r[k], float) for r in results)}
  n = sum(r["n"] for r in results)
  out: dict[str, Any] = {"n": n}
  for k in sorted(keys):
    out[k] = float(sum(r[k] * r["n"] for r in results) / n)
  return out


def evaluate(model: Transformer, tokenizer, tasks: Sequence[Task | TaskGroup], *,
             num_fewshot: int | None = None, limit: int = 0, batch_size: int = 8,
             max_len: int | None = None, log_samples: bool = False) -> dict[str, Any]:
  """{"results": {task: metrics}, "groups": {group: metrics}, "samples": {task: [...]}}.

  `num_fewshot` (when not None) overrides every task's; `limit` > 0 scores the first items.
  """
  report: dict[str, Any] = {"results": {}, "groups": {}}
  if log_samples:
    report["samples"] = {}

  def run(task: Task) -> dict[str, Any]:
    if num_fewshot is not None and task.kind != "perplexity":
      task = task.replace(num_fewshot=num_fewshot)
    metrics, samples = RUNNERS[task.kind](model, tokenizer, task, batch_size=batch_size,
                                          max_len=max_len, limit=limit)
    metrics = {"kind": task.kind, "num_fewshot": task.num_fewshot, **metrics}
    report["results"][task.name] = metrics
    if log_samples:
      report["samples"][task.name] = samples
    return metrics

  for t in tasks:
    if isinstance(t, TaskGroup):
      report["groups"][t.name] = group_metrics([run(sub) for sub in t.tasks])
    else:
      run(t)
  return report
