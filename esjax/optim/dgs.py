"""DGS: dual-way gradient sparsification with SAMomentum (methods.md section 7).

Pure functions on pytrees of parameter-shaped arrays. Every tensor is sparsified on its own:
`k = max(1, floor(ratio * size))` entries of largest magnitude are kept, exactly k (ties go to
the lower flat index, as `jax.lax.top_k` does).

Worker (7.1). State `u_last` (the momentum last sent) and `acc` (lr-scaled gradients not yet
sent). With `step = lr * (grad + wd * params)`:

    c      = momentum * u_last + acc + step
    send     c on the top-k of |c|
    u_last = where(sent, c, u_last)        # sent coordinates: heavy-ball momentum continues
    acc    = where(sent, 0, acc + step)    # unsent coordinates: accumulate without decay

The authors' worker sends a density that follows the learning rate, `ratio * lr / lr0`
(core/optim/gradient_sgd.py: `rate=0.01 * (lr / self.args.lr)`): `scheduled_kept` gives each
tensor's k for a step. The jitted update keeps the static top-`num_kept(size, ratio)` slots
and sends the first k of them (`kept`); `trim` cuts the payload to those on the host, and
the server `pad`s it back to the static size, so neither side recompiles as k changes.

Server (7.2). Global model `params`, snapshot `sync`, per worker `sent_k` (what it has been
sent since the last resync), so worker k holds `sync + sent_k`. After applying an update,
worker k is missing `params - sync - sent_k`; the server sends its top-k and adds that to
`sent_k`. The rest stays behind for later replies (error feedback on the downlink).

The functions are written for `jax.jit`: `ratio` and `momentum` are Python floats.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

INDEX_BYTES = 4  # int32 flat indices on the wire


class Sparse(NamedTuple):
  """One tensor's payload: flat int32 `indices` [k] and their `values` [k]."""
  indices: jax.Array
  values: jax.Array


def _is_sparse(x: Any) -> bool:
  return isinstance(x, Sparse)


def num_kept(size: int, ratio: float) -> int:
  """Entries a tensor of `size` elements sends at `ratio`: max(1, floor(ratio * size))."""
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"compression ratio {ratio} must be in (0, 1]")
  return min(size, max(1, math.floor(ratio * size)))


def topk(x: jax.Array, ratio: float) -> Sparse:
  """The `num_kept(x.size, ratio)` largest-magnitude entries of `x` (flat indices)."""
  flat = x.reshape(-1)
  _, idx = jax.lax.top_k(jnp.abs(flat), num_kept(flat.size, ratio))
  return Sparse(idx.astype(jnp.int32), flat[idx])


def scheduled_kept(size: int, ratio: float, lr: float, lr0: float) -> int:
  """Entries a tensor of `size` sends at learning rate `lr`: the authors' k for density
  `ratio * (lr / lr0)` (`int(numel * rate)`, at least 1), at most `num_kept(size, ratio)`."""
  if lr0 <= 0:
    raise ValueError(f"the density schedule needs a peak learning rate > 0, got {lr0}")
  return min(num_kept(size, ratio), max(1, int(size * (ratio * (float(lr) / lr0)))))


def trim(payload: list, kept: list[int]) -> list:
  """Host side: each Sparse leaf cut to its first `kept` entries (what goes on the wire)."""
  return [Sparse(np.asarray(s.indices)[:k], np.asarray(s.values)[:k])
          for s, k in zip(payload, kept)]


def pad(payload: list, sizes: list[int]) -> list:
  """Each Sparse leaf padded to `sizes` entries with (index 0, value 0): the static shapes of
  the server's jitted update. Only for scatter-adds (`apply_payload`), where they add 0."""
  out = []
  for s, n in zip(payload, sizes):
    idx, val = np.asarray(s.indices), np.asarray(s.values)
    out.append(Sparse(np.pad(idx, (0, n - idx.size)), np.pad(val, (0, n - val.size))))
  return out


def densify(s: Sparse, like: jax.Array) -> jax.Array:
  """A zero array shaped like `like` holding `s`."""
  flat = jnp.zeros(like.size, s.values.dtype).at[s.indices].set(s.values)
  return flat.reshape(like.shape)


def sent_mask(s: Sparse, like: jax.Array) -> jax.Array:
  return jnp.zeros(like.size, bool).at[s.indices].set(True).reshape(like.shape)


def add_sparse(x: jax.Array, s: Sparse, scale: float = 1.0) -> jax.Array:
  """x + scale * densify(s), as a scatter-add."""
  flat = x.reshape(-1).at[s.indices].add(scale * s.values.astype(x.dtype))
  return flat.reshape(x.shape)


# Pytree helpers. A payload is a pytree of `Sparse` (where the parameters have arrays) or a
# pytree of dense arrays.

def sparsify_tree(tree: PyTree, ratio: float) -> PyTree:
  return jax.tree.map(lambda x: topk(x, ratio), tree)


