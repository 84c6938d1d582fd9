#!/usr/bin/env bash
# esjax vs MaxText tokens/s on the same tiny dropless Mixtral (CPU, float32); prints JSON.
#
#   bash benchmarks/vs_maxtext.sh                      # install MaxText if needed, 2 rounds
#   VENV=/tmp/maxtext_venv bash benchmarks/vs_maxtext.sh --rounds 3 --seq 512
#
# MaxText 0.2.5 needs Python >= 3.12: it goes into its own venv ($VENV, default
# /tmp/maxtext_venv, reused when it already has maxtext), built with pyenv's 3.12 ($PY312).
# Extra arguments go to benchmarks/vs_maxtext.py (shapes, steps, rounds).
#
# Both trainers run with glibc's malloc asking for transparent huge pages
# (GLIBC_TUNABLES=glibc.malloc.hugetlb=1; set GLIBC_TUNABLES to change it): XLA:CPU maps each
# step's temporaries afresh, and with 4 KiB pages every step pays a page fault per page
# touched (README, "Performance", has the measured cost).
set -euo pipefail
export GLIBC_TUNABLES="${GLIBC_TUNABLES-glibc.malloc.hugetlb=1}"
cd "$(dirname "$0")/.."
VENV="${VENV:-/tmp/maxtext_venv}"
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python}"
if ! "$VENV/bin/python" -c "import maxtext" 2>/dev/null; then
  echo "installing maxtext[tpu]==0.2.5 into $VENV" >&2
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "maxtext[tpu]==0.2.5"
fi
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
exec python -m benchmarks.vs_maxtext --maxtext_python "$VENV/bin/python" "$@"
