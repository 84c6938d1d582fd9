"""DGS worker and server maths (esjax/optim/dgs.py) and the PS logic without Ray."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ml_collections

from esjax.configs import common
from esjax.data import dataset
from esjax.distributed.server import ParameterServer
from esjax.distributed.worker import Worker, init_params
from esjax.models import ModelConfig
from esjax.optim import dgs

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "dgs", "tiny_lm.py")


def _topk_ref(x, k):
  """Indices of the k largest |x| (float64 numpy, ties to the lower index)."""
  flat = np.abs(np.asarray(x, np.float64)).ravel()
  return np.sort(np.argsort(-flat, kind="stable")[:k])


@pytest.mark.parametrize("shape,ratio", [((7, 13), 0.1), ((64,), 0.01), ((5, 4, 3), 1.0),
                                         ((300,), 0.05), ((2, 3), 0.5)])
def test_topk_keeps_exactly_k_largest(shape, ratio):
  x = jax.random.normal(jax.random.key(sum(shape)), shape)
  s = dgs.topk(x, ratio)
  k = dgs.num_kept(int(np.prod(shape)), ratio)
  assert k == max(1, int(np.floor(ratio * np.prod(shape))))
  assert s.indices.shape == s.values.shape == (k,)
  np.testing.assert_array_equal(np.sort(np.asarray(s.indices)), _topk_ref(x, k))
  np.testing.assert_array_equal(s.values, np.asarray(x).ravel()[np.asarray(s.indices)])
  dense = np.asarray(dgs.densify(s, x))
  assert np.count_nonzero(dense) == k
  kept = np.abs(np.asarray(x)).ravel()[_topk_ref(x, k)]
  assert np.abs(np.asarray(x)).ravel()[dense.ravel() == 0].max(initial=0) <= kept.min()


def test_bad_ratio_is_rejected():
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="compression ratio"):
      dgs.num_kept(10, bad)


def _random_steps(n, shapes, seed=0, integer=False):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    leaves = [rng.integers(-8, 9, s).astype(np.float32) if integer
              else rng.standard_normal(s).astype(np.float32) for s in shapes]
    out.append({"a": jnp.asarray(leaves[0]), "b": jnp.asarray(leaves[1])})
  return out


def test_sent_plus_residual_reconstructs_the_accumulated_update():
  # momentum 0: every lr-scaled gradient is either sent or still in `acc`. Integer-valued
  # steps make the float32 sums exact, so the identity holds bit for bit.
  steps = _random_steps(12, [(6, 5), (17,)], integer=True)
  state = dgs.samomentum_init(steps[0])
  sent = jax.tree.map(jnp.zeros_like, steps[0])
  for step in steps:
    payload, state = dgs.samomentum_update(step, state, momentum=0.0, ratio=0.2)
    sent = dgs.apply_payload(sent, payload)
  total = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs), *steps)
  for key in total:
    np.testing.assert_array_equal(np.asarray(sent[key]) + np.asarray(state.acc[key]), total[key])


def test_unsent_coordinate_accumulates_undecayed():
  # Coordinate 0 gets tiny steps, so it never enters the top-k: `acc` is their exact sum
  # (no momentum decay) and `u_last` stays 0. Powers of two keep the sums exact.
  rng = np.random.default_rng(1)
  state = dgs.samomentum_init({"w": jnp.zeros(8)})
  small = []
  for _ in range(10):
    step = np.concatenate([[2.0 ** -rng.integers(8, 12)], 1.0 + rng.random(7)]).astype(np.float32)
    small.append(step[0])
    payload, state = dgs.samomentum_update({"w": jnp.asarray(step)}, state, 0.9, 0.5)
    assert 0 not in np.asarray(payload["w"].indices)
  assert float(state.acc["w"][0]) == float(np.sum(small, dtype=np.float64))
  assert float(state.u_last["w"][0]) == 0.0


def _code_form_reference(steps, momentum, ratio):
  """The reference code's single buffer (methods.md 7.1), float64 numpy: (indices, values)."""
  u = {k: np.zeros(v.shape) for k, v in steps[0].items()}
  out = []
  for step in steps:
    sent = {}
    for key in u:
      u[key] = momentum * u[key] + np.asarray(step[key], np.float64)
      k = dgs.num_kept(u[key].size, ratio)
      idx = _topk_ref(u[key], k)
      mask = np.zeros(u[key].size, bool)
      mask[idx] = True
      mask = mask.reshape(u[key].shape)
      sent[key] = (idx, u[key].ravel()[idx].copy())
      u[key] = u[key] + u[key] * (~mask) * (1 / momentum - 1)
    out.append(sent)
  return out


