"""Throughput and kernel benchmarks; run each as `python -m benchmarks.<name>`, JSON lines out."""
