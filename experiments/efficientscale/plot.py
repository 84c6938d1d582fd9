"""Validation loss against training FLOPs: the staged recipe (dense -> scaleup -> scaleout,
each stage's FLOPs added after the previous stage's) and the MoE from scratch.

  python experiments/efficientscale/plot.py --root=/tmp/efficientscale \
    --out=experiments/efficientscale/loss_vs_flops.png

Reads `<root>/<stage>/metrics.jsonl` (the `val_loss` records) and `<root>/<stage>/stage.json`
(tokens and FLOPs per token, written by experiments/efficientscale/run.py).
"""

import json
import os

from absl import app, flags

_ROOT = flags.DEFINE_string("root", "/tmp/efficientscale", "The run's --root.")
_OUT = flags.DEFINE_string("out", "loss_vs_flops.png", "Where the PNG goes.")

STAGED = ("dense", "scaleup", "scaleout")


def curve(root: str, stage: str, offset: float) -> tuple[list[float], list[float], float]:
  """(cumulative FLOPs, val losses, FLOPs at the stage's end) of one stage."""
  with open(os.path.join(root, stage, "stage.json")) as f:
    saved = json.load(f)
  tokens_per_step = saved["stage"]["tokens"] / saved["summary"]["step"]
  per_token = saved["stage"]["flops_per_token"]
  with open(os.path.join(root, stage, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "val_loss" in r]
  xs = [offset + r["step"] * tokens_per_step * per_token for r in evals]
  return xs, [r["val_loss"] for r in evals], offset + saved["stage"]["tokens"] * per_token


def main(argv):
  del argv
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6.5, 4))
  offset = 0.0
  for stage in STAGED:
    xs, ys, offset_next = curve(_ROOT.value, stage, offset)
    ax.plot(xs, ys, marker=".", label=f"staged: {stage}")
    if stage != STAGED[-1]:
      ax.axvline(offset_next, color="0.8", lw=0.8)
    offset = offset_next
  xs, ys, _ = curve(_ROOT.value, "scratch", 0.0)
  ax.plot(xs, ys, marker=".", color="k", label="MoE from scratch")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (model FLOPs, Megatron's count)")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title("EfficientScale (tiny): staged recipe vs MoE from scratch")
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)
  print(json.dumps({"out": _OUT.value}))


if __name__ == "__main__":
  app.run(main)
