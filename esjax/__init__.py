"""esjax: grow, upcycle and train Mixture-of-Experts language models in JAX.

Entry point: `python -m esjax.main --config=esjax/configs/tiny.py --workdir=DIR`.
"""

import flax

# esjax places every parameter itself (jit out_shardings from `esjax.parallel.rules`); flax's
# eager sharding of variables created under a mesh would apply the logical names as mesh axes.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
