"""Collectives over mesh axes, the identity when `axes` is empty (a role of size 1, or one
device). Model code calls them with a plan's role axes (`plan.tp`, `plan.cp`, ...) inside the
step's shard_map, where every mesh axis is manual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Axes = tuple[str, ...]


def psum(x, axes: Axes):
  return lax.psum(x, axes) if axes else x


def pmean(x, axes: Axes):
  return lax.pmean(x, axes) if axes else x


def pmax(x, axes: Axes):
  return lax.pmax(x, axes) if axes else x


def all_gather(x, axes: Axes, axis: int):
  return lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def psum_scatter(x, axes: Axes, axis: int):
  return lax.psum_scatter(x, axes, scatter_dimension=axis, tiled=True) if axes else x


def all_to_all(x, axes: Axes, split: int, concat: int):
  return lax.all_to_all(x, axes, split, concat, tiled=True) if axes else x


def axis_index(axes: Axes) -> jax.Array:
  return lax.axis_index(axes) if axes else jnp.zeros((), jnp.int32)


def vary(tree, axes: Axes):
  """`tree` typed as varying over `axes` (jax's varying-manual-axes check): a no-op at run
  time. Parameters are made varying before the microbatch loop so their gradients stay local
  until the one reduction per step."""
  if not axes:
    return tree

  def one(x):
    have = jax.typeof(x).manual_axis_type.varying
    missing = tuple(a for a in axes if a not in have)
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(one, tree)


def varying_axes(*trees) -> Axes:
  """The manual mesh axes any leaf of `trees` varies over (none outside a shard_map)."""
  axes: set[str] = set()
  for leaf in jax.tree.leaves(trees):
    axes |= set(jax.typeof(leaf).manual_axis_type.varying)
  return tuple(sorted(axes))


def match_vma(tree, *refs):
  """`tree` (e.g. a loop's initial carry of zeros) typed as varying over every axis that
  `refs` (the loop's inputs) vary over, as a loop carry must be."""
  return vary(tree, varying_axes(*refs))


def share(tree, axes: Axes, size_of):
  """Each device's share of values that may be replicated over some of `axes`: x / n typed
  varying over all of `axes`, where n is the number of devices it was replicated over. The
  shares sum to x over the devices, and the gradient through them is exact (the transpose of
  the cast is a psum of n equal cotangents, times 1/n). `size_of(axes) -> int`."""
  def one(x):
    have = set(jax.typeof(x).manual_axis_type.varying)
    missing = tuple(a for a in axes if a not in have)
    if not missing:
      return x
    return lax.pcast(x / size_of(missing), missing, to="varying")
  return jax.tree.map(one, tree)


def like_primal(ct, primal):
  """A custom VJP's cotangent typed like its primal input: summed over the axes it varies
  over and the primal does not (a primal replicated over them was used on every device)."""
  extra = tuple(a for a in varying_axes(ct) if a not in varying_axes(primal))
  return psum(ct, extra)
