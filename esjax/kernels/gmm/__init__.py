"""Grouped matmuls over routed rows (`kernel`: Mosaic GPU, `triton`) and the grouped SwiGLU
on them (`ops`, with jax's megablox on TPUs)."""

# The named-scope prefix by which a kernel declares its FLOPs (`<prefix><n>` around the call):
# set by `ops`, read by `esjax.plan.matmuls` (Mosaic GPU and Triton drop cost estimates).
DECLARED_FLOPS = "declared_flops_"
