"""Executes the ablation notebooks (jupytext py:percent files) headless, end to end.

Slow (minutes each on a CPU): `python -m pytest -m slow tests/notebooks_test.py`. Each
notebook asserts the function-preservation claims it shows; its training numbers are in the
experiment's README.
"""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ["experiments/scaleup/scaleup.py", "experiments/scaleout/scaleout.py",
             "experiments/routing/routing.py"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: pathlib.Path(p).stem)
def test_notebook_runs(path, tmp_path):
  jupytext = pytest.importorskip("jupytext")
  nbclient = pytest.importorskip("nbclient")
  nb = jupytext.read(ROOT / path)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  env.update(ESJAX_NOTEBOOK_ROOT=str(tmp_path), MPLBACKEND="Agg")
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=1800,
                                   resources={"metadata": {"path": str(ROOT)}})
  try:
    client.execute(env=env)
  finally:  # the executed notebook, outputs and all, next to the runs' workdirs
    jupytext.write(nb, tmp_path / f"{pathlib.Path(path).stem}.ipynb")
  name = pathlib.Path(path).stem
  assert (tmp_path / f"{name}.png").exists()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
  assert "val@end" in text
