"""Per-process rows (esjax/data/hosts.py): which rows a process holds, global arrays built
from them, and two real processes that each read only their half of every batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esjax.data import dataset, hosts, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, S = 8, 16


def _mesh():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("dp", "cp"))


def test_one_process_holds_every_row_and_builds_the_same_arrays():
  assert hosts.process_rows(None, (B, S)).tolist() == list(range(B))
  x = np.arange(B * S, dtype=np.int32).reshape(B, S)
  for spec in (P("dp", "cp"), P("dp"), P()):  # batch and sequence sharded, batch, replicated
    sharding = NamedSharding(_mesh(), spec)
    rows = hosts.process_rows(sharding, (B, S))
    assert rows.tolist() == list(range(B))
    got = hosts.global_batch({"inputs": x}, rows, sharding, B)["inputs"]
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), x)
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])


def test_rows_that_do_not_cover_the_devices_are_refused():
  sharding = NamedSharding(_mesh(), P("dp"))
  local = {"inputs": np.zeros((2, S), np.int32)}
  with pytest.raises(ValueError, match=r"holds rows \[0, 1\] but only rows \[4, 5\] were read"):
    hosts.global_batch(local, np.array([4, 5]), sharding, B)


WORKER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, ml_collections, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from esjax.parallel import multihost
    multihost.initialize_from_env()
    from esjax.data import dataset, hosts

    cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    B, S = 8, 16
    data = dataset.build(cfg, S, B, seed=0, n_eval_batches=1, cache_dir=sys.argv[2])
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("dp", "tp"))
    sharding = NamedSharding(mesh, P("dp"))
    rows = hosts.process_rows(sharding, (B, S))
    weight = jnp.arange(1, B * S + 1, dtype=jnp.int32).reshape(B, S)
    checksum = jax.jit(lambda b: jnp.sum(b["inputs"] * weight + b["targets"]),
                       out_shardings=NamedSharding(mesh, P()))
    out = {"rows": rows.tolist(), "local": [], "checksums": []}
    for _ in range(3):
      local = data.train.next_rows(rows)
      out["local"].append(local["inputs"].tolist())
      out["checksums"].append(int(checksum(hosts.global_batch(local, rows, sharding, B))))
    print("RESULT " + json.dumps(out))
""")


def _free_port() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return str(s.getsockname()[1])


def test_two_processes_each_read_only_their_half(tmp_path):
  texts = [f"document {i} " * (i % 4 + 3) for i in range(80)]
  for name, part in (("a", texts[:40]), ("b", texts[40:])):
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps({"text": t}) + "\n" for t in part)
  prepare.prepare(str(tmp_path / "a.jsonl"), "byte", str(tmp_path / "a"), progress=False)
  source = f"0.6:{tmp_path}/a,0.4:{tmp_path}/b.jsonl"  # a prepared and a raw (cached) source
  cfg = dict(source=source, tokenizer="byte", max_bytes=0, val_fraction=0.1)
  env = {k: v for k, v in os.environ.items() if not k.startswith("ESJAX_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             ESJAX_COORDINATOR=f"127.0.0.1:{_free_port()}", ESJAX_NUM_PROCESSES="2")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg), str(tmp_path / "c")],
                            cwd=ROOT, env={**env, "ESJAX_PROCESS_ID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    results.append(json.loads(stdout.split("RESULT ", 1)[1]))
  assert [r["rows"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]

  one = dataset.build(ml_collections.ConfigDict(cfg), S, B, seed=0, n_eval_batches=1)
  weight = np.arange(1, B * S + 1).reshape(B, S)
  for step in range(3):
    want = next(one.train)
    got = np.concatenate([np.asarray(r["local"][step]) for r in results])
    np.testing.assert_array_equal(got, want["inputs"])
    checksum = int(np.sum(want["inputs"] * weight + want["targets"]))
    assert [r["checksums"][step] for r in results] == [checksum, checksum]
