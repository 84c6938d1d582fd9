"""Expert parallelism: the MoE block as one `shard_map` over the folded mesh.

Every device of a pipeline stage holds its own tokens (batch over dp, sequence over cp then
tp). Inside the shard_map a device routes its tokens, and then, in the MoE view:

  1. all-gathers its tokens and their routing over etp (the expert-tensor-parallel peers
     compute the same tokens on their slice of every expert's hidden width),
  2. packs one buffer per EP rank (the owner of experts [r*E/ep, (r+1)*E/ep)) and exchanges
     them with `all_to_all` over ep,
  3. runs its local experts as a grouped SwiGLU on the rows it received,
  4. sends the rows back with the inverse `all_to_all`, combines them with the routing
     weights, and reduce-scatters the partial sums over etp back to its own tokens.

Buffers are static: a source sends at most `T_g * min(k, E/ep)` rows to one EP rank (a token
picks an expert once), and with token dropping at most `E/ep * capacity`; unused rows are
padding that the grouped matmul skips. That padded dense `all_to_all` is the only exchange
XLA:CPU can run. On GPU/TPU `dispatch="ragged"` sends only the routed rows with
`lax.ragged_all_to_all`; `dispatch="auto"` picks it by backend.

Routing statistics are global (psum over the token axes), and token dropping decides which
assignments fit in an expert's capacity over the whole batch, exactly as on one device: the
routing of all tokens (8 bytes per assignment) is all-gathered for that decision. So a
parallel step computes the same function as a single-device step.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from esjax.routing import dispatch, router

DISPATCH_IMPLS = ("auto", "padded", "ragged")


def _psum(x, axes):
  return lax.psum(x, axes) if axes else x


def _pmean(x, axes):
  return lax.pmean(x, axes) if axes else x


def _gather(x, axes, axis):
  return lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def _index(axes):
  return lax.axis_index(axes) if axes else 0


def _spec(*dims):
  return P(*(d if d else None for d in dims))


def moe_forward_fn(fm, dispatch_impl: str = "auto") -> Callable:
  """The `hooks.moe_override` function for folded mesh `fm`."""
  return functools.partial(moe_forward, fm, dispatch_impl=dispatch_impl)


def moe_forward(fm, moe, x: jax.Array, dispatch_impl: str = "auto"
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Expert-parallel forward of MoE block `moe` (esjax.models.moe.MoE); x [B, S, D]."""
  cfg = moe.cfg
  b, s, _ = x.shape
  if dispatch_impl not in DISPATCH_IMPLS:
    raise ValueError(f"dispatch_impl={dispatch_impl!r}, expected one of {DISPATCH_IMPLS}")
  if dispatch_impl == "auto":
    native = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
    dispatch_impl = "ragged" if native else "padded"
  ep, etp = fm.axes("ep"), fm.axes("etp")
  x_spec = _spec(fm.batch_axes, fm.seq_axes, None)
  w_in, w_out = _spec(ep, None, etp), _spec(ep, etp, None)
  stat_specs = {k: P() for k in ("aux_loss", "seq_aux_loss", "z_loss", "expert_load",
                                 "drop_fraction")}
  body = functools.partial(_local_moe, cfg=cfg, fm=fm, n_tokens=b * s, seq_len=s,
                           dispatch_impl=dispatch_impl)
  args = (x, moe.router[...], moe.w_gate[...], moe.w_up[...], moe.w_down[...])
  if fm.token_axes:
    body = jax.shard_map(body, in_specs=(x_spec, P(), w_in, w_in, w_out),
                         out_specs=(x_spec, stat_specs),
                         axis_names={"pp", *fm.token_axes},  # pp: see pipeline.py
                         # Under the pipeline's vmap over pp, jax's varying-axes check
                         # rejects constants next to pp-varying values (jax 0.10.2).
                         check_vma=fm.layout.pp == 1)
  y, stats = body(*args)
  if cfg.n_shared_experts:
    y = y + moe.shared_out(x)
  return y, stats


