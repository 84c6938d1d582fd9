#!/usr/bin/env bash
# N processes of esjax.main on this machine, joined over loopback into one jax job: the
# multi-host code path (jax.distributed, global arrays built on every process) on one box.
#
#   launch/local.sh NPROC CONFIG WORKDIR [KEY=VALUE ...]
#
#   ESJAX_CPU_DEVICES=4 launch/local.sh 2 esjax/configs/tiny.py /tmp/run parallel.dp=8
#       2 CPU processes with 4 fake devices each = one 8-device job
#   launch/local.sh 8 esjax/configs/presets.py:mixtral-8x7b /tmp/run parallel.ep=8
#       one process per GPU on an 8-GPU machine
#
# ESJAX_CPU_DEVICES=N: CPU processes with N devices each; unset: process i drives GPU i.
# ESJAX_PORT (default 12321) is the coordinator's port; logs go to WORKDIR/logs/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/lib.sh

if [[ $# -lt 3 ]]; then
  sed -n '5,13p' "${BASH_SOURCE[0]}" >&2
  exit 2
fi
nproc=$1 config=$2 workdir=$3
shift 3
if [[ ! "${nproc}" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch: NPROC must be a positive integer, got '${nproc}'" >&2
  exit 2
fi
spawn_training "${nproc}" 0 "${nproc}" "127.0.0.1:${ESJAX_PORT:-12321}" "${workdir}/logs" \
  "${config}" "${workdir}" "$@"
