"""Hugging Face folders in a multi-process run: two CPU processes with 4 devices each, joined
by `jax.distributed` over loopback, read a folder into one 8-device mesh (each process only
its own shards) and export it again (each tensor gathered in turn, process 0 writes). The
exported folder loads in transformers with the logits of the single-process model."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import safetensors.numpy

from interop_test import HF_CASES, TOL, _hf, _hf_logits, _hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from esjax.parallel import multihost

    assert multihost.initialize_from_env() and jax.process_count() == 2
    from esjax import interop

    src, dst = sys.argv[1:3]
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("proc", "x"))

    def place(leaf):  # split the first dimension 8 divides: over both processes, or (3-D
      for dim, n in enumerate(leaf.shape):  # experts) over processes only, so 4 local
        if n % 8 == 0:  # devices hold each region
          axes = "proc" if leaf.ndim == 3 else ("proc", "x")
          return NamedSharding(mesh, P(*([None] * dim), axes))
      return NamedSharding(mesh, P())

    cfg = interop.read_config(src)
    shardings = jax.tree.map(place, interop.abstract_params(cfg))
    _, params = interop.read_params(src, shardings)
    _, ref = interop.read_params(src)  # one device
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree.leaves(ref)):
      assert not got.is_fully_addressable, path  # spans both processes
      for shard in got.addressable_shards:
        assert shard.data.shape == got.sharding.shard_shape(got.shape), path
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])
    interop.save_pretrained_params(cfg, params, dst, max_shard_bytes=60_000)
    print("done", jax.process_index())
""")


def _free_port() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return str(s.getsockname()[1])


def test_two_processes_read_sharded_and_export(tmp_path):
  _, transformers = _hf()
  hf_model = _hf_model(*HF_CASES["qwen3_moe_first_dense_yarn"])
  hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith("ESJAX_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             ESJAX_COORDINATOR=f"127.0.0.1:{port}", ESJAX_NUM_PROCESSES="2",
             ESJAX_INIT_TIMEOUT="120")
  args = [sys.executable, "-c", CHILD, str(tmp_path / "hf"), str(tmp_path / "out")]
  procs = [subprocess.Popen(args, cwd=ROOT, env=dict(env, ESJAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"done {i}" in out, err[-3000:]

  files = sorted(p.name for p in (tmp_path / "out").iterdir())
  assert "model.safetensors.index.json" in files and len(files) > 3, files
  assert {(tmp_path / "out" / f).stat().st_mode & 0o777 for f in files} == {0o644}
  theirs = {}
  for f in (tmp_path / "hf").glob("*.safetensors"):
    theirs.update(safetensors.numpy.load_file(f))
  ours = {}
  for f in (tmp_path / "out").glob("*.safetensors"):
    ours.update(safetensors.numpy.load_file(f))
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(_hf_logits(back), _hf_logits(hf_model), atol=TOL, rtol=0)
