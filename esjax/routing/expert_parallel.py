"""The MoE layer's routed computation on any parallel plan (expert parallelism included).

One function, `routed_experts`, serves one device and every layout: it runs on a device's
local tokens inside the step's shard_map (see `esjax.sharding.plan`), and with a plan of one
device every collective below is the identity. Per device:

  1. route its tokens [T_l, D] (router replicated; `route`),
  2. decide token dropping (capacity) over the scope `cfg.capacity_scope` asks for: the whole
     micro-batch ("batch": the single-device decision, routing all-gathered over the stage)
     or this device's tokens ("rank": Megatron's per-rank capacity, no gathering),
  3. without expert parallelism, run the grouped SwiGLU on its own tokens (`cfg.moe_impl`:
     blocked tiles on CPU, the grouped-matmul kernels the model gives or `ragged_dot` on
     GPUs and TPUs, `resolve_impl`; or the [E, C] buffers of `pad_to_capacity`);
  4. with EP, all-gather its tokens over etp (those peers hold slices of every expert's
     hidden width), pack one block of rows per EP rank (the owner of experts
     [r*E/ep, (r+1)*E/ep)), exchange them over ep (`plan.ep_dispatch`: a padded `all_to_all`,
     the only exchange XLA:CPU has, or `ragged_all_to_all`, which sends only routed rows), run
     the local experts on what arrived, send the results back, combine them with the routing
     weights and reduce-scatter the partial sums over etp.

Block sizes are static bounds: a source sends one EP rank at most `T * min(k, E/ep)` rows
(a token picks an expert once), with dropping at most `E/ep * capacity`, and with
`cfg.ep_buffer_factor` at most that factor times the balanced share `T k / ep` (rows past it
are dropped and counted in the `ep_overflow_fraction` statistic). Router statistics
(`router_stats`) are those of the micro-batch: psums over the stage's devices.
"""

from __future__ import annotations

from typing import Callable

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from esjax.routing import dispatch, grouped, router
from esjax.sharding import collectives as col
from esjax.sharding.plan import ParallelPlan

# Named scopes of the router and the routed experts (the planner counts FLOPs per part).
SCOPE_ROUTER, SCOPE_EXPERTS = "router", "experts"
ragged_all_to_all = lax.ragged_all_to_all  # tests on CPU substitute an emulation (no XLA:CPU op)


def block_rows(cfg, n_rows: int, n_groups: int) -> int:
  """Tile rows of the blocked grouped matmul: moe_block_size, smaller for small groups."""
  per_group = max(1, n_rows // n_groups)
  return max(1, min(cfg.moe_block_size, 1 << (per_group - 1).bit_length()))


# The grouped SwiGLU of moe_impl="gmm", `(rows, group_sizes, w_gate, w_up, w_down,
# expected_rows, backend) -> out` (esjax.kernels.gmm.ops.swiglu_gmm, given by the model):
# backend "mosaic" on Hopper (compute capability 9.0), "triton" on other GPUs, "megablox" on
# TPUs.
KernelFn = Callable[..., jax.Array]


def kernel_backend(plan: ParallelPlan) -> str:
  """Which of moe_impl='gmm''s kernels run on `plan`'s platform (see KernelFn)."""
  return ("megablox" if plan.platform == "tpu" else
          "mosaic" if plan.gpu_arch == "9.0" else "triton")


def resolve_impl(impl: str, plan: ParallelPlan, kernel: KernelFn | None) -> str:
  """What `impl` runs on `plan`: 'auto' is the blocked CPU layout on the CPU; on GPUs and TPUs
  the grouped-matmul kernels (work: the routed rows) where the model gives them (it does
  where they apply to its dtype and widths, `esjax.models.moe.kernel_for`), else
  `lax.ragged_dot` (XLA:GPU multiplies whole buffers, against every local expert)."""
  if impl != "auto":
    return impl
  if not plan.native_collectives:
    return "blocked"
  return "gmm" if kernel is not None else "ragged"


def grouped_fn(cfg, plan: ParallelPlan, w_gate, w_up, w_down, kernel: KernelFn | None = None,
               expected_rows: int | None = None) -> dispatch.GroupedFn:
  """The grouped SwiGLU `(rows, group_sizes) -> out` of `cfg.moe_impl` on `plan`'s platform;
  `expected_rows`: how many of the rows a balanced router fills (the kernel's declared cost)."""
  impl = resolve_impl(cfg.moe_impl, plan, kernel)
  if impl == "blocked":
    return lambda rows, gs: grouped.swiglu_blocked(
        rows, gs, w_gate, w_up, w_down, block_rows(cfg, rows.shape[0], w_gate.shape[0]))
  if impl == "gmm":
    if plan.platform not in ("gpu", "tpu"):
      raise ValueError(f"moe_impl='gmm' runs on GPUs and TPUs, not on {plan.platform!r}: use "
                       "'auto'")
    if kernel is None:
      raise ValueError("moe_impl='gmm': no grouped-matmul kernel was given to the MoE layer")
    backend = kernel_backend(plan)
    return lambda rows, gs: kernel(rows, gs, w_gate, w_up, w_down, expected_rows, backend)
  return lambda rows, gs: grouped.swiglu_ragged(rows, gs, w_gate, w_up, w_down)


def swiglu_batched(buffers: jax.Array, w_gate, w_up, w_down) -> jax.Array:
  """SwiGLU on per-expert buffers [E, C, D] (token dropping padded to capacity)."""
  dt = buffers.dtype
  gate = jnp.einsum("ecd,edf->ecf", buffers, w_gate.astype(dt))
  up = jnp.einsum("ecd,edf->ecf", buffers, w_up.astype(dt))
  return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down.astype(dt))


