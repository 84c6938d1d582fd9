"""Evaluation tasks as local JSONL files, and the n-shot prompts built from them.

A task is a directory (the format is documented in `esjax/eval/README.md`):

  <name>/task.json       options (optional): kind, num_fewshot, delimiters, stop strings, ...
  <name>/test.jsonl      the items scored, one JSON object per line
  <name>/fewshot.jsonl   items n-shot examples are drawn from (optional)

or a single `.jsonl` file (default options, kind inferred from the first item). A directory
without `test.jsonl` whose subdirectories are tasks is a group (e.g. MMLU's 57 subjects),
reported per task and as the size-weighted mean. Item shapes by kind:

  multiple_choice  {"context": str, "choices": [str, ...], "gold": int}
                   {"contexts": [str, ...], "continuation": str, "gold": int}  (Winogrande)
  generate         {"prompt": str, "target": str, "answer": str}  (answer or target needed)
  perplexity       {"text": str}
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Sequence

from esjax.eval import answers

KINDS = ("multiple_choice", "generate", "perplexity")
SAMPLERS = ("random", "first_n")
# Where few-shot examples come from: fewshot.jsonl (a split other than the scored one, as
# every exported benchmark), or the scored items themselves (lm-eval's same-split case).
FEWSHOT_SPLITS = ("fewshot", "test")


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: its items, few-shot pool and how prompts are built (lm-eval's defaults)."""

  name: str
  kind: str
  items: tuple[dict[str, Any], ...]
  fewshot: tuple[dict[str, Any], ...] = ()
  num_fewshot: int = 0
  fewshot_sampler: str = "random"
  fewshot_seed: int = 1234
  fewshot_split: str = "fewshot"
  # lm-eval's same-split rule on another split: it draws n + 1 and drops the scored item for
  # a task whose few-shot and test splits are both unset (None == None), as hellaswag's and
  # winogrande's, although its examples come from the training split.
  fewshot_same_split_rule: bool = False
  description: str = ""
  target_delimiter: str = " "
  fewshot_delimiter: str = "\n\n"
  # generate tasks
  until: tuple[str, ...] = ("Question:",)
  max_new_tokens: int = 256
  answer_regex: str = answers.GSM8K_ANSWER
  ignore: tuple[str, ...] = answers.GSM8K_IGNORE

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name}: kind={self.kind!r}, expected one of {KINDS}")
    if self.fewshot_sampler not in SAMPLERS:
      raise ValueError(f"task {self.name}: fewshot_sampler={self.fewshot_sampler!r}, "
                       f"expected one of {SAMPLERS}")
    if self.fewshot_split not in FEWSHOT_SPLITS:
      raise ValueError(f"task {self.name}: fewshot_split={self.fewshot_split!r}, expected one "
                       f"of {FEWSHOT_SPLITS}")
    if self.num_fewshot < 0:
      raise ValueError(f"task {self.name}: num_fewshot={self.num_fewshot} must be >= 0")
    # The same split leaves out the item itself: the random sampler draws n + 1.
    need = self.num_fewshot + (self.fewshot_split == "test")
    if self.num_fewshot and len(self.fewshot_pool) < need:
      raise ValueError(f"task {self.name}: num_fewshot={self.num_fewshot} needs {need} items in "
                       f"the few-shot pool ({self.fewshot_split} split), it has "
                       f"{len(self.fewshot_pool)} (add fewshot.jsonl, or fewshot_split='test')")
    if self.kind == "perplexity" and self.num_fewshot:
      raise ValueError(f"task {self.name}: perplexity tasks take no few-shot examples")
    for where, items in (("test", self.items), ("fewshot", self.fewshot)):
      for i, item in enumerate(items):
        check_item(self.kind, item, f"task {self.name} {where} item {i}")

  def replace(self, **kw: Any) -> "Task":
    return dataclasses.replace(self, **kw)

  @property
  def fewshot_pool(self) -> tuple[dict[str, Any], ...]:
    return self.items if self.fewshot_split == "test" else self.fewshot


@dataclasses.dataclass(frozen=True)
class TaskGroup:
  name: str
  tasks: tuple[Task, ...]


OPTIONS = {f.name for f in dataclasses.fields(Task)} - {"name", "items", "fewshot"}


def check_item(kind: str, item: Any, where: str) -> None:
  """Raises a one-line error naming the item when it does not fit `kind`."""
  def need(cond: bool, msg: str):
    if not cond:
      raise ValueError(f"{where}: {msg}; got {json.dumps(item)[:200]}")

  need(isinstance(item, dict), "expected a JSON object")
  if kind == "multiple_choice":
    if "choices" in item:
      need(isinstance(item.get("context"), str), "'context' must be a string")
      n = len(item["choices"]) if isinstance(item["choices"], list) else 0
      need(n >= 2 and all(isinstance(c, str) for c in item["choices"]),
           "'choices' must be a list of >= 2 strings")
    else:
      need(isinstance(item.get("continuation"), str) and isinstance(item.get("contexts"), list),
           "expected 'context' + 'choices' or 'contexts' + 'continuation'")
      n = len(item["contexts"])
      need(n >= 2 and all(isinstance(c, str) for c in item["contexts"]),
           "'contexts' must be a list of >= 2 strings")
    gold = item.get("gold")
    need(isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < n,
         f"'gold' must be an int in [0, {n})")
  elif kind == "generate":
    need(isinstance(item.get("prompt"), str), "'prompt' must be a string")
    need(isinstance(item.get("answer"), str) or isinstance(item.get("target"), str),
         "needs a string 'answer' or 'target'")
  else:
    need(isinstance(item.get("text"), str), "'text' must be a string")


