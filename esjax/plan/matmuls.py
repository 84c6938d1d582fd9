"""Matmul FLOPs of a compiled step, read from its optimized HLO: what the devices will run,
not what the model needs.

Counted, per device and per step (each weighed by how many times its computation runs,
`esjax.plan.hlo.Module.multiplicities`: loop trip counts, the pipeline's branch shares):

- `dot` ops, also inside fusions (XLA:GPU's Triton GEMM fusions, split-K included: the split
  is a batch dimension of the dot): 2 x prod(result) x prod(lhs contracting dims);
- cuBLAS / cuBLASLt GEMM custom calls, by the dimension numbers in their backend config;
- `convolution` ops: 2 x prod(result) x (kernel elements per output feature);
- kernels that declare a cost in their backend config (Pallas on TPU: `cost_estimate`), or
  in a named scope `declared_flops_<n>` of their op name (Mosaic GPU drops the backend
  config's: esjax's grouped-matmul kernels, `esjax.kernels.gmm.ops`).

Other custom calls that may compute (cuDNN fused attention, Triton and Mosaic GPU Pallas
kernels without a declared cost) are listed in `unpriced` with their executions per step,
never silently counted as zero.

Each FLOP is given to the innermost model part whose named scope is in its op name
(`parts`: scope -> part, e.g. the attention projections, core attention, MLP, routed
experts, router, LM head), or else to the part of the innermost instruction on its
computation's call path that has one (XLA's passes can leave a dot in a loop with its
enclosing op's name); the rest is "other".
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

from esjax.kernels.gmm import DECLARED_FLOPS
from esjax.plan import hlo

OTHER = "other"
GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")
# Custom calls known to do no arithmetic worth counting.
_NO_FLOPS = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "AllocateBuffer",
             "MoveToHost", "MoveToDevice", "annotate_device_placement", "LayoutConstraint",
             "TopK")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_COST = re.compile(r'"cost_estimate":\s*\{[^}]*"flops":\s*"?(\d+)')
_SCOPE_COST = re.compile(rf'op_name="[^"]*\b{DECLARED_FLOPS}(\d+)')
_DIMS = re.compile(r"\b(lhs_contracting_dims|lhs_batch_dims)=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=\w+_(\w+)->\w+")


@dataclasses.dataclass
class Count:
  """Matmul FLOPs per device and step by part, and what could not be priced."""

  by_part: dict[str, float]
  unpriced: dict[str, float]  # custom-call target -> executions per step
  unknown_loops: list[str]  # while loops without a known trip count (counted once)

  @property
  def total(self) -> float:
    return sum(self.by_part.values())


def _operands(rest: str) -> list[str]:
  """Operand names of an instruction: `%a, %b), attrs` -> ['a', 'b']."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def _result_size(shape_text: str) -> int:
  """Elements of the (first) result: a custom call's tuple carries its workspace after it."""
  found = hlo.dims(hlo.top_level(shape_text)[0])
  return math.prod(found[0][1]) if found else 0


def _contracted(lhs_shape: str, contracting: list[int]) -> int:
  found = hlo.dims(lhs_shape)
  if not found:
    return 0
  return math.prod(found[0][1][i] for i in contracting)


def instruction_flops(opcode: str, shape_text: str, rest: str, shapes: dict[str, str]
                      ) -> tuple[float, str | None]:
  """(FLOPs of one execution, None) for a matmul-like instruction; (0, target) for a custom
  call that may compute but declares no cost; (0, None) otherwise."""
  if opcode == "dot":
    ops = _operands(rest)
    dims = dict(_DIMS.findall(rest))
    contracting = [int(x) for x in dims.get("lhs_contracting_dims", "").split(",") if x]
    return 2.0 * _result_size(shape_text) * _contracted(shapes.get(ops[0], ""),
                                                        contracting), None
  if opcode == "convolution":
    ops = _operands(rest)
    kernel = hlo.dims(shapes.get(ops[1], "")) if len(ops) > 1 else []
    labels = _DIM_LABELS.search(rest)
    if not kernel or not labels:
      return 0.0, None
    out_features = kernel[0][1][labels.group(1).index("o")]
    return 2.0 * _result_size(shape_text) * math.prod(kernel[0][1]) / out_features, None
  if opcode != "custom-call":
    return 0.0, None
  target = _TARGET.search(rest)
  name = target.group(1) if target else "?"
  if name in GEMM_TARGETS:
    config = rest[rest.index("backend_config=") + len("backend_config="):]
    numbers = json.JSONDecoder().raw_decode(config)[0]["gemm_backend_config"][
        "dot_dimension_numbers"]
    contracting = [int(x) for x in numbers["lhs_contracting_dimensions"]]
    return 2.0 * _result_size(shape_text) * _contracted(
        shapes.get(_operands(rest)[0], ""), contracting), None
  cost = _COST.search(rest) or _SCOPE_COST.search(rest)
  if cost:
    return float(cost.group(1)), None
  if name in _NO_FLOPS:
    return 0.0, None
  return 0.0, name


def part_of(name: str, parts: dict[str, str]) -> str:
  """The part of the innermost scope of op name `name` listed in `parts`."""
  for scope in reversed(hlo.scopes(name)):
    if scope in parts:
      return parts[scope]
  return OTHER


def _part_or_none(name: str, parts: dict[str, str]) -> str | None:
  part = part_of(name, parts)
  return None if part == OTHER else part


def count(text: str, parts: dict[str, str],
          branch_weights: dict[str, float] | None = None) -> Count:
  """Matmul FLOPs per device and step of compiled HLO `text` (see the module docstring)."""
  module = hlo.Module.parse(text)
  mult, unknown = module.multiplicities(branch_weights)
  inherited = module.callers_scope(lambda name: _part_or_none(name, parts))
  by_part: dict[str, float] = collections.defaultdict(float)
  unpriced: dict[str, float] = collections.defaultdict(float)
  for comp, lines in module.comps.items():
    times = mult.get(comp, 0.0)
    if not times:
      continue
    shapes = None
    for line in lines:
      m = hlo.INSTR.match(line)
      if m is None or m.group(3) not in ("dot", "convolution", "custom-call"):
        continue
      shapes = shapes if shapes is not None else module.shapes(comp)
      flops, target = instruction_flops(m.group(3), m.group(2), m.group(4), shapes)
      if target:
        unpriced[target] += times
      elif flops:
        part = _part_or_none(hlo.op_name(line), parts) or inherited.get(comp) or OTHER
        by_part[part] += times * flops
  return Count(dict(by_part), dict(unpriced), unknown)
