"""Train-step throughput of a dropless MoE against the dense model with the same active FLOPs.

    python -m benchmarks.moe_step  # 8 experts, top-2, d_model 256, d_ff_expert 1024, 4096 tokens
    python -m benchmarks.moe_step --repeats 15 --impls blocked:128,blocked:512

A step is forward + backward + AdamW update, jitted with the parameters and optimizer state
donated. The dense model has d_ff = top_k * d_ff_expert, so both do the same matmul FLOPs per
token. Models are timed in interleaved rounds (the CPU is shared and noisy) and the medians
are compared within this one run. Prints one JSON line per model, then a summary line with
`moe_<impl>_over_dense` step-time ratios. A third model, "rest" (d_ff=8), times what both
share (attention, embeddings, LM head, AdamW); `moe_<impl>_mlp_over_dense_mlp` is the ratio of
the MLP parts, (moe - rest) / (dense - rest).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from esjax.models import ModelConfig, Transformer, count_params, moe
from esjax.models.loss import lm_loss
from esjax.sharding.plan import ParallelPlan


def make_step(cfg: ModelConfig, batch: dict[str, jax.Array]):
  """(step, params, opt_state): step(params, opt_state, batch) -> (params, opt_state, loss)."""
  graphdef, params, rest = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param, ...)
  tx = optax.adamw(1e-3, weight_decay=0.1)
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    def objective(p):
      return lm_loss(nnx.merge(graphdef, p, rest), batch)

    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, loss = step(params, opt_state, batch)  # compile + warm up
  jax.block_until_ready(loss)
  return step, params, opt_state


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--n_layers", type=int, default=2)
  ap.add_argument("--n_experts", type=int, default=8)
  ap.add_argument("--top_k", type=int, default=2)
  ap.add_argument("--d_ff_expert", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--block", type=int, default=ModelConfig.moe_block_size,
                  help="moe_block_size for 'blocked'")
  ap.add_argument("--impls", default="blocked,ragged",
                  help="comma-separated moe_impl values, each optionally impl:block_size")
  ap.add_argument("--repeats", type=int, default=9)
  args = ap.parse_args(argv)

  base = ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=args.n_layers,
                     n_heads=args.d_model // 64, n_kv_heads=args.d_model // 64,
                     d_ff=args.top_k * args.d_ff_expert, max_seq_len=args.seq)
  # "rest": the same decoder with a negligible MLP, i.e. the cost both models share
  # (attention, embeddings, LM head, optimizer); it gives the MLP-only ratio as well.
  models = {"dense": base, "rest": base.replace(d_ff=8)}
  for spec in args.impls.split(","):
    impl, _, block = spec.partition(":")
    models[f"moe_{spec.replace(':', '')}"] = base.replace(
        n_experts=args.n_experts, top_k=args.top_k, d_ff_expert=args.d_ff_expert,
        moe_impl=impl, moe_block_size=int(block or args.block), capacity_factor=0.0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, base.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  n_tokens = args.batch * args.seq

  state = {name: make_step(cfg, batch) for name, cfg in models.items()}
  times = {name: [] for name in models}
  for _ in range(args.repeats):  # interleaved rounds: noise hits every model alike
    for name, (step, params, opt_state) in state.items():
      t0 = time.perf_counter()
      params, opt_state, loss = step(params, opt_state, batch)
      jax.block_until_ready(loss)
      times[name].append(time.perf_counter() - t0)
      state[name] = (step, params, opt_state)

  med = {name: float(np.median(t)) for name, t in times.items()}
  rest = med["rest"]
  for name, cfg in models.items():
    print(json.dumps({
        "model": name, "moe_impl": moe.moe_impl(cfg, ParallelPlan.single()) if cfg.is_moe else None,
        "block": cfg.moe_block_size if cfg.is_moe else None,
        "step_ms": round(1e3 * med[name], 2), "min_ms": round(1e3 * min(times[name]), 2),
        "tokens_per_s": round(n_tokens / med[name], 1),
        "active_params": count_params(cfg)["active"], "total_params": count_params(cfg)["total"],
    }))
  print(json.dumps({
      "summary": "moe_step", "backend": jax.default_backend(), "tokens": n_tokens,
      "d_model": args.d_model, "n_layers": args.n_layers, "n_experts": args.n_experts,
      "top_k": args.top_k, "d_ff_expert": args.d_ff_expert, "repeats": args.repeats,
      **{f"{name}_over_dense": round(med[name] / med["dense"], 3)
         for name in models if name.startswith("moe")},
      **{f"{name}_mlp_over_dense_mlp": round((med[name] - rest) / (med["dense"] - rest), 3)
         for name in models if name.startswith("moe")},
  }))


if __name__ == "__main__":
  main()
