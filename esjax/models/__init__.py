"""Dense and MoE decoders in Flax NNX."""

import flax

# esjax places every parameter itself (jit out_shardings from `esjax.parallel.rules`); flax's
# eager sharding of variables created under a mesh would apply the logical names as mesh axes.
# Every esjax model is built by a module of this package, so this runs before any of them.
flax.config.update("flax_always_shard_variable", False)

from esjax.models.config import ModelConfig, count_params
from esjax.models.transformer import Transformer
