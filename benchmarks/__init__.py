"""Throughput and kernel benchmarks; run each as `python -m benchmarks.<name>`, JSON lines out."""

import esjax  # noqa: F401  (first: esjax.jax_start starts JAX before a benchmark imports it)
