"""`--search`: every valid layout for N devices, ranked by an analytic estimate, the best few
compiled for real.

A candidate is (pp, tp, cp, ep, etp, dp = the rest, ZeRO-1 or fsdp, microbatches, schedule and
virtual stages, remat policy) that the model's divisibility rules and the folded mesh accept.
Its estimate: the memory of the state (master weights, moments, compute copy, gradient
accumulator) plus activations (the pipeline stash: every slot holds a chunk's residuals; one
chunk's activations during its backward, the logits), and the time of
`esjax.plan.analytic.Work` (FLOPs with recompute at peak over the bubble, minimum bytes at the
bandwidth of the links the layout puts them on).
Candidates whose estimate fits are ranked by estimated time; the `top` best are compiled with
`esjax.plan.dryrun.plan` and returned ranked by predicted step time, those that fit first.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Iterator

from esjax.configs import common
from esjax.models.config import ModelConfig
from esjax.parallel.schedule import make_schedule
from esjax.plan import analytic, dryrun, targets as targets_lib
from esjax.routing import expert_parallel
from esjax.sharding.layout import Layout, LayoutError, check_model

REMATS = ("none", "dots_except_mlp", "full")


@dataclasses.dataclass(frozen=True)
class Candidate:
  layout: Layout
  remat: str
  memory: float  # estimated peak bytes per device
  time: float  # estimated step seconds

  def overrides(self) -> dict[str, Any]:
    lay = self.layout
    keys = ("dp", "tp", "cp", "pp", "ep", "etp", "fsdp", "distributed_optimizer",
            "microbatches", "schedule", "virtual_stages")
    out = {f"parallel.{k}": getattr(lay, k) for k in keys}
    out["model.remat"] = self.remat
    return out


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: ModelConfig, n: int, batch: int, seq: int, per_node: int
            ) -> Iterator[Layout]:
  """Valid layouts (resolved) for `n` devices: every divisor choice the model allows."""
  experts = _divisors(cfg.n_experts) if cfg.is_moe else [1]
  for pp in _divisors(n):
    if cfg.n_layers % pp or pp > 16:
      continue
    for tp in (1, 2, 4, 8):
      if tp > per_node or n % (pp * tp):
        continue
      for cp in (1, 2, 4) if seq >= 8192 else (1,):
        if n % (pp * tp * cp):
          continue
        dp = n // (pp * tp * cp)
        for ep in experts:
          for etp in sorted({1, tp}):
            for zero in ("zero1", "fsdp"):
              for m, sched, v in _schedules(cfg, pp, dp, batch):
                try:
                  lay = Layout(dp=dp, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp,
                               fsdp=zero == "fsdp",
                               distributed_optimizer=zero == "zero1", microbatches=m,
                               schedule=sched, virtual_stages=v).resolve(n)
                  check_model(lay, cfg, seq_len=seq, batch=batch)
                except (LayoutError, ValueError):
                  continue
                yield lay


def _schedules(cfg: ModelConfig, pp: int, dp: int, batch: int
               ) -> Iterator[tuple[int, str, int]]:
  """(microbatches, schedule, virtual stages): one sequence per microbatch and dp rank (the
  most microbatches, the smallest bubble); with pp > 1 1F1B and interleaved."""
  if batch % dp:
    return
  m = batch // dp
  if pp == 1:
    yield m, "1f1b", 1
    return
  if m < pp:
    return
  yield m, "1f1b", 1
  per_stage = cfg.n_layers // pp
  for v in sorted({2, per_stage}):
    if v > 1 and per_stage % v == 0 and m % pp == 0:
      yield m, "interleaved", v


def _layer_residuals(cfg: ModelConfig, lay: Layout, seq_shard: float) -> float:
  """Bytes one decoder layer keeps for its backward per microbatch, by remat policy: in
  units of the layer's bf16 tokens x d_model (21 at remat=none, read from the compiled
  Mixtral-8x7B stash: norm inputs, the gathered sequence, q, k, v, attention outputs, the
  router's tokens, the combine's [T, k, D]) plus, for MoE, the experts' bf16 rows, gate and
  up over the EP receive buffer (`ep_block_rows` from each of the ep sources)."""
  per_layer = {"none": 21, "dots_except_mlp": 16, "full": 2}[cfg.remat] * seq_shard * cfg.d_model
  if cfg.is_moe and cfg.remat != "full":
    f = cfg.effective_d_ff_expert // lay.etp
    rows = lay.ep * expert_parallel.ep_block_rows(cfg, math.ceil(seq_shard * lay.etp), lay.ep,
                                                  None)
    per_layer += 2 * rows * (cfg.d_model + 2 * f)
  return per_layer


def _chunk_residuals(cfg: ModelConfig, lay: Layout, seq_shard: float) -> float:
  """Bytes one chunk (a stage's share of the layers, per virtual stage) keeps per microbatch."""
  return cfg.n_layers // (lay.pp * lay.virtual_stages) * _layer_residuals(cfg, lay, seq_shard)


def _seq_shard(lay: Layout, batch: int, seq: int) -> float:
  """Tokens of one microbatch of one dp rank on one device (split over cp and tp)."""
  return seq * batch / (lay.dp * lay.microbatches) / (lay.cp * lay.tp)


def stash_bytes(cfg: ModelConfig, lay: Layout, batch: int, seq: int) -> float:
  """The pipeline stash (pp > 1): the schedule's slots, each holding one chunk's residuals
  (`esjax.parallel.residuals`) and a bf16 chunk input (the last chunk's, kept for its
  backward unit)."""
  if lay.pp == 1:
    return 0.0
  slots = make_schedule(lay.schedule, lay.pp, lay.microbatches, lay.virtual_stages).slots
  seq_shard = _seq_shard(lay, batch, seq)
  return slots * (_chunk_residuals(cfg, lay, seq_shard) + 2 * seq_shard * cfg.d_model)


def estimate(cfg: ModelConfig, lay: Layout, batch: int, seq: int,
             target: targets_lib.Target) -> tuple[float, float]:
  """(peak bytes per device, step seconds) of a layout, analytically (module docstring)."""
  work = analytic.Work(cfg, lay, batch, seq)
  dense, expert = analytic._params_per_device(cfg, lay)  # pylint: disable=protected-access
  local = dense + expert
  replicas_dense = lay.dp * lay.cp
  if lay.fsdp or lay.distributed_optimizer:
    master = dense / replicas_dense + expert / lay.edp
  else:
    master = local
  compute_copy = local / (replicas_dense if lay.fsdp else 1)
  state = 12 * master + 2 * compute_copy + 4 * local  # f32 master+moments, bf16, f32 grads
  seq_shard = _seq_shard(lay, batch, seq)
  transient = _chunk_residuals(cfg, lay, seq_shard) + 34 * seq_shard * cfg.d_model
  logits = 3 * 4 * seq_shard * cfg.vocab_size  # the (cp, tp) shard of [tokens, V] float32, 3x
  memory = state + stash_bytes(cfg, lay, batch, seq) + transient + logits
  # Time: compute over the bubble, minimum bytes on their links.
  compute = work.hardware_flops / lay.n_devices / target.matmul_flops / (1 - work.bubble)
  intra, inter = target.intra_node_bytes_per_s, target.inter_node_bytes_per_s
  per_node = target.devices_per_node
  inner = {"tp": lay.tp, "cp": lay.tp * lay.cp, "ep": lay.etp * lay.ep}
  comm = 0.0
  for kind, moved in work.minimum_bytes().items():
    span = inner.get(kind.split(" ")[0], lay.n_devices)
    comm += moved / (intra if span <= per_node else inter)
  return memory, compute + comm


def candidates(cfg: ModelConfig, n: int, batch: int, seq: int, target: targets_lib.Target
               ) -> list[Candidate]:
  """Every valid (layout, remat) with its estimate, those estimated to fit first, fastest
  first."""
  out = []
  for lay in layouts(cfg, n, batch, seq, target.devices_per_node):
    for remat in REMATS:
      c = cfg.replace(remat=remat)
      mem, t = estimate(c, lay, batch, seq, target)
      out.append(Candidate(lay, remat, mem, t))
  return sorted(out, key=lambda c: (c.memory > target.usable_bytes, c.time))


def search(config: Any, target: targets_lib.Target, n: int, top: int = 3,
           log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
  """Compiles the `top` best candidates of `config` (its model, batch and sequence) and
  returns their plans (JSON dicts) ranked by predicted step time, those that fit first."""
  cfg = common.model_config(config)
  tc = config.train
  ranked = candidates(cfg, n, tc.batch_size, tc.seq_len, target)
  if not ranked:
    raise ValueError(f"no valid layout of {n} devices for this model and batch "
                     f"{tc.batch_size} x {tc.seq_len}")
  if log:
    log(f"{len(ranked)} candidate layouts; compiling the best {min(top, len(ranked))}:")
    for c in ranked[:top]:
      log(f"  {c.layout} remat={c.remat}: estimated {c.memory / 2**30:.1f} GiB, "
          f"{c.time:.2f} s")
  results = []
  for c in ranked[:top]:
    cand = copy.deepcopy(config)
    for key, value in c.overrides().items():
      section, field = key.split(".")
      cand[section][field] = value
    r = dryrun.plan(cand, target, n).to_json()
    r.update(remat=c.remat, estimated_peak_bytes=c.memory, estimated_step_s=c.time,
             peak_over_estimate=r["peak_bytes_per_device"] / c.memory)
    if r["predicted_step_s"]:
      r["step_over_estimate"] = r["predicted_step_s"] / c.time
    results.append(r)
    if log:
      log(f"  compiled {r['layout']} remat={c.remat}: peak "
          f"{r['peak_bytes_per_device'] / 2**30:.1f} GiB (estimated {c.memory / 2**30:.1f}, "
          f"x{r['peak_over_estimate']:.2f}), fits {r['fits']}, predicted "
          f"{r['predicted_step_s']:.2f} s (estimated {c.time:.2f}), MFU "
          f"{r['predicted_mfu']:.1%}")
  if log:
    log(calibration(results, ranked[top:], target))
  return sorted(results, key=lambda r: (not r["fits"], r["predicted_step_s"] or 0.0))


def calibration(results: list[dict[str, Any]], rest: list[Candidate],
                target: targets_lib.Target) -> str:
  """The compiled / estimated peak and step time of the compiled candidates, and how many
  of the candidates left uncompiled would still fit with their estimate scaled by the
  largest peak ratio seen (the analytic model misses what the compiler adds)."""
  mem = max(r["peak_over_estimate"] for r in results)
  steps = [r["step_over_estimate"] for r in results if "step_over_estimate" in r]
  fit = sum(c.memory * mem <= target.usable_bytes for c in rest)
  line = f"calibration: compiled peak / estimate up to x{mem:.2f}"
  if steps:
    line += f", predicted step / estimate x{min(steps):.2f}-x{max(steps):.2f}"
  return line + f"; {fit} of the {len(rest)} uncompiled candidates fit at x{mem:.2f}"

