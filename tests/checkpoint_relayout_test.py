"""esjax.train.relayout (stacked layers -> one array per layer, without moving data) and
esjax.train.shard_reader (a saved item -> any layout), checked against numpy slicing and
stacking of the same values, on 8 fake devices."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from esjax.parallel import stages
from esjax.train import relayout, shard_reader

L, D, F = 8, 4, 6


def mesh(**axes):
  devices = np.asarray(jax.devices()[:8]).reshape(tuple(axes.values()))
  return jax.sharding.Mesh(devices, tuple(axes))


def model_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"embed": rng.normal(size=(10, D)).astype(np.float32),
          "layers": {i: {"w": rng.normal(size=(D, F)).astype(np.float32),
                         "b": {"x": rng.normal(size=(F,)).astype(np.float32)}}
                     for i in range(L)}}


def placed(stacked, m, specs):
  """`stacked` (numpy) on mesh `m`, each stacked leaf by its spec in `specs` (by name)."""
  def put(x, spec):
    return jax.device_put(x, NamedSharding(m, spec))
  slots = {p: {"w": put(t["w"], specs["w"]), "b": {"x": put(t["b"]["x"], specs["x"])}}
           for p, t in stacked[stages.STAGES].items()}
  return {"embed": put(stacked["embed"], P()), stages.STAGES: slots}


CASES = [  # (mesh axes, format, specs of the stacked leaves)
    (dict(pp=2, tp=2, dp=2), stages.StageFormat(L, 2, 2, 1),
     {"w": P("pp", None, None, None, "tp"), "x": P("pp", None, "dp")}),  # ZeRO-1 on R
    (dict(dp=8), stages.StageFormat(L, 1, 1, 1),
     {"w": P(None, None, ("dp",)), "x": P()}),  # R split 8 ways; x replicated
    (dict(pp=4, dp=2), stages.StageFormat(L, 4, 1, 2),
     {"w": P("pp", None, None, "dp"), "x": P("pp")}),
    (dict(pp=2, tp=2, dp=2), stages.StageFormat(L, 1, 1, 1),  # two axes on one dim
     {"w": P(None, None, ("tp", "dp")), "x": P(None, None, ("dp", "tp"))}),
]


@pytest.mark.parametrize("axes,fmt,specs", CASES)
def test_split_gives_each_layer_on_the_devices_that_hold_it(axes, fmt, specs):
  tree = model_tree()
  state = placed(stages.stack(tree, fmt), mesh(**axes), specs)
  out = relayout.split(state, fmt)
  assert sorted(out["layers"]) == sorted(str(i) for i in range(L))
  for i in range(L):
    for name, got, want in (("w", out["layers"][str(i)]["w"], tree["layers"][i]["w"]),
                            ("x", out["layers"][str(i)]["b"]["x"],
                             tree["layers"][i]["b"]["x"])):
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"layer {i} {name}")
      # Only the devices that hold a piece of the layer in the stacked state hold it now.
      p = next(p for p in range(fmt.period) if i in fmt.layer_index()[p])
      pos = tuple(np.argwhere(fmt.layer_index()[p] == i)[0])
      t = state[stages.STAGES][p]
      x = t["w"] if name == "w" else t["b"]["x"]
      holders = {sh.device for sh in x.addressable_shards
                 if all(pos[d] in range(*sh.index[d].indices(x.shape[d])) for d in range(3))}
      assert set(got.sharding.device_set) == holders, (i, name)
  np.testing.assert_array_equal(np.asarray(out["embed"]), tree["embed"])


@pytest.mark.parametrize("stacked", [False, True], ids=["per-layer", "stacked"])
@pytest.mark.parametrize("src,dst", [(0, 1), (1, 2), (2, 3), (3, 0)])
def test_a_saved_item_reads_into_another_layout(tmp_path, src, dst, stacked):
  """Layout `src`'s tree saved by orbax (one array per layer from `split`, or stacked as
  `src` stacks it) and read by `shard_reader` into layout `dst`: the numpy stack of the same
  values for `dst`, on `dst`'s shardings; and into the model's own tree."""
  tree = model_tree(1)
  a_axes, a_fmt, a_specs = CASES[src]
  b_axes, b_fmt, b_specs = CASES[dst]
  state = placed(stages.stack(tree, a_fmt), mesh(**a_axes), a_specs)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "item", state if stacked else relayout.split(state, a_fmt))
  want = stages.stack(tree, b_fmt)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        placed(want, mesh(**b_axes), b_specs))
  saved = a_fmt if stacked else None
  got = shard_reader.read(str(tmp_path / "item"), saved, target, b_fmt)
  jax.tree.map(lambda g, w, t: (np.testing.assert_array_equal(np.asarray(g), w),
                                assert_sharding(g, t)), got, want, target)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  model = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)
  got = shard_reader.read(str(tmp_path / "item"), saved, model)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), w), got, tree)


def assert_sharding(got, target):
  assert got.sharding.is_equivalent_to(target.sharding, got.ndim)
