"""`checkpoint.init_from=<Hugging Face folder>`: the folder is read straight into the run's
layout and converted as an orbax source would be (identity, growth, upcycling, both). Every
case here is function preserving (FPI growth by an integer factor, top-k-then-softmax
upcycling), so each converted model, built sharded over 8 devices, must give transformers'
logits of the source folder."""

import jax
import numpy as np
import pytest
from flax import nnx

from esjax import interop
from esjax.configs import common
from esjax.parallel import rules
from esjax.sharding.layout import Layout
from esjax.sharding.plan import make_plan
from esjax.train import init_from
from interop_test import HF_CASES, TOL, _hf_logits, _hf_model, _logits

PARALLEL = dict(dp=4, tp=2, ep=8, etp=1, fsdp=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  hf_model = _hf_model(*HF_CASES["llama3_rope"])
  path = tmp_path_factory.mktemp("hf")
  hf_model.save_pretrained(path, max_shard_size="60KB")
  return path, _hf_logits(hf_model)


def _start(folder, model_cfg, grow="fpi"):
  """The loop's init_from path: the run's plan, init_from.load onto its model shardings."""
  config = common.base_config()
  config.checkpoint.init_from, config.checkpoint.grow = str(folder), grow
  config.parallel.update(PARALLEL)
  plan = make_plan(Layout.from_config(config.parallel))
  params = init_from.load(config, model_cfg, plan)
  shardings = rules.named(plan, rules.model_specs(plan, model_cfg))
  jax.tree.map(lambda p, s: p.sharding.is_equivalent_to(s, p.ndim) or pytest.fail(str(s)),
               params, shardings)
  return params


@pytest.mark.parametrize("change", ["identity", "grow", "upcycle", "grow_upcycle"])
def test_init_from_hf_folder(folder, change):
  path, ref = folder
  cfg = interop.read_config(path)
  if "grow" in change:  # twice the width, the same head_dim: FPI keeps the function
    cfg = cfg.replace(d_model=128, n_heads=8, n_kv_heads=4, d_ff=192)
  if "upcycle" in change:  # top-k then softmax: exact for any router
    cfg = cfg.replace(n_experts=8, top_k=2, router_init_std=0.5)
  params = _start(path, cfg)
  if "upcycle" in change:
    w_gate = params["layers"][0]["mlp"]["w_gate"]
    assert w_gate.shape[0] == 8 and w_gate.sharding.spec[0] is not None  # experts split
  model = interop.model_from_params(cfg, jax.device_get(params))
  np.testing.assert_allclose(_logits(model), ref, atol=TOL, rtol=0)


def test_init_from_hf_folder_names_the_misfit(folder):
  path, _ = folder
  cfg = interop.read_config(path).replace(qk_norm="head")
  with pytest.raises(ValueError, match=r"attn.k_norm.scale' \(shape \(16,\)\) is missing"):
    _start(path, cfg)


def test_host_plan_is_one_parameter_and_its_source(folder):
  """host_plan's peak = the largest (parameter in the target dtype + the source tensors it
  reads), recomputed here from the tensor sizes in the files; all 8 devices are local, so
  the local shards of a parameter are one copy of it however it is split."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  path, _ = folder
  tensors = {}
  for f in path.glob("*.safetensors"):
    tensors.update(safetensors.numpy.load_file(f))
  cfg = interop.read_config(path)
  nbytes = {k: v.nbytes for k, v in tensors.items()}
  want = max(2 * v for v in nbytes.values())  # float32 checkpoint into float32 parameters
  mesh = jax.make_mesh((8,), ("x",))
  shardings = jax.tree.map(
      lambda a: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
          *(["x"] if a.shape[0] % 8 == 0 else []))), interop.abstract_params(cfg))
  plan = interop.host_plan(path, shardings)
  assert plan["peak_host_bytes"] == want and plan["checkpoint_bytes"] == sum(nbytes.values())
  assert plan["peak_param"] in ("embed", "lm_head") and plan["devices"] == 8
  bf16 = interop.host_plan(path, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, "bfloat16", sharding=s),
      interop.abstract_params(cfg), shardings))
  assert bf16["peak_host_bytes"] == want // 2 + want // 2 // 2  # bf16 buffers, f32 source
  params = nnx.to_pure_dict(nnx.state(interop.from_pretrained(path), nnx.Param))
  assert plan["device_bytes"] == sum(
      x.nbytes // (8 if x.shape[0] % 8 == 0 else 1) for x in jax.tree.leaves(params))


@pytest.mark.slow  # the 47B-parameter MoE's abstract shapes take ~30 s to trace here
def test_llama8b_upcycling_start_fits_a_24gb_host(tmp_path):
  """Llama-3.1-8B (bf16, headers only: sparse files) read for its upcycling start (8
  experts top-2, dp=8 ep=8 fsdp on 8 devices): the host peak is the embedding's buffers plus
  its mapped source, 2 x 128256 x 4096 x 2 bytes = 2.1 GB, far below a 24 GiB host."""
  from benchmarks import hf_memory  # pylint: disable=g-import-not-at-top
  from esjax.models import count_params, presets  # pylint: disable=g-import-not-at-top
  row = hf_memory.run_plan8b(tmp_path / "llama8b")
  assert row["peak_host_bytes"] == 2 * 128256 * 4096 * 2 < 24 * 2**30
  assert row["checkpoint_bytes"] == 2 * count_params(presets.get_preset("llama3-8b"))["total"]
  assert row["devices"] == 8 and row["fits_24_gib_host"]
