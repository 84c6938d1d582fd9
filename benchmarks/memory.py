"""Peak bytes of the train step as experts and sequence length grow (compile only, no run).

    python -m benchmarks.memory
    python -m benchmarks.memory --base moe100m --experts 4,8,16 --seqs 128,256

Starts from a `benchmarks.mfu` config and varies one of n_experts / seq_len at a time; the
bytes come from the compiled executable's `memory_analysis()` (see `mfu.memory_stats`).
Prints one JSON line per point.
"""

from __future__ import annotations

import argparse
import json

from esjax.models import count_params
from benchmarks import mfu


def point(name: str, n_experts: int | None, seq_len: int | None) -> dict:
  cfg, batch_size, base_seq = mfu.CONFIGS[name]
  seq_len = seq_len or base_seq
  cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, seq_len))
  if n_experts:
    cfg = cfg.replace(n_experts=n_experts)
  compiled, _, _ = mfu.build_step(cfg, batch_size, seq_len)
  return {"base": name, "n_experts": cfg.n_experts, "seq_len": seq_len,
          "batch_size": batch_size, "total_params": count_params(cfg)["total"],
          **mfu.memory_stats(compiled)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--base", default="tiny-moe", help=f"one of {sorted(mfu.CONFIGS)}")
  ap.add_argument("--experts", default="4,8,16,32")
  ap.add_argument("--seqs", default="64,128,256,512")
  args = ap.parse_args(argv)
  if args.base not in mfu.CONFIGS:
    raise SystemExit(f"--base={args.base!r}; known: {sorted(mfu.CONFIGS)}")
  for e in map(int, args.experts.split(",")):
    print(json.dumps({"vary": "n_experts", **point(args.base, e, None)}), flush=True)
  for s in map(int, args.seqs.split(",")):
    print(json.dumps({"vary": "seq_len", **point(args.base, None, s)}), flush=True)


if __name__ == "__main__":
  main()
