"""The router losses the training step reports, against an independent float64 computation
from the step's own router logits.

The step's router logits are recorded as it runs (a `jax.debug.callback` on the logits the
MoE routes, which changes nothing it computes); the balance (Switch), sequence-balance and
z losses are then computed here in float64 numpy from Megatron's definitions, not through
esjax's router functions, and compared with the metrics the train step returns. A change to
any of the step's router-loss formulas (a factor of 1.1 on one of them) fails this test even
where the formula tests of `routing/router.py` would not see it.
"""

import jax
import numpy as np
import pytest

from esjax.configs import tiny
from esjax.models import moe
from esjax.train import state as state_lib, step as step_lib

B, S = 4, 16


def _reference(logits: np.ndarray, mask: np.ndarray, cfg) -> dict[str, float]:
  """Megatron's losses of one layer's logits [B*S, E] over the tokens with mask 1."""
  e, k = cfg.n_experts, cfg.top_k
  x = logits.astype(np.float64)
  if cfg.score_fn == "softmax":
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
  else:  # sigmoid scores, normalised into a distribution for the balance losses
    p = 1 / (1 + np.exp(-x))
    p /= p.sum(-1, keepdims=True)
  # The balance losses count the plain top-k of the scores (no expert bias, no group limit).
  top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
  chosen = np.zeros_like(p)
  np.put_along_axis(chosen, top, 1.0, axis=-1)
  w = mask.reshape(-1).astype(np.float64)
  t = w.sum()
  aux = e * np.sum((chosen * w[:, None]).sum(0) / (t * k) * (p * w[:, None]).sum(0) / t)
  t_seq = t / B  # Megatron's _apply_seq_aux_loss: the mean tokens per sequence
  ws = w.reshape(B, S, 1)
  f_seq = (chosen.reshape(B, S, e) * ws).sum(1) / (t_seq * k)
  p_seq = (p.reshape(B, S, e) * ws).sum(1) / t_seq
  seq = np.mean(e * np.sum(f_seq * p_seq, axis=-1))
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  z = np.sum(lse ** 2 * w) / t
  return {"aux_loss": aux, "seq_aux_loss": seq, "z_loss": z}


@pytest.mark.parametrize("variant", ["moe", "deepseek"])
def test_the_step_reports_the_router_losses_of_its_logits(variant, monkeypatch):
  c = tiny.get_config(variant)
  c.train.batch_size, c.train.seq_len = B, S
  c.model.n_layers, c.model.remat = 2, "none"
  if variant == "deepseek":
    c.model.first_k_dense = 0  # both layers MoE
  recorded = []
  route = moe.routing_for

  def recording_route(cfg, logits, bias=None):
    jax.debug.callback(lambda x: recorded.append(np.asarray(x)), logits)
    return route(cfg, logits, bias)

  monkeypatch.setattr(moe, "routing_for", recording_route)
  run = step_lib.for_config(c, jax.devices()[:1])
  state = state_lib.create_train_state(run.steps.engine, run.tx, jax.random.key(0))
  rng = np.random.default_rng(0)
  mask = (rng.random((B, S)) > 0.3).astype(np.int32)
  batch = {"inputs": rng.integers(0, run.model_cfg.vocab_size, (B, S)).astype(np.int32),
           "targets": rng.integers(0, run.model_cfg.vocab_size, (B, S)).astype(np.int32),
           "mask": mask}
  _, metrics = run.steps.train(state, jax.device_put(batch, run.steps.batch_sharding))
  jax.effects_barrier()
  cfg = run.model_cfg
  assert len(recorded) == len(cfg.moe_layers) >= 2  # one forward per MoE layer
  per_layer = [_reference(x, mask, cfg) for x in recorded]
  for name in ("aux_loss", "seq_aux_loss", "z_loss"):
    want = np.mean([r[name] for r in per_layer])
    assert float(metrics[name]) == pytest.approx(want, rel=2e-5), name
  assert float(metrics["moe_loss"]) == pytest.approx(
      sum(cfg.aux_loss_coef * r["aux_loss"] + cfg.seq_aux_loss_coef * r["seq_aux_loss"]
          + cfg.z_loss_coef * r["z_loss"] for r in per_layer), rel=2e-5)
