"""Public benchmarks -> esjax task directories, with lm-evaluation-harness's prompts.

Run once on a machine with internet access (needs `pip install datasets`):

  python -m esjax.eval.export --benchmarks=arc_easy,arc_challenge,hellaswag,winogrande,gsm8k,mmlu \
      --out=tasks

and evaluate offline with `python -m esjax.eval --tasks=tasks/arc_easy,tasks/mmlu,...`. The
`*_item` functions map one Hugging Face dataset row to one JSONL item; they are plain
functions of dicts, so they are tested here without any download.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, Iterable

from absl import app, flags, logging

MMLU_LETTERS = ["A", "B", "C", "D"]


def arc_item(row: dict[str, Any]) -> dict[str, Any]:
  """allenai/ai2_arc (ARC-Easy / ARC-Challenge)."""
  return {"context": f"Question: {row['question']}\nAnswer:",
          "choices": list(row["choices"]["text"]),
          "gold": list(row["choices"]["label"]).index(row["answerKey"])}


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def hellaswag_item(row: dict[str, Any]) -> dict[str, Any]:
  """Rowan/hellaswag."""
  ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
  return {"context": _hellaswag_clean(row["activity_label"] + ": " + ctx),
          "choices": [_hellaswag_clean(e) for e in row["endings"]],
          "gold": int(row["label"])}


def mmlu_item(row: dict[str, Any]) -> dict[str, Any]:
  """cais/mmlu (one subject)."""
  options = "".join(f"\n{k}. {c}" for k, c in zip(MMLU_LETTERS, row["choices"]))
  return {"context": f"{row['question'].strip()}{options}\nAnswer:",
          "choices": list(MMLU_LETTERS), "gold": int(row["answer"])}


def mmlu_description(subject: str) -> str:
  return f"The following are multiple choice questions (with answers) about " \
         f"{subject.replace('_', ' ')}.\n\n"


def winogrande_item(row: dict[str, Any]) -> dict[str, Any]:
  """allenai/winogrande: the option fills the blank in the context; the rest is scored."""
  sentence = row["sentence"]
  blank = sentence.index("_")
  return {"contexts": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
          "continuation": sentence[blank + 1:].strip(),
          "gold": {"1": 0, "2": 1}[str(row["answer"])]}


def gsm8k_item(row: dict[str, Any]) -> dict[str, Any]:
  """openai/gsm8k: the full worked solution is the few-shot target; the number after #### is
  the answer."""
  return {"prompt": f"Question: {row['question']}\nAnswer:", "target": row["answer"],
          "answer": row["answer"].split("####")[-1].strip()}


# name: (HF dataset, config, eval split, few-shot split, item fn, task.json options)
BENCHMARKS: dict[str, tuple[str, str | None, str, str, Callable, dict[str, Any]]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "train", arc_item, {}),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "train", arc_item, {}),
    # lm-eval 0.4.13 leaves these two tasks' fewshot_split and test_split unset: its
    # same-split rule (None == None) then draws n + 1 training examples per item.
    "hellaswag": ("Rowan/hellaswag", None, "validation", "train", hellaswag_item,
                  {"fewshot_same_split_rule": True}),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "train",
                   winogrande_item, {"fewshot_same_split_rule": True}),
    "gsm8k": ("openai/gsm8k", "main", "test", "train", gsm8k_item,
              {"kind": "generate", "num_fewshot": 5,
               "until": ["Question:", "</s>", "<|im_end|>"]}),
}


def write_task(folder: str, items: Iterable[dict], fewshot: Iterable[dict],
               options: dict[str, Any]) -> int:
  os.makedirs(folder, exist_ok=True)
  n = 0
  for name, rows in (("test.jsonl", items), ("fewshot.jsonl", fewshot)):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += name == "test.jsonl"
  with open(os.path.join(folder, "task.json"), "w", encoding="utf-8") as f:
    json.dump(options, f, indent=2)
  return n


def export(name: str, out: str) -> None:
  try:
    import datasets  # pylint: disable=g-import-not-at-top  # only needed to export
  except ImportError:
    raise ValueError("exporting benchmarks needs the `datasets` package: pip install "
                     "datasets==5.2.0 (requirements-dev.txt)") from None

  if name == "mmlu":
    subjects = datasets.get_dataset_config_names("cais/mmlu")
    for subject in sorted(s for s in subjects if s not in ("all", "auxiliary_train")):
      ds = datasets.load_dataset("cais/mmlu", subject)
      n = write_task(os.path.join(out, "mmlu", subject), map(mmlu_item, ds["test"]),
                     map(mmlu_item, ds["dev"]),
                     {"kind": "multiple_choice", "description": mmlu_description(subject),
                      "fewshot_sampler": "first_n"})
      print(f"mmlu/{subject}: {n} items")
    return
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS) + ['mmlu']}")
  path, config, split, shot_split, item, options = BENCHMARKS[name]
  ds = datasets.load_dataset(path, config)
  n = write_task(os.path.join(out, name), map(item, ds[split]), map(item, ds[shot_split]),
                 {"kind": "multiple_choice", **options})
  print(f"{name}: {n} items")


def main(argv: list[str]) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:  # the hub's retry warnings precede the error line
    logging.set_verbosity(logging.ERROR)
    for library in ("HF_HUB_VERBOSITY", "DATASETS_VERBOSITY"):  # read when they are imported
      os.environ.setdefault(library, "error")
  for name in flags.FLAGS.benchmarks:
    try:
      export(name, flags.FLAGS.out)
    except ValueError as e:
      sys.exit(f"esjax.eval.export: error: {e}")
    except (OSError, ConnectionError) as e:  # offline: the hub cannot be reached
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      sys.exit(f"esjax.eval.export: error: {name}: could not download it ({type(e).__name__}:"
               f" {first}); the export needs the Hugging Face hub, run it where it is "
               "reachable and copy the task folders")


if __name__ == "__main__":
  # Flags are defined only when run as a command, so importing the converters defines none.
  flags.DEFINE_list("benchmarks", None, f"Any of {sorted(BENCHMARKS) + ['mmlu']}.")
  flags.DEFINE_string("out", "tasks", "Directory to write task directories into.")
  flags.mark_flags_as_required(["benchmarks"])
  app.run(main)