def routed_experts(x: jax.Array, router_w, w_gate, w_up, w_down, *, cfg, plan: ParallelPlan,
                   route: Callable[[jax.Array], router.Routing],
                   mask: jax.Array | None = None, kernel: KernelFn | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """x [B_l, S_l, D] this device's tokens -> (routed output [B_l, S_l, D], router stats of the
  micro-batch). Expert weights are this device's shards: [E/ep, D, F/etp] and [E/ep, F/etp, D].
  `route(logits [T, E]) -> Routing` picks the experts (the XLA reference or the Pallas kernel);
  `kernel` is moe_impl='gmm''s grouped SwiGLU (routing does not import the kernels).
  `mask` [B_l, S] (1: the token counts; S is the cp rank's sequence, of which this tp rank
  holds a slice) keeps padding out of the router losses and the expert load.
  """
  bl, sl, d = x.shape
  if mask is not None and mask.shape[1] != sl:  # this tp rank's slice of the sequence
    mask = lax.dynamic_slice_in_dim(mask, col.axis_index(plan.tp) * sl, sl, axis=1)
  tokens = x.reshape(bl * sl, d)
  with jax.named_scope(SCOPE_ROUTER):
    logits = dispatch.einsum_f32("td,de->te", tokens, router_w)
    r = route(logits)
  positions = None
  if cfg.capacity_factor > 0:
    positions, cap = _capacity_positions(r, cfg, plan, bl, sl)
    keep = positions < cap
  else:
    keep, cap = None, None
  w = (w_gate, w_up, w_down)
  overflow = jnp.zeros((), jnp.float32)
  with jax.named_scope(SCOPE_EXPERTS):
    if plan.ep or plan.etp:
      y, overflow = _expert_parallel(tokens, r, keep, positions, cap, w, cfg, plan, kernel)
    elif keep is not None and cfg.pad_to_capacity:
      y = dispatch.capacity_moe(tokens, r.indices, r.weights, cfg.n_experts, cap, positions,
                                lambda b: swiglu_batched(b, *w))
    else:
      y = dispatch.grouped_moe(tokens, r.indices, r.weights, cfg.n_experts,
                               grouped_fn(cfg, plan, *w, kernel), keep)
  token_mask = None if mask is None else mask.reshape(bl * sl)
  stats = router_stats(cfg, plan, logits, r, keep, bl, sl, token_mask)
  return y.reshape(bl, sl, d), {**stats, "ep_overflow_fraction": overflow}


def router_stats(cfg, plan: ParallelPlan, logits, r: router.Routing, keep, bl: int, sl: int,
                 mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Balance, sequence-balance and z losses (Megatron's formulas, `router.switch_loss`),
  expert load and drop fraction of the micro-batch's tokens that count (`mask` [T_l]), or of
  each data-parallel rank's share with `cfg.balance_scope='rank'`, from this device's tokens
  and psums over the stage.

  With an expert bias or a group limit the balance losses count the plain top-k of the
  scores (Megatron's compute_routing_scores_for_aux_loss, DeepSeek-V3's eq. 18), while
  `expert_load` counts the experts chosen (what the bias update balances).
  """
  e, k = cfg.n_experts, cfg.top_k
  stage, seq, dp = plan.stage_axes, plan.seq_axes, plan.dp
  plain = r.indices
  if cfg.expert_bias or cfg.n_expert_groups > 1:
    plain = router.topk_indices(r.probs, k)
  w = jnp.ones((bl * sl,), jnp.float32) if mask is None else mask.astype(jnp.float32)
  n_tokens = col.psum(jnp.sum(w), stage)
  load = col.psum(router.expert_counts(r.indices, e, mask), stage).astype(jnp.float32)
  load = load / jnp.maximum(n_tokens * k, 1.0)
  probs_sum, counts = router.balance_sums(r.probs, plain, w)
  if cfg.balance_scope == "rank":  # per data-parallel rank (its sequences), then the mean
    aux = col.pmean(router.switch_loss(col.psum(probs_sum, seq), col.psum(counts, seq),
                                       col.psum(jnp.sum(w), seq), k), dp)
  else:
    aux = router.switch_loss(col.psum(probs_sum, stage), col.psum(counts, stage), n_tokens, k)
  # Per sequence: this device holds slices of length S_l of B_l sequences; T per sequence is
  # the mean number of tokens that count per sequence (Megatron's _apply_seq_aux_loss).
  seq_probs, seq_counts = col.psum(router.seq_balance_sums(r.probs, plain, w.reshape(bl, sl)),
                                   seq)
  per_seq = n_tokens / (bl * plan.size(dp))
  seq_aux = col.pmean(jnp.mean(router.switch_loss(seq_probs, seq_counts, per_seq, k)), dp)
  z = col.psum(router.z_loss_sum(logits, w), stage) / jnp.maximum(n_tokens, 1.0)
  if keep is None:
    drop = jnp.zeros((), jnp.float32)
  else:
    drop = 1.0 - col.pmean(jnp.mean(keep.astype(jnp.float32)), stage)
  return {"aux_loss": aux, "seq_aux_loss": seq_aux, "z_loss": z, "expert_load": load,
          "drop_fraction": drop}


def _capacity_positions(r: router.Routing, cfg, plan: ParallelPlan, bl: int, sl: int):
  """([T_l, k] int32 rank of each assignment in its expert's buffer, capacity).

  "rank" scope: capacity and ranks over this device's tokens (Megatron). "batch" scope: over
  the whole micro-batch, as on one device: the routing of every token of the stage (8 bytes
  per assignment) is all-gathered in the batch's original token order (CP load balancing
  permutes the sequence), ranked per expert by the policy, and this device's block sliced out.
  """
  e, k = cfg.n_experts, cfg.top_k
  w = lax.stop_gradient(r.weights)
  if cfg.capacity_scope == "rank" or not plan.stage_axes:
    cap = dispatch.capacity(bl * sl, k, e, cfg.capacity_factor)
    return dispatch.positions_in_expert(r.indices, w, e, cfg.drop_policy), cap
  seq, batch = plan.seq_axes, plan.dp
  cap = dispatch.capacity(bl * sl * plan.size(plan.stage_axes), k, e, cfg.capacity_factor)
  ind = col.all_gather(col.all_gather(r.indices.reshape(bl, sl, k), seq, 1), batch, 0)
  w = col.all_gather(col.all_gather(w.reshape(bl, sl, k), seq, 1), batch, 0)
  b, s = ind.shape[:2]
  perm = sequence_order(plan, s)
  if perm is not None:  # back to the original token order, where the policy is defined
    inv = np.argsort(perm)
    ind, w = ind[:, inv], w[:, inv]
  pos = dispatch.positions_in_expert(ind.reshape(b * s, k), w.reshape(b * s, k), e,
                                     cfg.drop_policy).reshape(b, s, k)
  if perm is not None:
    pos = pos[:, perm]
  start = (col.axis_index(batch) * bl, col.axis_index(seq) * sl, 0)
  return lax.dynamic_slice(pos, start, (bl, sl, k)).reshape(bl * sl, k), cap


def sequence_order(plan: ParallelPlan, seq_len: int) -> np.ndarray | None:
  """CP causal load balancing: perm with reordered[:, j] = original[:, perm[j]] (the sequence
  is cut into 2*cp chunks and cp rank i holds chunks i and 2cp-1-i), or None."""
  cp = plan.layout.cp
  if cp == 1 or not plan.layout.cp_load_balance:
    return None
  if seq_len % (2 * cp):
    raise ValueError(f"sequence length {seq_len} is not divisible by 2*cp = {2 * cp} "
                     f"(causal load balancing)")
  chunks = np.arange(seq_len).reshape(2 * cp, seq_len // (2 * cp))
  order = [c for i in range(cp) for c in (i, 2 * cp - 1 - i)]
  return chunks[order].reshape(-1)


def ep_block_rows(cfg, n_rows: int, ep: int, cap: int | None) -> int:
  """Rows of one source's block for one EP rank (dropless): the worst case T min(k, E/ep),
  or `cfg.ep_buffer_factor` x the balanced share T k / ep rounded up to 8 rows, whichever is
  smaller; with dropping also at most E/ep x capacity."""
  nle = cfg.n_experts // ep
  bound = n_rows * min(cfg.top_k, nle)
  if cap is not None:
    bound = min(bound, nle * cap)
  if cfg.ep_buffer_factor:
    share = math.ceil(cfg.ep_buffer_factor * n_rows * cfg.top_k / ep)
    bound = min(bound, -(-share // 8) * 8)
  return bound


def _expert_parallel(tokens, r, keep, positions, cap, w, cfg, plan: ParallelPlan,
                     kernel: KernelFn | None):
  """(routed output [T_l, D], the share of routed rows that overflowed their EP block) with
  the experts spread over ep (and their width over etp)."""
  e, k = cfg.n_experts, cfg.top_k
  ep_axes, etp_axes = plan.ep, plan.etp
  ep = plan.size(ep_axes)
  nle = e // ep
  valid = jnp.ones(r.indices.shape, bool) if keep is None else keep
  indices, weights = r.indices, r.weights
  tokens = col.all_gather(tokens, etp_axes, 0)
  indices, weights, valid = (col.all_gather(a, etp_axes, 0) for a in (indices, weights, valid))
  n_rows, d = tokens.shape
  flat_e, flat_valid = indices.reshape(-1), valid.reshape(-1)
  dest, local_e = flat_e // nle, flat_e % nle
  padded = keep is not None and cfg.pad_to_capacity
  overflow = jnp.zeros((), jnp.float32)  # rows past a bounded block (dropless only)
  if padded:
    # Drop and pad: row (expert, position) of each destination's [E/ep, C] block.
    pos = col.all_gather(positions, etp_axes, 0).reshape(-1)
    bound = nle * cap
    in_buffer = dest * bound + local_e * cap + pos
  else:
    bound = ep_block_rows(cfg, n_rows, ep, cap)
    routed = jax.nn.one_hot(dest, ep, dtype=jnp.int32) * flat_valid[:, None].astype(jnp.int32)
    rank = jnp.take_along_axis(jnp.cumsum(routed, axis=0) - 1, dest[:, None], axis=1)[:, 0]
    if cfg.ep_buffer_factor:  # only a bounded block can overflow: no collective otherwise
      fits = rank < bound
      # Counted over the stage (rows replicated over some of its axes count once per
      # device, in both sums alike).
      counts = col.vary(jnp.stack([jnp.sum(flat_valid & ~fits), jnp.sum(flat_valid)]),
                        plan.stage_axes)
      counts = col.psum(counts, plan.stage_axes)
      overflow = counts[0] / jnp.maximum(counts[1], 1)
      flat_valid = flat_valid & fits
      valid = flat_valid.reshape(valid.shape)
    in_buffer = dest * bound + rank
  # Each assignment's row of the send buffer. Those that do not travel get distinct rows past
  # it, which the scatters drop and the gather back reads as zeros: with unique indices a
  # scatter's backward is a gather, where repeated ones make autodiff keep an [assignments,
  # D] mask of which update landed.
  slot = jnp.where(flat_valid, in_buffer,
                   ep * bound + jnp.arange(flat_e.size, dtype=in_buffer.dtype))
  scatter = dict(mode="drop", unique_indices=True)
  rows = jnp.zeros((ep * bound, d), tokens.dtype).at[slot].set(
      jnp.take(tokens, jnp.arange(flat_e.size) // k, axis=0), **scatter)
  ids = jnp.full((ep * bound,), nle, jnp.int32).at[slot].set(local_e, **scatter)

  if padded:
    def experts(rows, ids):  # [ep sources, E/ep, C] -> [E/ep, ep*C] expert buffers
      del ids
      buf = rows.reshape(ep, nle, -1, d).transpose(1, 0, 2, 3).reshape(nle, -1, d)
      out = swiglu_batched(buf, *w)
      return out.reshape(nle, ep, -1, d).transpose(1, 0, 2, 3).reshape(-1, d)
  else:
    def experts(rows, ids):
      return dispatch.grouped_moe(
          rows, jnp.minimum(ids, nle - 1)[:, None], None, nle,
          grouped_fn(cfg, plan, *w, kernel, n_rows * k), (ids < nle)[:, None])

  if plan.ep_dispatch == "ragged" and ep_axes and not padded:
    out = _ragged_exchange(rows, ids, nle, bound, ep_axes, experts)
  else:
    rows, ids = col.all_to_all(rows, ep_axes, 0, 0), col.all_to_all(ids, ep_axes, 0, 0)
    out = col.all_to_all(experts(rows, ids), ep_axes, 0, 0)
  per_assignment = jnp.take(out, slot, axis=0, mode="fill", fill_value=0).reshape(n_rows, k, d)
  combine = jnp.where(valid, weights.astype(jnp.float32), 0.0)
  y = dispatch.einsum_f32("tkd,tk->td", per_assignment, combine)
  return col.psum_scatter(y, etp_axes, 0).astype(tokens.dtype), overflow.astype(jnp.float32)


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