def _local_moe(x, router_w, w_gate, w_up, w_down, *, cfg, fm, n_tokens, seq_len,
               dispatch_impl):
  """Per-device body: x [B_l, S_l, D] this device's tokens; expert weights local shards."""
  bl, sl, d = x.shape
  e, k = cfg.n_experts, cfg.top_k
  tokens = x.reshape(bl * sl, d)
  logits = jnp.einsum("td,de->te", tokens.astype(jnp.float32), router_w)
  from esjax.models.moe import routing_for  # pylint: disable=g-import-not-at-top
  r = routing_for(cfg, logits)
  counts = _psum(router.expert_counts(r.indices, e), fm.token_axes)
  keep = None
  capacity = None
  if cfg.capacity_factor > 0:
    capacity = dispatch.capacity(n_tokens, k, e, cfg.capacity_factor)
    keep = _global_keep(r, cfg, fm, bl, sl, seq_len, capacity)
  y = _dispatch_and_compute(tokens, r.indices, r.weights, keep, capacity, w_gate, w_up,
                            w_down, cfg, fm, dispatch_impl)
  stats = _stats(cfg, fm, logits, r, counts, keep, bl, sl, n_tokens, seq_len)
  return y.reshape(bl, sl, d), stats


def _stats(cfg, fm, logits, r, counts, keep, bl, sl, n_tokens, seq_len):
  """`moe.router_stats` of the whole batch, from this device's tokens and collectives."""
  e, k = cfg.n_experts, cfg.top_k
  tok_axes, seq_axes, batch_axes = fm.token_axes, fm.seq_axes, fm.batch_axes
  f = counts.astype(jnp.float32) / (n_tokens * k)
  p = _psum(jnp.sum(r.probs, axis=0), tok_axes) / n_tokens
  aux = e * jnp.sum(lax.stop_gradient(f) * p)
  # Per sequence: this device holds slices of length S_l of B_l sequences.
  onehot = jax.nn.one_hot(r.indices.reshape(bl, sl * k), e, dtype=jnp.float32)
  seq_counts = _psum(jnp.sum(onehot, axis=1), seq_axes)  # [B_l, E]
  seq_probs = _psum(jnp.sum(r.probs.reshape(bl, sl, e), axis=1), seq_axes)
  seq_loss = e * jnp.sum(lax.stop_gradient(seq_counts / (seq_len * k)) * seq_probs / seq_len,
                         axis=-1)
  seq_aux = _pmean(jnp.mean(seq_loss), batch_axes)
  z = _pmean(router.z_loss(logits), tok_axes)
  if keep is None:
    drop = jnp.zeros((), jnp.float32)
  else:
    drop = 1.0 - _pmean(jnp.mean(keep.astype(jnp.float32)), tok_axes)
  return {"aux_loss": aux, "seq_aux_loss": seq_aux, "z_loss": z,
          "expert_load": f, "drop_fraction": drop}


def _global_keep(r, cfg, fm, bl, sl, seq_len, capacity):
  """[T_l, k] bool: the single-device token-dropping decision for this device's tokens.

  The routing of every token is all-gathered into [B, S, k] (in the batch's original token
  order when CP load balancing permuted the sequence), ranked per expert by the policy, and
  this device's block sliced out.
  """
  k = cfg.top_k
  ind = r.indices.reshape(bl, sl, k)
  w = lax.stop_gradient(r.weights).reshape(bl, sl, k)
  ind = _gather(_gather(ind, fm.seq_axes, 1), fm.batch_axes, 0)
  w = _gather(_gather(w, fm.seq_axes, 1), fm.batch_axes, 0)
  b, s = ind.shape[:2]
  from esjax.parallel import context  # pylint: disable=g-import-not-at-top
  perm = context.sequence_permutation(fm.layout, s)
  if perm is not None:  # back to the original token order, where the policy is defined
    inv = np.argsort(perm)
    ind, w = ind[:, inv], w[:, inv]
  pos = dispatch.positions_in_expert(ind.reshape(b * s, k), w.reshape(b * s, k),
                                     cfg.n_experts, cfg.drop_policy).reshape(b, s, k)
  if perm is not None:
    pos = pos[:, perm]
  start = (_index(fm.batch_axes) * bl, _index(fm.seq_axes) * sl, 0)
  pos = lax.dynamic_slice(pos, start, (bl, sl, k))
  return (pos < capacity).reshape(bl * sl, k)