def densify_tree(payload: PyTree, like: PyTree) -> PyTree:
  return jax.tree.map(densify, payload, like, is_leaf=_is_sparse)


def apply_payload(params: PyTree, payload: PyTree, scale: float = 1.0) -> PyTree:
  """params + scale * payload, for a sparse or a dense payload."""
  def one(p, x):
    return add_sparse(x, p, scale) if _is_sparse(p) else x + scale * p.astype(x.dtype)
  return jax.tree.map(one, payload, params, is_leaf=_is_sparse)


def is_sparse_payload(payload: PyTree) -> bool:
  return all(_is_sparse(x) for x in jax.tree.leaves(payload, is_leaf=_is_sparse))


def payload_stats(payload: PyTree) -> tuple[int, int]:
  """(bytes on the wire, entries sent). Sparse: index + value per entry; dense: values."""
  nbytes = entries = 0
  for leaf in jax.tree.leaves(payload, is_leaf=_is_sparse):
    if _is_sparse(leaf):
      k = int(np.size(leaf.values))
      nbytes += k * (INDEX_BYTES + np.dtype(leaf.values.dtype).itemsize)
      entries += k
    else:
      nbytes += int(np.size(leaf)) * np.dtype(leaf.dtype).itemsize
      entries += int(np.size(leaf))
  return nbytes, entries


def expected_density(params: PyTree, ratio: float) -> float:
  """Fraction of all entries a sparse payload at `ratio` sends (per-tensor rounding included)."""
  sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
  return sum(num_kept(n, ratio) for n in sizes) / sum(sizes)


# Worker side: SAMomentum.

class SAMomentumState(NamedTuple):
  u_last: PyTree  # momentum last transmitted, per coordinate
  acc: PyTree  # lr-scaled gradients accumulated since a coordinate was last sent


def samomentum_init(params: PyTree) -> SAMomentumState:
  zeros = jax.tree.map(jnp.zeros_like, params)
  return SAMomentumState(zeros, zeros)


def samomentum_update(step: PyTree, state: SAMomentumState, momentum: float, ratio: float,
                      kept: PyTree = None) -> tuple[PyTree, SAMomentumState]:
  """One worker step. `step` = lr * (grad + wd * params). Returns (pytree of Sparse, state).

  `kept` (a pytree like `step` of int scalars, may be traced): send only the first k of each
  tensor's top-`num_kept(size, ratio)`; the other slots hold zeros and count as unsent.
  """
  def one(s, u, a, k):
    c = momentum * u + a + s
    payload = topk(c, ratio)
    if k is None:
      mask = sent_mask(payload, c)
    else:
      live = jnp.arange(payload.indices.size) < k
      payload = Sparse(payload.indices, jnp.where(live, payload.values, 0))
      mask = jnp.zeros(c.size, bool).at[payload.indices].set(live).reshape(c.shape)
    return payload, jnp.where(mask, c, u), jnp.where(mask, 0.0, a + s).astype(a.dtype)

  if kept is None:
    kept = jax.tree.map(lambda _: None, step)
  out = jax.tree.map(one, step, state.u_last, state.acc, kept,
                     is_leaf=lambda x: x is None)
  treedef = jax.tree.structure(step)
  payload, u_last, acc = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
  return payload, SAMomentumState(u_last, acc)


def momentum_update(step: PyTree, state: SAMomentumState, momentum: float
                    ) -> tuple[PyTree, SAMomentumState]:
  """Dense heavy-ball worker (the ASGD baseline): u = momentum * u + step; send u."""
  u = jax.tree.map(lambda u, s: momentum * u + s, state.u_last, step)
  return u, SAMomentumState(u, state.acc)


def samomentum(momentum: float = 0.9, ratio: float = 0.01) -> optax.GradientTransformation:
  """SAMomentum as an optax transformation of lr-scaled steps into the dense-ified payload.

  For one process: `optax.chain(optax.add_decayed_weights(wd),
  optax.scale_by_learning_rate(lr), samomentum(m, ratio))` applies exactly what a DGS worker
  would send. The map is linear and top-k is sign-blind, so optax's descent sign carries
  through. At ratio 1 it is heavy-ball momentum SGD.
  """
  def update_fn(updates, state, params=None):
    del params
    payload, state = samomentum_update(updates, state, momentum, ratio)
    return densify_tree(payload, updates), state

  return optax.GradientTransformation(samomentum_init, update_fn)


# Server side.

def model_difference(params: PyTree, sync: PyTree, sent: PyTree, ratio: float
                     ) -> tuple[PyTree, PyTree]:
  """The sparsified part of what a worker is missing, and its updated `sent` accumulator.

  The worker holds `sync + sent`; it misses `params - sync - sent`. Returns the top-k of that
  per tensor (pytree of Sparse) and `sent` plus it.
  """
  missing = jax.tree.map(lambda p, s, a: (p - s) - a, params, sync, sent)
  reply = sparsify_tree(missing, ratio)
  return reply, apply_payload(sent, reply)
