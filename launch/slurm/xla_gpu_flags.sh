# XLA flags for NVIDIA GPUs (sourced by train.sbatch), from the one list that the planner also
# compiles with: esjax/plan/gpu_specs/xla_gpu_flags.txt. Flags already in XLA_FLAGS come last
# and win.
_esjax_flags_file="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/esjax/plan/gpu_specs/xla_gpu_flags.txt"
mapfile -t ESJAX_GPU_XLA_FLAGS < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' \
  "${_esjax_flags_file}")
export XLA_FLAGS="${ESJAX_GPU_XLA_FLAGS[*]} ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