def _dispatch_and_compute(tokens, indices, weights, keep, capacity, w_gate, w_up, w_down,
                          cfg, fm, dispatch_impl):
  """Routed expert output [T_l, D] of this device's tokens (see the module docstring)."""
  from esjax.models import moe as moe_lib  # pylint: disable=g-import-not-at-top
  e, k = cfg.n_experts, cfg.top_k
  ep, etp = fm.layout.ep, fm.layout.etp
  ep_axes, etp_axes = fm.axes("ep"), fm.axes("etp")
  nle = e // ep
  valid = jnp.ones(indices.shape, bool) if keep is None else keep
  tokens = _gather(tokens, etp_axes, 0)
  indices, weights, valid = (_gather(a, etp_axes, 0) for a in (indices, weights, valid))
  n_rows, d = tokens.shape
  flat_e, flat_valid = indices.reshape(-1), valid.reshape(-1)
  dest, local_e = flat_e // nle, flat_e % nle
  bound = n_rows * min(k, nle)
  if capacity is not None:
    bound = min(bound, nle * capacity)
  routed = jax.nn.one_hot(dest, ep, dtype=jnp.int32) * flat_valid[:, None].astype(jnp.int32)
  rank = jnp.take_along_axis(jnp.cumsum(routed, axis=0) - 1, dest[:, None], axis=1)[:, 0]
  slot = jnp.where(flat_valid, dest * bound + rank, ep * bound)  # ep*bound: a spill row
  rows = jnp.zeros((ep * bound + 1, d), tokens.dtype).at[slot].set(
      jnp.take(tokens, jnp.arange(flat_e.size) // k, axis=0))[:-1]
  ids = jnp.full((ep * bound + 1,), nle, jnp.int32).at[slot].set(
      jnp.where(flat_valid, local_e, nle))[:-1]

  def experts(rows, ids):
    row_valid = ids < nle
    out, _ = dispatch.grouped_moe(
        rows, jnp.minimum(ids, nle - 1)[:, None], jnp.ones(ids.shape + (1,), jnp.float32),
        nle, lambda r_, gs: moe_lib.expert_swiglu_ragged(r_, gs, w_gate, w_up, w_down),
        row_valid[:, None])
    return out

  if dispatch_impl == "ragged" and ep_axes:
    out = _ragged_exchange(rows, ids, nle, bound, ep_axes, experts)
  else:
    if ep_axes:
      rows = lax.all_to_all(rows, ep_axes, 0, 0, tiled=True)
      ids = lax.all_to_all(ids, ep_axes, 0, 0, tiled=True)
    out = experts(rows, ids)
    if ep_axes:
      out = lax.all_to_all(out, ep_axes, 0, 0, tiled=True)
  out = jnp.concatenate([out, jnp.zeros_like(out[:1])], axis=0)
  per_assignment = jnp.take(out, slot, axis=0).reshape(n_rows, k, d)
  combine = jnp.where(valid, weights.astype(jnp.float32), 0.0)
  y = jnp.einsum("tkd,tk->td", per_assignment.astype(jnp.float32), combine)
  if etp_axes:
    y = lax.psum_scatter(y, etp_axes, scatter_dimension=0, tiled=True)
  return y.astype(tokens.dtype)


def _ragged_exchange(rows, ids, nle, bound, ep_axes, experts):
  """The EP exchange with `ragged_all_to_all` (GPU/TPU): only routed rows travel.

  The buffers keep the padded layout (block j of `bound` rows for / from EP rank j, routed
  rows first in each block), so the experts see what the padded exchange gives them; only
  the `sizes[j]` routed rows of each block are sent, and each lands at block `me` of its
  receiver. The way back swaps sizes and received sizes.
  """
  ep = rows.shape[0] // bound
  me = lax.axis_index(ep_axes)
  sizes = jnp.sum((ids < nle).reshape(ep, bound), axis=1, dtype=jnp.int32)  # rows I send
  received = lax.all_to_all(sizes, ep_axes, 0, 0, tiled=True)  # rows each rank sends me
  offsets = jnp.arange(ep, dtype=jnp.int32) * bound
  there = jnp.full((ep,), me * bound, jnp.int32)  # where my block lands on every rank

  def send(x, fill, out_sizes, in_sizes):
    return ragged_all_to_all(x, jnp.full_like(x, fill), offsets, out_sizes, there, in_sizes,
                             axis_name=ep_axes)

  got_rows = send(rows, 0, sizes, received)
  got_ids = send(ids[:, None], nle, sizes, received)[:, 0]  # unfilled rows: invalid id
  return send(experts(got_rows, got_ids), 0, received, sizes)


ragged_all_to_all = lax.ragged_all_to_all  # tests substitute an emulation (none on XLA:CPU)
