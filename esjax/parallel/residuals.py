"""A backward unit from stored residuals: the forward unit runs `jax.vjp` and keeps what the
pullback reads; the backward unit, ticks later, runs that pullback without the forward.

`jax.vjp` returns its pullback as a pytree: the leaves are the residuals (the arrays the
backward reads), the structure holds the linearized program (a closed jaxpr: it captures no
tracer, so it can be called in another trace). `Residuals.of(fn, params, *args)` traces
fn's vjp once, abstractly, to learn that structure: which leaves are the primal parameters
themselves (not stored: the backward unit passes the same parameters again) and the types of
the others, which a stash holds for every in-flight slot. What is stored is exactly what
autodiff and the model's remat policy keep; nothing is recomputed that they did not ask for.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from esjax.sharding import collectives as col

Stash = tuple[jax.Array, ...]


def _vma(aval) -> tuple[str, ...]:
  return tuple(sorted(aval.manual_axis_type.varying))


def zeros_like_types(avals: Any) -> Any:
  """Zeros of every aval in a tree, typed with its varying axes (what an idle unit returns
  in place of a unit's outputs)."""
  return jax.tree.map(lambda a: col.vary(jnp.zeros(a.shape, a.dtype), _vma(a)), avals)


def vjp(fn: Callable, params: Any, *args) -> tuple[Any, Any, tuple[Any, tuple, list]]:
  """`jax.vjp(fn, params, *args, has_aux=True)` with the pullback taken apart:
  (out, aux, (structure, sources, stored)): per pullback leaf, `sources` names the leaf of
  `params` it is (or None), `stored` lists the other leaves in order."""
  out, pullback, aux = jax.vjp(fn, params, *args, has_aux=True)
  leaves, treedef = jax.tree.flatten(pullback)
  param_leaves = jax.tree.leaves(params)
  sources = tuple(next((i for i, p in enumerate(param_leaves) if leaf is p), None)
                  for leaf in leaves)
  stored = [leaf for leaf, s in zip(leaves, sources) if s is None]
  return out, aux, (treedef, sources, stored)


@dataclasses.dataclass(frozen=True, eq=False)
class Residuals:
  """The pullback structure of one unit function, learnt from a reference trace."""

  treedef: Any  # the pullback pytree's structure (holds the linearized program)
  sources: tuple[int | None, ...]  # per pullback leaf: the params leaf it is, or None
  stored: tuple[Any, ...]  # avals of the stored leaves (shape, dtype, varying axes)
  out: Any  # avals of fn's output (what the cotangent must look like)
  aux: Any  # avals of fn's aux output

  @classmethod
  def of(cls, fn: Callable, params: Any, *args) -> "Residuals":
    """Traces `jax.vjp(fn, params, *args)` abstractly (nothing runs)."""
    found = []

    def trace(params, *args):
      out, aux, (treedef, sources, stored) = vjp(fn, params, *args)
      found.append(cls(treedef, sources, tuple(jax.typeof(x) for x in stored),
                       jax.tree.map(jax.typeof, out), jax.tree.map(jax.typeof, aux)))
      return out

    jax.eval_shape(trace, params, *args)
    return found[0]

  def empty(self, slots: int, slot_axes: tuple[str, ...] = ()) -> Stash:
    """A stash of `slots` in-flight units: per stored leaf, zeros [slots, ...] typed like it
    and varying over `slot_axes` too (the axes the slot index varies over)."""
    return tuple(col.vary(jnp.zeros((slots, *a.shape), a.dtype), _vma(a) + slot_axes)
                 for a in self.stored)

  def leaves(self, found: tuple[Any, tuple, list]) -> tuple[jax.Array, ...]:
    """The leaves to store of a `vjp(...)[2]`, checked against the reference trace."""
    _, sources, stored = found
    types = tuple((x.shape, x.dtype, _vma(jax.typeof(x))) for x in stored)
    want = tuple((a.shape, a.dtype, _vma(a)) for a in self.stored)
    if sources != self.sources or types != want:
      i = next((i for i, (a, b) in enumerate(zip(types, want)) if a != b),
               min(len(types), len(want)))
      raise AssertionError(f"residuals differ from the reference trace: {len(types)} leaves vs "
                           f"{len(want)}, first difference at {i}: {types[i:i + 1]} vs "
                           f"{want[i:i + 1]}")
    return tuple(stored)

  def zeros(self) -> tuple[jax.Array, ...]:
    """Stored leaves of zeros (what an idle unit, or one that keeps nothing here, writes)."""
    return zeros_like_types(self.stored)

  def put(self, stash: Stash, slot: jax.Array, leaves: tuple[jax.Array, ...]) -> Stash:
    """`stash` with `leaves` (from `leaves` or `zeros`) at `slot`."""
    return tuple(
        lax.dynamic_update_index_in_dim(buf, col.vary(x, _vma(jax.typeof(buf))), slot, 0)
        for buf, x in zip(stash, leaves))

  def pullback(self, stash: Stash, slot: jax.Array, params: Any) -> Callable:
    """The pullback of the unit stored at `slot`, given the same `params` again."""
    stored = iter(lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False) for buf in stash)
    param_leaves = jax.tree.leaves(params)
    leaves = [next(stored) if s is None else param_leaves[s] for s in self.sources]
    return jax.tree.unflatten(self.treedef, leaves)

  def cotangent(self, out_ct: Any) -> Any:
    """`out_ct` cast to the output's dtypes and varying axes (a stand-in for what the
    forward returned)."""
    return jax.tree.map(lambda ct, a: col.vary(jnp.asarray(ct, a.dtype), _vma(a)),
                        out_ct, self.out)
