#!/usr/bin/env bash
# One per node of a SLURM job (train.sbatch starts it with srun --ntasks-per-node=1): starts
# one esjax.main process per GPU of this node, with process ids node_rank*G .. node_rank*G+G-1
# of nodes*G, the coordinator on the job's first node, and per-process logs.
#
#   launch/slurm/node.sh CONFIG WORKDIR [KEY=VALUE ...]
#
# GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else nvidia-smi's count), ESJAX_PORT (default
# 61440 + job id % 4096), LOG_DIR (default WORKDIR/logs/<job id>). ESJAX_CPU_DEVICES=N runs
# CPU processes with N devices each instead (how tests/launch_test.py runs this off a cluster).
set -euo pipefail
cd "${ESJAX_ROOT:-$(dirname "${BASH_SOURCE[0]}")/../..}"
source launch/lib.sh

if [[ $# -lt 2 ]]; then
  sed -n '6,11p' "${BASH_SOURCE[0]}" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2

: "${SLURM_JOB_ID:?node.sh runs inside a SLURM job (srun from train.sbatch)}"
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
node_rank=${SLURM_NODEID:-0}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z "${gpus}" ]]; then gpus=$(nvidia-smi -L | wc -l); fi
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
port=${ESJAX_PORT:-$((61440 + SLURM_JOB_ID % 4096))}

spawn_training "${gpus}" $((node_rank * gpus)) $((nodes * gpus)) "${head_node}:${port}" \
  "${LOG_DIR:-${workdir}/logs/${SLURM_JOB_ID}}" "${config}" "${workdir}" "$@"
