# XLA flags for NVIDIA GPUs (sourced by train.sbatch). Every flag here is one the pinned
# jaxlib accepts: tests/launch_test.py starts jax with them, so a typo fails there, not on
# the cluster (an unknown flag aborts the process). Flags already in XLA_FLAGS come last and win.
ESJAX_GPU_XLA_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true  # overlap collectives with compute
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_enable_triton_gemm=false              # cuBLAS for the matmuls
  --xla_gpu_enable_command_buffer=
  --xla_gpu_all_reduce_combine_threshold_bytes=1073741824
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  --xla_gpu_enable_pipelined_all_gather=true      # FSDP gathers of layer i+1 during layer i
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_enable_nccl_comm_splitting=true
)
export XLA_FLAGS="${ESJAX_GPU_XLA_FLAGS[*]} ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
