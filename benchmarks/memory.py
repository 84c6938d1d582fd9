"""Peak bytes of the train step as experts and sequence length grow (compile only, no run).

    python -m benchmarks.memory
    python -m benchmarks.memory --base moe100m --experts 4,8,16 --seqs 128,256
    python -m benchmarks.memory --experts= --seqs= --attn-seqs 4096,8192,16384,32768 \
        --attn-impl xla,chunked --attn-tp 2

Starts from a `benchmarks.mfu` config and varies one of n_experts / seq_len at a time; the
bytes come from the compiled executable's `memory_analysis()` (see `mfu.memory_stats`).
`--attn-seqs`: one attention layer's forward + backward per sequence length (one sequence;
the gpu-mixtral layer: 16 heads, 8 KV heads, head_dim 128, d_model 2048), per device with
the heads split over `--attn-tp` devices. Prints one JSON line per point.
"""

from __future__ import annotations

import argparse
import json

from esjax.models import count_params
from benchmarks import attention, mfu


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
  ap.add_argument("--attn-seqs", default="", help="one attention layer, e.g. 4096,32768")
  ap.add_argument("--attn-impl", default="auto", help="comma-separated attention_impl values")
  ap.add_argument("--attn-tp", type=int, default=1, help="devices the 16 heads are split over")
  args = ap.parse_args(argv)
  if args.base not in mfu.CONFIGS:
    raise SystemExit(f"--base={args.base!r}; known: {sorted(mfu.CONFIGS)}")
  ints = lambda text: [int(x) for x in text.split(",") if x]
  for e in ints(args.experts):
    print(json.dumps({"vary": "n_experts", **point(args.base, e, None)}), flush=True)
  for s in ints(args.seqs):
    print(json.dumps({"vary": "seq_len", **point(args.base, None, s)}), flush=True)
  for impl in args.attn_impl.split(","):
    cfg = attention.layer_config(16 // args.attn_tp, 8 // args.attn_tp, attention_impl=impl)
    for s in ints(args.attn_seqs):
      print(json.dumps({"vary": "attention_seq_len", "attention_impl": impl, "seq_len": s,
                        "tp": args.attn_tp, "heads_per_device": cfg.n_heads,
                        **attention.layer_memory(cfg, 1, s)}), flush=True)


if __name__ == "__main__":
  main()