def infer_kind(item: dict[str, Any]) -> str:
  if "choices" in item or "contexts" in item:
    return "multiple_choice"
  if "prompt" in item:
    return "generate"
  if "text" in item:
    return "perplexity"
  raise ValueError(f"cannot tell the task kind of item with keys {sorted(item)}: expected "
                   "'choices'/'contexts' (multiple_choice), 'prompt' (generate) or 'text'")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  items = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          items.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
  return items


def load_task(path: str, name: str | None = None) -> Task:
  """A task directory (task.json, test.jsonl, fewshot.jsonl) or a single .jsonl file."""
  if os.path.isfile(path):
    items = read_jsonl(path)
    options, fewshot = {}, []
    name = name or os.path.splitext(os.path.basename(path))[0]
  else:
    test = os.path.join(path, "test.jsonl")
    if not os.path.isfile(test):
      raise FileNotFoundError(f"task {path!r}: expected a .jsonl file or a directory with "
                              "test.jsonl")
    items = read_jsonl(test)
    opt_path, shot_path = os.path.join(path, "task.json"), os.path.join(path, "fewshot.jsonl")
    options = json.load(open(opt_path, encoding="utf-8")) if os.path.isfile(opt_path) else {}
    fewshot = read_jsonl(shot_path) if os.path.isfile(shot_path) else []
    name = name or os.path.basename(os.path.normpath(path))
  unknown = sorted(set(options) - OPTIONS)
  if unknown:
    raise ValueError(f"task {name}: unknown options {unknown} in task.json; known: "
                     f"{sorted(OPTIONS)}")
  if not items:
    raise ValueError(f"task {name}: no items in {path}")
  options.setdefault("kind", infer_kind(items[0]))
  for key in ("until", "ignore"):
    if key in options:
      options[key] = tuple(options[key])
  return Task(name=name, items=tuple(items), fewshot=tuple(fewshot), **options)


def load_tasks(spec: str) -> list[Task | TaskGroup]:
  """Comma-separated task paths; a directory of task directories is a group."""
  out: list[Task | TaskGroup] = []
  for path in (p.strip() for p in spec.split(",") if p.strip()):
    if not os.path.exists(path):
      raise FileNotFoundError(f"--tasks: {path!r} does not exist")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "test.jsonl")):
      group = os.path.basename(os.path.normpath(path))
      subs = sorted(d for d in os.listdir(path)
                    if os.path.isfile(os.path.join(path, d, "test.jsonl")))
      if not subs:
        raise FileNotFoundError(f"--tasks: {path!r} holds neither test.jsonl nor task "
                                "directories")
      out.append(TaskGroup(group, tuple(load_task(os.path.join(path, d), f"{group}/{d}")
                                        for d in subs)))
    else:
      out.append(load_task(path))
  return out


# Prompts -------------------------------------------------------------------------------------


def choice_pairs(item: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
  """(contexts, continuations, choice texts) of a multiple-choice item, one per choice.

  The choice texts are what `acc_norm` divides by (in characters): lm-eval's `doc_to_choice`,
  the choices, or for the shared-continuation form (Winogrande) the contexts, since there
  the choices are the sentence up to the blank filled with each option.
  """
  if "choices" in item:
    n = len(item["choices"])
    return [item["context"]] * n, list(item["choices"]), list(item["choices"])
  n = len(item["contexts"])
  return list(item["contexts"]), [item["continuation"]] * n, list(item["contexts"])


def render_example(task: Task, item: dict[str, Any]) -> str:
  """A solved item as a few-shot example: question, target delimiter, gold answer."""
  if task.kind == "multiple_choice":
    contexts, conts, _ = choice_pairs(item)
    return contexts[item["gold"]] + task.target_delimiter + conts[item["gold"]]
  return item["prompt"] + task.target_delimiter + item.get("target", item.get("answer"))


def fewshot_examples(task: Task, item: dict[str, Any], rng: random.Random) -> list[dict]:
  """`num_fewshot` examples for `item`, as lm-eval 0.4.13's samplers (lm_eval/api/samplers.py)
  pick them with one `random.Random(fewshot_seed)` per task, used item after item.

  From another split (fewshot.jsonl): `random` draws n, `first_n` takes the first n. From the
  scored split (`fewshot_split="test"`, or `fewshot_same_split_rule` on another split) the
  item itself is left out: `random` draws n + 1 and drops it (if copies of it were drawn, it
  draws n again from the pool without it), `first_n` takes the first n of the pool without
  it.
  """
  n = task.num_fewshot
  if not n:
    return []
  pool = list(task.fewshot_pool)
  same_split = task.fewshot_split == "test" or task.fewshot_same_split_rule
  if task.fewshot_sampler == "first_n":
    return [ex for ex in pool if not same_split or ex != item][:n]
  if not same_split:
    return rng.sample(pool, n)
  picked = [ex for ex in rng.sample(pool, n + 1) if ex != item][:n]
  if len(picked) < n:
    picked = rng.sample([ex for ex in pool if ex != item], n)
  return picked


def fewshot_prefix(task: Task, item: dict[str, Any], rng: random.Random) -> str:
  """Description and solved examples that go before the item's own context."""
  shots = fewshot_examples(task, item, rng)
  text = "".join(render_example(task, ex) + task.fewshot_delimiter for ex in shots)
  return task.description + text


def fewshot_prefixes(task: Task, items: Sequence[dict[str, Any]]) -> list[str]:
  """`fewshot_prefix` of each item, in order, from one `random.Random(task.fewshot_seed)`
  (lm-eval seeds its sampler once per task and builds the prompts item after item)."""
  rng = random.Random(task.fewshot_seed)
  return [fewshot_prefix(task, item, rng) for item in items]
