"""The planner's readable table."""

from __future__ import annotations

from esjax.plan.dryrun import Result
from esjax.plan.targets import Target

GiB = 2 ** 30


def format_result(r: Result, target: Target) -> str:
  m = r.memory
  usable = "-" if m["usable"] == float("inf") else f"{m['usable'] / GiB:.1f}"
  lines = [f"layout {r.layout} on {r.devices} x {target.name}",
           f"compile: lower {r.compile_s['lower']:.0f} s, compile {r.compile_s['compile']:.0f} s",
           "", "memory per device (GiB)"]
  for k in ("arguments", "outputs", "aliased", "temporaries", "peak"):
    lines.append(f"  {k:<14}{m[k] / GiB:>10.2f}")
  lines.append(f"  {'usable':<14}{usable:>10}   fits: {'yes' if r.fits else 'NO'}")
  width = max([len(",".join(c["axes"])) for c in r.collectives] + [4]) + 2
  lines += ["", f"{'collectives per step and device':<{20 + width}}{'link':<8}{'count':>8}"
                f"{'GiB':>10}"]
  for c in r.collectives:
    axes = ",".join(c["axes"]) or "-"
    note = " (routed share)" if c["data_dependent"] else ""
    lines.append(f"  {c['op']:<18}{axes:<{width}}{c['link']:<8}{c['count']:>8.0f}"
                 f"{c['bytes'] / GiB:>10.3f}{note}")
  total = sum(c["bytes"] for c in r.collectives)
  minimum = sum(r.analytic_bytes.values())
  lines.append(f"  {'total':<{34 + width}}{total / GiB:>10.3f}")
  lines += ["", "analytic minimum per step and device (GiB)"]
  for k, v in r.analytic_bytes.items():
    lines.append(f"  {k:<30}{v / GiB:>10.3f}")
  ratio = f"{total / minimum:.2f}x" if minimum else "-"
  lines.append(f"  {'total':<30}{minimum / GiB:>10.3f}   compiled / minimum: {ratio}")
  p = r.prediction
  if p.get("predicted_step_s"):
    lines += ["", f"predicted (roofline of {target.name}):",
              f"  compute {p['compute_s']:.3f} s (bubble {p['bubble']:.1%}), communication "
              f"{p['comm_s']:.3f} s, optimizer {p['optimizer_s']:.3f} s",
              f"  step {p['predicted_step_s']:.3f} s (overlapped "
              f"{p['predicted_step_s_overlapped']:.3f} s), MFU {p['predicted_mfu']:.1%}"]
  return "\n".join(lines)
