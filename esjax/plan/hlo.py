"""Reading the text of a compiled (optimized) HLO module: its computations, the shapes of
their instructions, and how many times each computation runs per call of the entry.

A computation's multiplicity is the product of the trip counts of the while loops around it
(XLA's `known_trip_count`; a loop without one counts once and is reported) and, for a
conditional whose op name ends in a scope listed in `branch_weights` (the pipeline engine's
`lax.cond`s), the share of executions that take each branch. Fusions, calls and branches are
followed; reducers (`to_apply`) are not (they run per element, not per call).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
# `%name = shape opcode(operands), attributes`; the shape may be a tuple.
INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-$]+)\((.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def dims(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """Every array shape in `shape_text`, as (dtype, dims), in order."""
  return [(dt, tuple(int(x) for x in d.split(",") if x)) for dt, d in SHAPE.findall(shape_text)]


def shape_bytes(text: str) -> list[int]:
  return [math.prod(d) * DTYPE_BYTES.get(dt, 1) for dt, d in dims(text)]


def top_level(text: str) -> list[str]:
  """The top-level elements of a tuple shape '(a, (b, c), d)' (or [text] for a plain one)."""
  text = text.strip()
  if not text.startswith("("):
    return [text]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        out.append(text[start:i])
    elif ch == "," and depth == 1:
      out.append(text[start:i])
      start = i + 1
  return [e for e in out if e.strip()]


def op_name(line: str) -> str:
  m = _OP_NAME.search(line)
  return m.group(1) if m else ""


def scopes(name: str) -> list[str]:
  """The components of an op name with the transforms around them removed:
  'jit(f)/transpose(jvp(experts))/dot_general' -> ['f', 'experts', 'dot_general']."""
  return [re.sub(r"^(?:\w+\()*|\)*$", "", p) for p in name.split("/")]


@dataclasses.dataclass
class Module:
  """The computations of an HLO module (name -> instruction lines) and its entry."""

  comps: dict[str, list[str]]
  entry: str

  @classmethod
  def parse(cls, hlo: str) -> "Module":
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
      if line and not line[0].isspace() and line.rstrip().endswith("{") and "=" not in line[:3]:
        name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
        current = name.lstrip("%")
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      elif current is not None and line.startswith("  "):
        comps[current].append(line)
    return cls(comps, entry)

  def multiplicities(self, branch_weights: dict[str, float] | None = None
                     ) -> tuple[dict[str, float], list[str]]:
    """(times each computation runs per call of the entry, the while loops with no known
    trip count, counted once)."""
    weights = branch_weights or {}
    mult: dict[str, float] = collections.defaultdict(float)
    unknown: list[str] = []

    def visit(name: str, times: float, depth: int = 0):
      if depth > 64 or name not in self.comps:
        return
      mult[name] += times
      for line in self.comps[name]:
        trip = _TRIP.search(line)
        calls, branches = _callees(line)
        for kind, callee in calls:
          if kind == "to_apply":
            continue
          n = 1
          if kind == "body":
            if trip:
              n = int(trip.group(1))
            elif INSTR.match(line):
              unknown.append(INSTR.match(line).group(1))
          visit(callee, times * n, depth + 1)
        for callees in branches:
          w = weights.get(_branch_scope(line) or "")
          if w is not None and len(callees) == 2:  # lax.cond: (false, true)
            visit(callees[0], times * (1 - w), depth + 1)
            visit(callees[1], times * w, depth + 1)
          else:
            for callee in callees:
              visit(callee, times, depth + 1)

    visit(self.entry, 1.0)
    return mult, unknown

  def callers_scope(self, scope_of) -> dict[str, str]:
    """For each computation, the scope `scope_of(op_name)` (None: none) of the innermost
    instruction on its call path from the entry that has one: what an instruction whose own
    op name lost its scope (XLA's passes may rewrite it) inherits."""
    out: dict[str, str] = {}

    def visit(name: str, scope: str | None, depth: int = 0):
      if depth > 64 or name not in self.comps or name in out:
        return
      out[name] = scope
      for line in self.comps[name]:
        calls, branches = _callees(line)
        callees = [c for _, c in calls] + [c for group in branches for c in group]
        if callees:
          here = scope_of(op_name(line)) or scope
          for callee in callees:
            visit(callee, here, depth + 1)

    visit(self.entry, None)
    return out

  def shapes(self, comp: str) -> dict[str, str]:
    """Instruction name -> its shape text, in computation `comp`."""
    out = {}
    for line in self.comps[comp]:
      m = INSTR.match(line)
      if m:
        out[m.group(1)] = m.group(2)
    return out


def _callees(line: str) -> tuple[list[tuple[str, str]], list[list[str]]]:
  """What an instruction calls: (kind, computation) pairs (calls, to_apply, body, condition)
  and the branch groups of a conditional (a lax.cond's as (false, true))."""
  branches = [re.findall(r"%?([\w.\-]+)", b) for b in _BRANCHES.findall(line)]
  branches += [[f, t] for t, f in _TRUE_FALSE.findall(line)]
  return _CALLS.findall(line), branches


def _branch_scope(line: str) -> str | None:
  """The named scope a conditional was traced in: op_name '.../<scope>/cond'."""
  parts = scopes(op_name(line))
  if len(parts) < 2 or not parts[-1].startswith("cond"):
    return None
  return parts[-2]
