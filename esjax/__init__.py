"""esjax: grow, upcycle and train Mixture-of-Experts language models in JAX.

Entry point: `python -m esjax.main --config=esjax/configs/tiny.py --workdir=DIR`.
"""

__version__ = "0.1.0"
