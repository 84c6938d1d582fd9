"""Runs the EfficientScale stages in order in one process and writes the compute ledger.

  python -m experiments.efficientscale.run --root=/tmp/efficientscale            # tiny, CPU
  python -m experiments.efficientscale.run --root=DIR --stages=scaleout,scratch  # some

Each stage trains in `<root>/<stage>` (a stage with a `stage.json` there is not rerun), then
`<root>/ledger.json` gets tokens, model FLOPs and wall time per stage and the savings of the
staged recipe against the measured from-scratch MoE run (and AquilaMoE's Table 6 estimate:
all tokens at the last stage's throughput). One JSON line per stage goes to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from esjax.configs import common
from esjax.train import flops
from experiments.efficientscale import recipe

_ROOT = flags.DEFINE_string("root", "/tmp/efficientscale", "Directory of the stages' workdirs.")
_SIZE = flags.DEFINE_enum("size", "tiny", list(recipe.SHAPES), "Model and budget size.")
_STAGES = flags.DEFINE_list("stages", list(recipe.STAGES), "Stages to run, in order.")
_GROW = flags.DEFINE_string("grow", "aki_pro", "Scale-Up recipe (esjax.transforms.growth).")


def run_stage(config, workdir: str, name: str) -> tuple[dict, flops.Stage]:
  """Trains one stage; returns the loop's summary and its ledger entry, both kept in
  `<workdir>/stage.json` so that a finished stage is not measured again."""
  from esjax.train import loop  # pylint: disable=g-import-not-at-top
  record = os.path.join(workdir, "stage.json")
  if os.path.exists(record):
    with open(record) as f:
      saved = json.load(f)
    return saved["summary"], flops.Stage(**saved["stage"])
  summary = loop.train_and_evaluate(config, workdir)
  tc = config.train
  tokens = tc.steps * tc.batch_size * tc.seq_len
  stage = flops.Stage.measured(name, common.model_config(config), tc.seq_len, tokens,
                               summary["wall_s"])
  with open(record, "w") as f:
    json.dump({"summary": summary, "stage": dataclasses.asdict(stage)}, f, indent=1)
  return summary, stage


def ledger_summary(stages: dict[str, flops.Stage], val: dict[str, float]) -> dict:
  staged = [stages[s] for s in ("dense", "scaleup", "scaleout") if s in stages]
  ledger = flops.Ledger(staged)
  out = ledger.summary(stages.get("scratch"))
  out["table6_estimate"] = flops.savings(staged) if staged else {}
  out["val_loss"] = val
  return out


def main(argv):
  del argv
  root = _ROOT.value
  stages, val = {}, {}
  for name in _STAGES.value:
    config = recipe.stage_config(name, _SIZE.value, root, grow=_GROW.value)
    summary, stage = run_stage(config, os.path.join(root, name), name)
    stages[name], val[name] = stage, summary["val_loss"]
    print(json.dumps({"stage": name, "tokens": stage.tokens, "wall_s": round(stage.wall_s, 1),
                      "gflop_per_token": stage.flops_per_token / 1e9,
                      "val_loss": summary["val_loss"]}), flush=True)
  out = ledger_summary(stages, val)
  with open(os.path.join(root, "ledger.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps({"savings": out["savings"], "table6_estimate": out["table6_estimate"]}))


if __name__ == "__main__":
  app.run(main)
