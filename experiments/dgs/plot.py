"""Loss vs bytes communicated for DGS runs: a PNG and a Markdown table.

  python experiments/dgs/plot.py --out=experiments/dgs/loss_vs_bytes.png \
    dense=/tmp/dgs_dense oneway=/tmp/dgs_oneway dgs=/tmp/dgs_dgs

Each positional argument is LABEL=WORKDIR of a `esjax.distributed.main` run; the script reads
its `metrics.jsonl` (the `val_loss` records) and `summary.json`.
"""

import json
import os
import sys

from absl import app, flags

_OUT = flags.DEFINE_string("out", "loss_vs_bytes.png", "Where the PNG goes.")

MB = 1e6


def read_run(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "val_loss" in r]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return evals, summary


def loss_at_bytes(evals, budget):
  """Validation loss of the last evaluation within `budget` total bytes (None if none)."""
  within = [r["val_loss"] for r in evals if r["bytes_up_total"] + r["bytes_down_total"] <= budget]
  return within[-1] if within else None


def main(argv):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  runs = dict(arg.split("=", 1) for arg in argv[1:])
  if not runs:
    sys.exit("usage: plot.py --out=FILE.png LABEL=WORKDIR ...")
  data = {label: read_run(workdir) for label, workdir in runs.items()}

  fig, (ax_bytes, ax_steps) = plt.subplots(1, 2, figsize=(11, 4))
  for label, (evals, _) in data.items():
    sent = [r for r in evals if r["bytes_up_total"] + r["bytes_down_total"] > 0]  # log axis
    total = [(r["bytes_up_total"] + r["bytes_down_total"]) / MB for r in sent]
    ax_bytes.plot(total, [r["val_loss"] for r in sent], marker=".", label=label)
    ax_steps.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker=".",
                  label=label)
  first = next(iter(data.values()))[0][0]
  if first["step"] == 0:
    ax_bytes.axhline(first["val_loss"], color="gray", ls=":", label="initial model")
  ax_bytes.set(xscale="log", xlabel="MB communicated (up + down, all workers)",
               ylabel="validation loss", title="loss vs bytes")
  ax_steps.set(xlabel="server updates", ylabel="validation loss", title="loss vs updates")
  for ax in (ax_bytes, ax_steps):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)

  smallest = min((e[-1]["bytes_up_total"] + e[-1]["bytes_down_total"]) for e, _ in data.values())
  print(f"| run | updates | final val loss | val loss at {smallest / MB:.1f} MB | up MB | "
        "down MB | total MB | total / dense | up density | down density | "
        "dense replies | mean staleness | wall s |")
  print("|---" * 13 + "|")
  for label, (evals, s) in data.items():
    total = s["bytes_up"] + s["bytes_down"]
    dense_total = 2 * s["updates"] * s["model_bytes"]  # a dense reply and update per step
    at_budget = loss_at_bytes(evals, smallest)
    print(f"| {label} | {s['updates']} | {s['val_loss']:.3f} | "
          f"{'-' if at_budget is None else f'{at_budget:.3f}'} | {s['bytes_up'] / MB:.1f} | "
          f"{s['bytes_down'] / MB:.1f} | {total / MB:.1f} | {total / dense_total:.4f} | "
          f"{s['up_density']:.4f} | {s['down_density']:.4f} | {s.get('dense_replies', '-')} | "
          f"{s['mean_staleness']:.2f} | {s['time']:.0f} |")


if __name__ == "__main__":
  app.run(main)