def test_two_buffer_form_equals_reference_code_form():
  steps = _random_steps(8, [(9, 7), (40,)], seed=3)
  ref = _code_form_reference(steps, 0.9, 0.1)
  state = dgs.samomentum_init(steps[0])
  for step, expected in zip(steps, ref):
    payload, state = dgs.samomentum_update(step, state, 0.9, 0.1)
    for key, (idx, vals) in expected.items():
      order = np.argsort(np.asarray(payload[key].indices))
      np.testing.assert_array_equal(np.asarray(payload[key].indices)[order], idx)
      np.testing.assert_allclose(np.asarray(payload[key].values)[order], vals, rtol=1e-5)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_samomentum_at_full_ratio_is_momentum_sgd(wd):
  params = {"a": jnp.ones((4, 3)), "b": jnp.arange(5.0)}
  grads = _random_steps(6, [(4, 3), (5,)], seed=2)

  def run(opt):
    p, state = params, opt.init(params)
    for g in grads:
      updates, state = opt.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p

  lr, m = 0.05, 0.9
  reference = run(optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=m)))
  full = run(optax.chain(optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr),
                         dgs.samomentum(m, 1.0)))
  sparse = run(optax.chain(optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr),
                           dgs.samomentum(m, 0.25)))
  for key in params:
    np.testing.assert_allclose(full[key], reference[key], rtol=1e-6, atol=1e-7)
  assert not np.allclose(sparse["a"], reference["a"], atol=1e-4)  # the check has teeth


def test_payload_bytes():
  x = {"w": jnp.ones((10, 10)), "b": jnp.ones(10)}
  nbytes, entries = dgs.payload_stats(jax.device_get(dgs.sparsify_tree(x, 0.1)))
  assert (nbytes, entries) == ((10 + 1) * 8, 11)
  assert dgs.payload_stats(x) == (110 * 4, 110)


# The PS logic, with a fixed arrival order and no Ray.

TINY = ModelConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                   max_seq_len=32)
OPTIM = {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3, "clip_norm": 1.0}
# (worker, action): compute an update on the local model, or push the computed one.
SCHEDULE = [(0, "c"), (1, "c"), (2, "c"), (0, "p"), (0, "c"), (2, "p"), (1, "p"), (1, "c"),
            (0, "p"), (2, "c"), (1, "p"), (0, "c"), (2, "p"), (0, "p"), (1, "c"), (1, "p")]
# Staleness of each push: server updates applied since the worker's last reply.
EXPECTED_STALENESS = [0, 1, 2, 2, 1, 3, 2, 2]


def _windows():
  data = ml_collections.ConfigDict(
      {"source": "stdlib", "tokenizer": "byte", "max_bytes": 50_000, "val_fraction": 0.0})
  return dataset.build(data, seq_len=16, batch_size=4, seed=0).train.windows


def _replay(mode, ratio, down_ratio, resync_every=0, check=None, resync="snapshot",
            optim=OPTIM):
  windows = _windows()
  server = ParameterServer(init_params(TINY, 0), mode, down_ratio, resync_every,
                           up_ratio=ratio, resync=resync)
  workers = [Worker(k, TINY.to_dict(), optim, mode, ratio, windows[k::3], 4, seed=0)
             for k in range(3)]
  for k, w in enumerate(workers):
    w.set_params(server.register(k))
  pending, losses, pushes = {}, [], []
  for k, action in SCHEDULE:
    if action == "c":
      pending[k] = workers[k].compute()
      losses.append(pending[k][1]["loss"])
    else:
      payload, info = pending.pop(k)
      pushes.append(payload)
      workers[k].receive(server.push(k, payload, info))
      if check:
        check(server, workers, k)
  return server, workers, losses, pushes


