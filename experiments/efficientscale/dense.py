"""EfficientScale stage 'dense' (see recipe.py); the tiny size trains on a CPU in minutes:

  python -m esjax.main --config=experiments/efficientscale/dense.py \
      --workdir=/tmp/efficientscale/dense

Arg `size=tiny|aquila,root=DIR,steps=N,grow=aki_pro`: root holds the stages' workdirs
(init_from is <root>/<previous stage>). All stages in order, with the compute ledger:
`python -m experiments.efficientscale.run --root=/tmp/efficientscale`.
"""

from experiments.efficientscale import recipe

TEST_ARGS = ("size=aquila",)


def get_config(arg=None):
  return recipe.get_config_for("dense", arg)
