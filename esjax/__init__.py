"""esjax: grow, upcycle and train Mixture-of-Experts language models in JAX.

Entry point: `python -m esjax.main --config=esjax/configs/tiny.py --workdir=DIR`.
"""

from esjax import jax_start

jax_start.import_jax()  # before any esjax module imports jax: see jax_start

__version__ = "0.1.0"
