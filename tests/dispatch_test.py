"""Token dispatch and the grouped matmuls, on hand-built routing.

The expert of the hand-built tests multiplies a row by (expert + 1), so the combined output
of token t is x[t] * sum over its kept assignments of w * (e + 1): which assignments were
computed can be read off exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esjax.routing import dispatch, grouped


def scale_by_expert(rows, group_sizes):
  """expert_fn for grouped_moe: row of expert e -> (e + 1) * row; rows past the groups -> 0."""
  e = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows.shape[0]), side="right")
  scale = jnp.append(jnp.arange(1.0, group_sizes.shape[0] + 1), 0.0)[e]
  return rows * scale[:, None]


def scale_batched(buffers):
  return buffers * jnp.arange(1.0, buffers.shape[0] + 1)[:, None, None]


# T=6 tokens, E=2, k=1. Expert 0 gets tokens 0, 1, 3, 4; expert 1 gets 2, 5.
IND = jnp.array([[0], [0], [1], [0], [0], [1]], jnp.int32)
W = jnp.array([[0.9], [0.2], [0.5], [0.7], [0.2], [-0.0]], jnp.float32)
# Capacity 2. position: expert 0 keeps its earliest two tokens 0, 1 (drops 3, 4).
# probs: expert 0 keeps 0 (0.9) and 3 (0.7); expert 1 keeps 2 and 5 under both.
KEEP = {"position": [1, 1, 1, 0, 0, 1], "probs": [1, 0, 1, 1, 0, 1]}
# Capacity 3 under probs: 1 and 4 tie at 0.2, the lower token index (1) wins.
KEEP3_PROBS = [1, 1, 1, 1, 0, 1]


def test_capacity_formula():
  assert dispatch.capacity(10, 2, 4, 1.0) == 5
  assert dispatch.capacity(10, 2, 4, 1.1) == 6  # ceil(5.5)
  assert dispatch.capacity(3, 1, 8, 0.5) == 1  # at least 1
  with pytest.raises(ValueError, match="capacity_factor=0"):
    dispatch.capacity(10, 2, 4, 0)


def _np_ranks(indices, weights, n_experts, policy):
  """Loop reference: per expert, order its assignments by policy and number them."""
  indices, weights = np.asarray(indices), np.asarray(weights) + 0.0
  rank = np.full(indices.shape, -1)
  for e in range(n_experts):
    members = [(t, j) for t in range(indices.shape[0]) for j in range(indices.shape[1])
               if indices[t, j] == e]
    if policy == "probs":
      members.sort(key=lambda tj: (-weights[tj], tj[0]))
    for r, tj in enumerate(members):
      rank[tj] = r
  return rank


_positions = jax.jit(dispatch.positions_in_expert, static_argnums=(2, 3))
_keep_mask = jax.jit(dispatch.keep_mask, static_argnums=(2, 3, 4))


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_positions_in_expert(policy):
  got = _positions(IND, W, 2, policy)
  np.testing.assert_array_equal(np.asarray(got), _np_ranks(IND, W, 2, policy))
  rng = np.random.default_rng(0)
  t, e, k = 40, 5, 2
  ind = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  w = np.round(rng.uniform(size=(t, k)), 1).astype(np.float32)  # many exact ties
  got = _positions(jnp.asarray(ind), jnp.asarray(w), e, policy)
  np.testing.assert_array_equal(np.asarray(got), _np_ranks(ind, w, e, policy))


def test_position_policy_is_explicit_not_sort_order():
  """Token order decides even when the routing weights would order the tokens otherwise."""
  ind = jnp.zeros((5, 1), jnp.int32)
  w = jnp.array([[0.1], [0.9], [0.5], [0.8], [0.3]])
  keep = _keep_mask(ind, w, 1, 2, "position")
  np.testing.assert_array_equal(np.asarray(keep[:, 0]), [1, 1, 0, 0, 0])
  keep = _keep_mask(ind, w, 1, 2, "probs")
  np.testing.assert_array_equal(np.asarray(keep[:, 0]), [0, 1, 0, 1, 0])


def test_probs_policy_signed_zero_weights_tie():
  """-0.0 and +0.0 weigh the same: the earlier token wins the single slot."""
  keep = _keep_mask(jnp.zeros((2, 1), jnp.int32), jnp.array([[-0.0], [0.0]]), 1, 1,
                            "probs")
  np.testing.assert_array_equal(np.asarray(keep[:, 0]), [1, 0])


def _expected(x, ind, w, keep):
  scale = np.where(np.asarray(keep), np.asarray(w) * (np.asarray(ind) + 1.0), 0.0)
  return np.asarray(x) * scale.sum(1, keepdims=True)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _run(path, x, ind, w, cap, policy):
  if path == "capacity":
    positions = dispatch.positions_in_expert(ind, w, 2, policy)
    return dispatch.capacity_moe(x, ind, w, 2, cap, positions, scale_batched)
  keep = _keep_mask(ind, w, 2, cap, policy)
  return dispatch.grouped_moe(x, ind, w, 2, scale_by_expert, keep)


@pytest.mark.parametrize("path", ["grouped", "capacity"])
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_small_capacity_drops_exactly_the_policy_assignments(path, policy):
  x = jax.random.normal(jax.random.key(0), (6, 4))
  y = _run(path, x, IND, W, 2, policy)
  keep = np.array(KEEP[policy])[:, None]
  np.testing.assert_allclose(np.asarray(y), _expected(x, IND, W, keep), rtol=1e-6)
  if policy == "probs":
    y = _run(path, x, IND, W, 3, policy)
    keep = np.array(KEEP3_PROBS)[:, None]
    np.testing.assert_allclose(np.asarray(y), _expected(x, IND, W, keep), rtol=1e-6)


@pytest.mark.parametrize("path", ["grouped", "capacity"])
def test_top2_dropping_and_gradients(path):
  """k=2 on random routing: the kept set matches the loop ranks; gradients are masked."""
  rng = np.random.default_rng(1)
  t, d = 12, 3
  ind = jnp.asarray(np.stack([rng.choice(2, 2, replace=False) for _ in range(t)]), jnp.int32)
  w = jnp.asarray(rng.uniform(size=(t, 2)), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (t, d))
  keep = _np_ranks(ind, w, 2, "probs") < 5
  run = lambda x, w: _run(path, x, ind, w, 5, "probs")
  y = run(x, w)
  np.testing.assert_allclose(np.asarray(y), _expected(x, ind, w, keep), rtol=1e-6)
  gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(run(x, w)), argnums=(0, 1)))(x, w)
  scale = np.where(keep, np.asarray(w) * (np.asarray(ind) + 1.0), 0.0).sum(1)
  np.testing.assert_allclose(np.asarray(gx), np.broadcast_to(scale[:, None], (t, d)),
                             rtol=1e-6)
  want_gw = np.where(keep, (np.asarray(ind) + 1.0) * np.asarray(x).sum(1)[:, None], 0.0)
  np.testing.assert_allclose(np.asarray(gw), want_gw, rtol=1e-5, atol=1e-6)


def test_dropless_computes_every_assignment():
  x = jax.random.normal(jax.random.key(2), (6, 4))
  y = dispatch.grouped_moe(x, IND, W, 2, scale_by_expert)
  np.testing.assert_allclose(np.asarray(y), _expected(x, IND, W, np.ones((6, 1))), rtol=1e-6)


# Grouped SwiGLU: the blocked layout == lax.ragged_dot, values and gradients.


def _group_cases():
  yield np.array([3, 0, 5, 1]), 9, 2  # an empty group; chunks of 2, 4, 8
  yield np.array([0, 0, 19, 0]), 19, 2  # all in one group: 16 + 2 + 2 (padded 20)
  yield np.array([2, 2, 0, 2]), 11, 1  # rows past the groups; block 1
  yield np.array([5, 1, 0, 0]), 9, 8  # block larger than the groups
  yield np.array([0, 0, 0, 0]), 4, 3  # nothing to compute


@functools.partial(jax.jit, static_argnums=(5, 7))
def _ragged_and_blocked(rows, wg, wu, wd, gs, block, ct, every_multiple):
  """(out, grads) of the ragged_dot SwiGLU and of the blocked one for the same inputs."""
  outs = []
  for fn in (grouped.swiglu_ragged,
             functools.partial(grouped.swiglu_blocked, block=block, max_chunk=8,
                               every_multiple=every_multiple)):
    out, vjp = jax.vjp(lambda *a, fn=fn: fn(a[0], gs, *a[1:]), rows, wg, wu, wd)
    outs.append((out, vjp(ct)))
  return outs


@pytest.mark.parametrize("every_multiple", [True, False])
@pytest.mark.parametrize("case", list(_group_cases()))
def test_blocked_swiglu_equals_ragged_dot(case, every_multiple):
  sizes, n, block = case
  k = jax.random.split(jax.random.key(3), 5)
  rows = jax.random.normal(k[0], (n, 5))
  wg, wu = jax.random.normal(k[1], (4, 5, 6)), jax.random.normal(k[2], (4, 5, 6))
  wd = jax.random.normal(k[3], (4, 6, 5))
  ct = jax.random.normal(k[4], (n, 5))
  (out_r, g_r), (out_b, g_b) = _ragged_and_blocked(rows, wg, wu, wd,
                                                   jnp.asarray(sizes, jnp.int32), block, ct,
                                                   every_multiple)
  np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_r), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out_b)[sizes.sum():] == 0)
  for a, b in zip(g_r, g_b):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_ragged_swiglu_gradients_equal_autodiff_and_keep_two_products():
  """swiglu_ragged's hand-written backward equals autodiff of the same lax.ragged_dot
  composition, and its pullback keeps only the gate and up products of [N, F] (autodiff
  keeps six), besides the rows and the weights."""
  sizes, n, f = np.array([3, 0, 5, 1]), 11, 6
  k = jax.random.split(jax.random.key(4), 5)
  rows = jax.random.normal(k[0], (n, 5))
  wg, wu = jax.random.normal(k[1], (4, 5, f)), jax.random.normal(k[2], (4, 5, f))
  wd = jax.random.normal(k[3], (4, f, 5))
  ct = jax.random.normal(k[4], (n, 5))
  gs = jnp.asarray(sizes, jnp.int32)

  def plain(rows, wg, wu, wd):
    rd = lambda a, w: jax.lax.ragged_dot(a, w, gs)  # noqa: E731
    return rd(jax.nn.silu(rd(rows, wg)) * rd(rows, wu), wd)

  out, pull = jax.vjp(lambda *a: grouped.swiglu_ragged(a[0], gs, *a[1:]), rows, wg, wu, wd)
  ref, ref_pull = jax.vjp(plain, rows, wg, wu, wd)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
  for a, b in zip(pull(ct), ref_pull(ct)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  wide = lambda p: sum(x.shape == (n, f) for x in jax.tree.leaves(p))  # noqa: E731
  assert wide(pull) == 2 and wide(ref_pull) == 6


@pytest.mark.parametrize("every_multiple", [True, False])
def test_chunks_cover_each_group_exactly(every_multiple):
  """Chunks lie inside one group's padded rows, cover them once, and fit the static bounds;
  a group has as many chunks of the largest size as fit, then one chunk of the rest
  (every_multiple) or one per binary digit of it."""
  rng = np.random.default_rng(6)
  n_groups, n = 4, 40
  for _ in range(12):
    block = int(rng.integers(1, 5))
    sizes = rng.multinomial(rng.integers(0, n + 1), np.ones(n_groups) / n_groups)
    lay = grouped.tile_layout(jnp.asarray(sizes, jnp.int32), n, block, 8, every_multiple)
    n_pad = lay.src.shape[0]
    assert n_pad == grouped.max_tiles(n, n_groups, block) * block
    padded = -(-sizes // block) * block
    pstart = np.cumsum(padded) - padded
    owner, n_chunks = np.full(n_pad, -1), np.zeros(n_groups, int)
    for s, c in zip(lay.sizes, lay.chunks):
      for r0, g in zip(np.asarray(c.start)[:int(c.count)], np.asarray(c.group)[:int(c.count)]):
        assert pstart[g] <= r0 and r0 + s <= pstart[g] + padded[g], (sizes, block, s, r0, g)
        assert np.all(owner[r0:r0 + s] == -1)
        owner[r0:r0 + s] = g
        n_chunks[g] += 1
    top = lay.sizes[-1]
    rest = [bin(r // block).count("1") for r in padded % top]
    np.testing.assert_array_equal(
        n_chunks, padded // top + (np.minimum(rest, 1) if every_multiple else rest))
    np.testing.assert_array_equal(owner[:padded.sum()], np.repeat(np.arange(n_groups), padded))
    assert np.all(owner[padded.sum():] == -1)
    # Padded rows hold their group's rows in order, then padding.
    src = np.asarray(lay.src)
    want = np.concatenate([np.r_[np.arange(a, a + z), np.full(p - z, n)]
                           for a, z, p in zip(np.cumsum(sizes) - sizes, sizes, padded)]
                          + [np.full(n_pad - padded.sum(), n)])
    np.testing.assert_array_equal(src, want)


def test_take_rows_gradient_is_the_plain_gather_gradient():
  x = jax.random.normal(jax.random.key(7), (5, 3))
  idx = jnp.array([4, 0, 5, 2, 9, 1])  # 5 and 9: empty rows; row 3 of x unused
  inv = jnp.array([1, 5, 3, 6, 0])
  ct = jax.random.normal(jax.random.key(8), (6, 3))
  g = jax.grad(lambda x: jnp.sum(grouped.take_rows(x, idx, inv) * ct))(x)
  g_ref = jax.grad(lambda x: jnp.sum(jnp.take(x, idx, axis=0, mode="fill", fill_value=0) * ct))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref))


@pytest.mark.parametrize("spec,shapes", [("tkd,tk->td", ((6, 2, 8), (6, 2))),
                                         ("td,de->te", ((6, 8), (8, 4)))])
def test_einsum_f32_keeps_bf16_operands_and_its_gradients_are_float64_autodiffs(spec, shapes):
  """The combine's and the router's float32 einsum: value and both gradients against
  autodiff of a float64 einsum of the same (bf16, float32) operands; its backward keeps the
  bf16 operand as bf16 (autodiff of the float32 einsum keeps a float32 copy)."""
  ka, kb, kg = jax.random.split(jax.random.key(1), 3)
  a = jax.random.normal(ka, shapes[0]).astype(jnp.bfloat16)
  b = jax.random.normal(kb, shapes[1])
  y, pull = jax.vjp(lambda a, b: dispatch.einsum_f32(spec, a, b), a, b)
  g = jax.random.normal(kg, y.shape)
  da, db = pull(g)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
    want, pull64 = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), f64(a), f64(b))
    want_da, want_db = pull64(f64(g))
    want, want_da, want_db = (np.asarray(x) for x in (want, want_da, want_db))
  assert (y.dtype, da.dtype, db.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(da, np.float64), want_da, rtol=1e-2, atol=1e-2)
  stored = {(x.shape, x.dtype) for x in jax.tree.leaves(pull) if hasattr(x, "dtype")}
  assert (a.shape, np.dtype(np.float32)) not in stored and (a.shape, a.dtype) in stored
