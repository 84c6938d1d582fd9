#!/usr/bin/env bash
# The GPU check: one unattended script for a machine with one NVIDIA H100/H200 (about
# GPU_CHECK_BUDGET_S, default 540 s: every part has its own time limit, cut to what is left,
# and a part that would start with under 20 s left is skipped). It prints JSON lines: each
# benchmark's own rows, one {"part": ..., "status": ...} line per part (ok, failed, timeout,
# skipped, with the reason), and a final summary. Nothing here runs in CI.
#
#   bash benchmarks/gpu_check.sh            # python3 from PATH
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Parts, in this order: the platform (nvidia-smi, jax's devices); the check a training run
# makes before moe_impl=auto uses the grouped-matmul kernels (esjax.kernels.gmm.check); the
# kernels against ragged_dot and a dense matmul of the routed FLOPs at the Mixtral-8x7B and
# Qwen2-57B expert shapes, forward + backward (benchmarks.gmm); MFU of the real train step in
# bf16 on the largest MoE one GPU holds at sequence 4096 (benchmarks.mfu gpu-mixtral) against
# the bf16 matmul peak measured in the same run (anchors: Megatron 49.3% Mixtral 8x22B, NeMo
# 46.8%, MaxText ~50%), then with ragged_dot's experts (the step before moe_impl=auto meant
# the kernels); the planner's prediction for that step (deviceless, the GPU nvidia-smi names)
# against its measured time (benchmarks.plan_calibration); the Pallas routing kernel tests on
# Triton and the cuDNN attention tests (pytest -m gpu_only); the routing kernel against
# lax.top_k and the memory floor in bf16 (benchmarks.routing); cuDNN flash attention against
# the plain path at 4k and 8k, forward + backward (benchmarks.attention).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python3}
export JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
LOG=${GPU_CHECK_LOG:-/tmp/esjax_gpu_check}
mkdir -p "$LOG"
declare -a SUMMARY=()
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}

part() {  # part NAME LIMIT_S COMMAND...: runs, echoes its JSON lines, then a status line
  local name=$1 limit=$2
  shift 2
  local t0 rc status left
  t0=$(date +%s)
  left=$((BUDGET - (t0 - START)))
  if ((left < 20)); then
    skip "$name" "the check's budget of ${BUDGET} s is spent"
    return
  fi
  ((limit > left)) && limit=$left
  timeout --kill-after=10 "$limit" "$@" >"$LOG/$name.out" 2>"$LOG/$name.err"
  rc=$?
  grep -E '^\{' "$LOG/$name.out" || true
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  local tail=""
  if [[ $status != ok ]]; then
    tail=$(tail -n 3 "$LOG/$name.err" | tr '\n"\\' '   ' | cut -c1-300)
  fi
  printf '{"part": "%s", "status": "%s", "rc": %d, "seconds": %d, "log": "%s", "error": "%s"}\n' \
    "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$LOG/$name.err" "$tail"
  SUMMARY+=("\"$name\": \"$status\"")
}

skip() {
  printf '{"part": "%s", "status": "skipped", "reason": "%s"}\n' "$1" "$2"
  SUMMARY+=("\"$1\": \"skipped\"")
}

part platform 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader && '"$PY"' -c "import jax, json; d = jax.devices(); \
print(json.dumps({\"jax\": jax.__version__, \"devices\": [x.device_kind for x in d]}))"'
if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  skip kernels "jax sees no GPU here (see $LOG/platform.err)"
  printf '{"summary": "gpu_check", %s}\n' "$(IFS=,; echo "${SUMMARY[*]}")"
  exit 1
fi
# Issue 25's measurements first (the kernels, the step with and without them), so a short
# budget spends itself on them; then the other kernels.
part gmm_check 120 "$PY" -c 'import json
from esjax.kernels.gmm import check
from esjax.routing.expert_parallel import kernel_backend
from esjax.sharding.plan import ParallelPlan
plan = ParallelPlan.single()
backend = kernel_backend(plan)
why = check.mismatch(backend, plan.gpu_sms)
print(json.dumps({"gmm_check": backend, "mismatch": why}))
raise SystemExit(why is not None)'
part gmm_bf16 150 "$PY" -m benchmarks.gmm --rounds 5
part mfu_bf16 200 "$PY" -m benchmarks.mfu --dtype bfloat16 --configs gpu-mixtral --repeats 5
part mfu_ragged_bf16 150 "$PY" -m benchmarks.mfu --dtype bfloat16 --configs gpu-mixtral \
  --repeats 3 --moe-impl ragged
if "$PY" -c 'import jax_plugins.xla_cuda12' 2>/dev/null; then
  part plan_calibration 120 env JAX_PLATFORMS=cpu "$PY" -m benchmarks.plan_calibration \
    --measured "$LOG/mfu_bf16.out"
else
  skip plan_calibration "the CUDA plugin (the planner's deviceless compiler) is missing"
fi
if "$PY" -c 'import pytest' 2>/dev/null; then
  part kernels_triton 150 "$PY" -m pytest -q -x -m gpu_only -p no:cacheprovider \
    tests/kernels_test.py tests/attention_kernels_test.py tests/gmm_test.py
else
  skip kernels_triton "pytest is not installed for $PY"
fi
part routing_bf16 90 "$PY" -m benchmarks.routing --dtype bfloat16
part attention_cudnn 90 "$PY" -m benchmarks.attention --impl xla,cudnn --seq 4096,8192 \
  --dtype bfloat16
printf '{"summary": "gpu_check", %s}\n' "$(IFS=,; echo "${SUMMARY[*]}")"