@pytest.mark.parametrize("mode", ["dgs", "oneway"])
def test_full_ratio_reproduces_dense_async_sgd(mode):
  """(With resync="current": the authors' snapshot resync sends stale models on purpose.)"""
  dense, dense_workers, dense_losses, _ = _replay("dense", 1.0, 1.0)
  other, other_workers, other_losses, _ = _replay(mode, 1.0, 1.0, resync_every=3,
                                                  resync="current")
  np.testing.assert_allclose(other_losses, dense_losses, rtol=1e-5)
  for a, b in zip(other.params, dense.params):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for wa, wb in zip(other_workers, dense_workers):
    for a, b in zip(wa.param_leaves(), wb.param_leaves()):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  staleness = [r["staleness"] for r in dense.drain_records()]
  assert staleness == EXPECTED_STALENESS == [r["staleness"] for r in other.drain_records()]
  # A sparse run of the same schedule must differ (the check has teeth).
  sparse, *_ = _replay(mode, 0.05, 0.1)
  assert not np.allclose(sparse.params[0], dense.params[0], atol=1e-5)


@pytest.mark.parametrize("resync", ["snapshot", "current"])
def test_dgs_downlink_conserves_the_model_and_uplink_is_exact(resync):
  """Worker k holds sync + sent_k, so it plus what it misses is the server model; the server
  model is the initial one minus every pushed payload."""
  def check(server, workers, k):
    mine = workers[k].param_leaves()
    for theta_k, s, a in zip(mine, server.sync, server.sent[k]):
      np.testing.assert_allclose(theta_k, np.asarray(s) + np.asarray(a), rtol=1e-5, atol=1e-6)

  server, workers, _, pushes = _replay("dgs", 0.05, 0.1, resync_every=5, check=check,
                                       resync=resync)
  expected = [np.asarray(p, np.float64) for p in init_params(TINY, 0)]
  for payload in pushes:
    for i, s in enumerate(payload):
      np.subtract.at(expected[i].reshape(-1), np.asarray(s.indices), np.asarray(s.values))
  for got, want in zip(server.params, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  records = server.drain_records()
  n = server.n_entries
  leaves = init_params(TINY, 0)
  assert all(abs(r["up_density"] - dgs.expected_density(leaves, 0.05)) < 1e-12 for r in records)
  sparse_down = [r for r in records if r["down_density"] < 1.0]
  assert sparse_down and all(
      abs(r["down_density"] - dgs.expected_density(leaves, 0.1)) < 1e-12 for r in sparse_down)
  assert any(r["bytes_down"] == server.dense_bytes for r in records)  # a resync happened
  assert n == sum(x.size for x in leaves)


def test_server_rejects_bad_input():
  with pytest.raises(ValueError, match="mode"):
    ParameterServer([np.zeros(3)], mode="sync")
  with pytest.raises(ValueError, match="before it registered"):
    ParameterServer([np.zeros(3)], mode="dense").push(0, [np.zeros(3)])


@pytest.mark.parametrize("arg", ["dense", "oneway", "dgs", "dgs,test=1"])
def test_shipped_config_builds(arg):
  spec = importlib.util.spec_from_file_location("tiny_lm", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  from esjax.distributed.runtime import expected_density  # noqa: PLC0415
  common.model_config(config)
  assert abs(expected_density(config) - config.dgs.ratio) < 0.2 * config.dgs.ratio
  with pytest.raises(ValueError, match="expected one of"):
    module.get_config("sync")
  assert config.dgs.mode == arg.split(",")[0]


def test_bad_config_gets_a_one_line_error():
  spec = importlib.util.spec_from_file_location("tiny_lm", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from esjax.distributed.runtime import validate  # noqa: PLC0415
  validate(module.get_config("dgs"))
  for section, key, value, match in [("dgs", "ratio", 0.0, "dgs.ratio"),
                                     ("dgs", "down_ratio", 2.0, "dgs.down_ratio"),
                                     ("dgs", "mode", "sync", "dgs.mode"),
                                     ("train", "num_workers", 0, "num_workers"),
                                     ("optim", "schedule", "step", "optim.schedule")]:
    config = module.get_config("dgs")
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
      validate(config)


def test_lr_schedule():
  from esjax.distributed.worker import lr_schedule  # noqa: PLC0415
  constant = lr_schedule({"lr": 0.1, "warmup_steps": 10})
  assert [float(constant(i)) for i in (0, 5, 10, 500)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
  cosine = lr_schedule({"lr": 0.1, "warmup_steps": 10, "schedule": "cosine",
                        "decay_steps": 110, "final_lr_fraction": 0.1})
  assert float(cosine(60)) == pytest.approx(0.01 + 0.09 * 0.5)  # halfway down the cosine
  assert float(cosine(110)) == pytest.approx(0.01)


def _threshold_topk(x, rate):
  """serialization.py's k and mask: k = int(numel * rate) or 1; keep |x| > kthvalue(|x|,
  numel - k) (exactly k entries for distinct magnitudes)."""
  k = int(x.size * rate) if int(x.size * rate) != 0 else 1
  a = np.abs(x)
  return a > np.sort(a)[x.size - k - 1]


def _authors_worker(steps, lrs, lr0, momentum):
  """core/utils/serialization.py worker_gradient_executor with core/optim/gradient_sgd.py's
  `rate=0.01 * (lr / self.args.lr)` (yanring/GradientServer 1ca8053), float64: one buffer
  u, u = m u + lr g; payload u * mask; u += u * (1 - mask) * (1 / m - 1). Yields payloads."""
  u = {key: np.zeros(v.shape) for key, v in steps[0].items()}
  for step, lr in zip(steps, lrs):
    out = {}
    for key in u:
      u[key] = momentum * u[key] + lr * np.asarray(step[key], np.float64)
      mask = _threshold_topk(u[key].ravel(), 0.01 * (lr / lr0)).reshape(u[key].shape)
      out[key] = u[key] * mask
      u[key] = u[key] + u[key] * (~mask) * (1 / momentum - 1)
    yield out


def test_density_follows_the_learning_rate_as_the_authors_worker():
  """Warmup then a decay: k changes nearly every step, from one compiled update."""
  grads = _random_steps(10, [(40, 30), (700,)], seed=4)
  lrs = [0.02, 0.1, 0.2, 0.2, 0.15, 0.1, 0.06, 0.03, 0.01, 0.004]
  state = dgs.samomentum_init(grads[0])
  update = jax.jit(lambda s, st, k: dgs.samomentum_update(s, st, 0.9, 0.01, k))
  for g, lr, want in zip(grads, lrs, _authors_worker(grads, lrs, 0.2, 0.9)):
    kept = {key: dgs.scheduled_kept(v.size, 0.01, lr, 0.2) for key, v in g.items()}
    step = jax.tree.map(lambda x: lr * x, g)
    payload, state = update(step, state, jax.tree.map(np.int32, kept))
    for key in g:
      sent = dgs.trim([jax.device_get(payload[key])], [kept[key]])[0]
      assert sent.indices.size == np.count_nonzero(want[key])
      np.testing.assert_allclose(np.asarray(dgs.densify(sent, g[key])), want[key],
                                 rtol=1e-4, atol=1e-7)
  assert update._cache_size() == 1
  assert [dgs.scheduled_kept(1200, 0.01, lr, 0.2) for lr in (0.0, 0.02, 0.2, 0.3)] == [1, 1,
                                                                                        12, 12]


def _authors_server(params, pushes, n_workers, resync_every, rate):
  """core/server.py GradientServer.receive (SparseGradientUpdate), float64, one accumulator
  `acc_send_grad` per worker (one server thread per worker), per-tensor filter
  server_gradient_filter. Its resync fires on worker 1's pushes when max_version % 150 == 1;
  here on the server's update count (esjax's rule), the rest as written: the flagged worker
  gets `synced_model` (the snapshot) and its accumulator is zeroed. Returns the replies
  (("dense", arrays) or ("sparse", dense-ified arrays))."""
  global_model = [np.asarray(p, np.float64).copy() for p in params]
  synced = [p.copy() for p in global_model]
  acc = {k: [np.zeros_like(p) for p in global_model] for k in range(n_workers)}
  un_synced, replies = set(), []
  for version, (k, update) in enumerate(pushes, 1):
    for p, u in zip(global_model, update):
      p -= u  # update(): global_model.add_(-1, gradient_update)
    agg = [p - s for p, s in zip(global_model, synced)]
    if resync_every and version % resync_every == 0:
      synced = [p.copy() for p in global_model]  # sync_model()
      un_synced = set(range(n_workers))
    if k in un_synced:
      acc[k] = [np.zeros_like(p) for p in global_model]
      replies.append(("dense", [s.copy() for s in synced]))
      un_synced.remove(k)
    else:
      send = [a - c for a, c in zip(agg, acc[k])]
      send = [x * _threshold_topk(x.ravel(), rate).reshape(x.shape) for x in send]
      acc[k] = [c + x for c, x in zip(acc[k], send)]
      replies.append(("sparse", send))
  return replies, global_model


def test_dgs_server_matches_the_authors_gradient_server():
  rng = np.random.default_rng(5)
  params = [rng.standard_normal((30, 20)), rng.standard_normal(250)]
  order = [0, 1, 2, 0, 0, 2, 1, 1, 0, 2, 2, 1, 0, 1, 2, 0, 1, 2, 2, 0]
  pushes = []
  for k in order:  # sparse uploads of random coordinates
    update = []
    for p in params:
      idx = rng.choice(p.size, 3, replace=False)
      update.append(dgs.Sparse(idx.astype(np.int32),
                               (rng.standard_normal(3) * 0.1).astype(np.float32)))
    pushes.append((k, update))
  server = ParameterServer([p.astype(np.float32) for p in params], "dgs", down_ratio=0.05,
                           resync_every=6)
  for k in range(3):
    server.register(k)
  dense_updates = [(k, [np.asarray(dgs.densify(s, p)) for s, p in zip(u, params)])
                   for k, u in pushes]
  want, want_model = _authors_server(params, dense_updates, 3, 6, 0.05)
  for (k, update), (kind, reply) in zip(pushes, want):
    got = server.push(k, update)
    assert dgs.is_sparse_payload(got) == (kind == "sparse")
    got = [np.asarray(dgs.densify(g, p)) if kind == "sparse" else np.asarray(g)
           for g, p in zip(got, params)]
    for g, r in zip(got, reply):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  for g, w in zip(server.params, want_model):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # Resyncs after updates 6, 12, 18; worker 1 pushes no more after 18: 3 + 3 + 2.
  assert sum(kind == "dense" for kind, _ in want) == 8


def test_worker_uploads_follow_the_lr_warmup():
  """Through the Worker and the server: each push sends scheduled_kept entries per tensor at
  that worker step's lr (20-step warmup), the server pads them back to one shape."""
  optim = dict(OPTIM, warmup_steps=20)
  server, workers, _, pushes = _replay("dgs", 0.05, 0.1, optim=optim)
  from esjax.distributed.worker import lr_schedule  # noqa: PLC0415
  schedule, sizes = lr_schedule(optim), [x.size for x in init_params(TINY, 0)]
  records = server.drain_records()
  for payload, record in zip(pushes, records):
    lr = float(schedule(record["worker_step"] - 1))
    want = [dgs.scheduled_kept(n, 0.05, lr, optim["lr"]) for n in sizes]
    assert [s.indices.size for s in payload] == want
    assert record["up_density"] == pytest.approx(sum(want) / server.n_entries)
  assert len({r["up_density"] for r in records}) > 2
