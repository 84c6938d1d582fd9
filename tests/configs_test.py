"""Every config file shipped in esjax/configs and experiments/ loads, locks, and builds its
model (shapes only, with jax.eval_shape, so the real-size presets cost nothing).

A file is a config file when it defines `get_config`. It is tested with no arg and with each
arg in its optional module-level `TEST_ARGS` tuple.
"""

import glob
import importlib.util
import os

import jax
import pytest

from esjax.configs import common
from esjax.models import params as params_lib
from esjax.models.config import count_params
from esjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_files():
  files = glob.glob(os.path.join(ROOT, "esjax", "configs", "*.py"))
  files += glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"), recursive=True)
  out = []
  for path in sorted(files):
    with open(path, encoding="utf-8") as f:
      if "\ndef get_config(" in f.read():
        out.append(os.path.relpath(path, ROOT))
  return out


def load(path):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + path.replace(os.sep, "_").removesuffix(".py"), os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cases():
  out = []
  for path in config_files():
    for arg in (None, *getattr(load(path), "TEST_ARGS", ())):
      out.append(pytest.param(path, arg, id=f"{path}:{arg or ''}"))
  return out


def test_config_files_are_found():
  files = config_files()
  assert "esjax/configs/tiny.py" in files
  assert "esjax/configs/common.py" not in files


@pytest.mark.parametrize("path, arg", cases())
def test_config_builds_its_model(path, arg):
  config = load(path).get_config(arg) if arg is not None else load(path).get_config()
  config.lock()
  config.to_json_best_effort()
  model_cfg = common.model_config(config)
  _, abstract, _ = params_lib.abstract_model(model_cfg)
  n_params = sum(x.size for x in jax.tree.leaves(abstract))
  assert n_params == count_params(model_cfg)["total"]
  if {"train", "optim", "checkpoint", "parallel"} <= set(config.keys()):
    loop.check_config(config, model_cfg)
