"""The planner's readable table."""

from __future__ import annotations

from esjax.plan.dryrun import Result
from esjax.plan.targets import Target


def size(b: float) -> str:
  """Bytes in the largest binary unit that keeps them >= 1: '47.67 GiB', '312.0 KiB'."""
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(b) >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b:.0f} B"


def flops(f: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if abs(f) >= scale:
      return f"{f / scale:.2f} {unit}"
  return f"{f:.0f} FLOP"


def format_result(r: Result, target: Target) -> str:
  m = r.memory
  lines = [f"layout {r.layout} on {r.devices} x {target.name}",
           f"compile: lower {r.compile_s['lower']:.0f} s, compile {r.compile_s['compile']:.0f} s"
           + (f", with the cluster's {len(r.xla_flags)} XLA flags" if r.xla_flags else ""),
           "", "memory per device"]
  for k in ("arguments", "outputs", "aliased", "temporaries", "buffers", "compiler_peak",
            "remat_limit", "remat_reached", "peak"):
    if k in m:
      lines.append(f"  {k:<16}{size(m[k]):>14}")
  usable = "-" if m["usable"] == float("inf") else size(m["usable"])
  lines.append(f"  {'usable':<16}{usable:>14}   fits: {'yes' if r.fits else 'NO'}")
  width = max([len(",".join(c["axes"])) for c in r.collectives] + [9]) + 2
  lines += ["", "collectives per step and device",
            f"  {'op':<20}{'mesh axes':<{width}}{'link':<8}{'count':>8}{'bytes':>14}"]
  for c in r.collectives:
    axes = ",".join(c["axes"]) or "-"
    note = "  (routed share)" if c["data_dependent"] else ""
    lines.append(f"  {c['op']:<20}{axes:<{width}}{c['link']:<8}{c['count']:>8.0f}"
                 f"{size(c['bytes']):>14}{note}")
  total = sum(c["bytes"] for c in r.collectives)
  minimum = sum(r.analytic_bytes.values())
  lines.append(f"  {'total':<{36 + width}}{size(total):>14}")
  lines += ["", "analytic minimum per step and device"]
  for k, v in r.analytic_bytes.items():
    lines.append(f"  {k:<30}{size(v):>14}")
  ratio = f"{total / minimum:.2f}x" if minimum else "-"
  lines.append(f"  {'total':<30}{size(minimum):>14}   compiled / minimum: {ratio}")
  lines += ["", "matmul FLOPs per step (all devices)",
            f"  {'part':<12}{'model':>14}{'compiled':>14}{'ratio':>9}"]
  for row in r.flops:
    ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
    flag = "  waste" if row["part"] in r.waste else ""
    lines.append(f"  {row['part']:<12}{flops(row['model']):>14}{flops(row['compiled']):>14}"
                 f"{ratio:>9}{flag}")
  model = sum(row["model"] for row in r.flops)
  compiled = sum(row["compiled"] for row in r.flops)
  lines.append(f"  {'total':<12}{flops(model):>14}{flops(compiled):>14}"
               f"{compiled / model if model else 0:>8.2f}x")
  p = r.prediction
  if p.get("predicted_step_s"):
    lines += ["", f"predicted from the compiled FLOPs (roofline of {target.name}):",
              f"  compute {p['compute_s']:.3f} s (bubble {p['bubble']:.1%}), communication "
              f"{p['comm_s']:.3f} s + latency {p['latency_s']:.3f} s, optimizer "
              f"{p['optimizer_s']:.3f} s",
              f"  step {p['predicted_step_s']:.3f} s (overlapped "
              f"{p['predicted_step_s_overlapped']:.3f} s), MFU {p['predicted_mfu']:.1%}, "
              f"HFU {p['predicted_hfu']:.1%}"]
  if r.notes:
    lines += [""] + [f"note: {n}" for n in r.notes]
  return "\n".join(lines)
