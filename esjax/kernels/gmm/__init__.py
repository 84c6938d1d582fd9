"""Grouped matmuls over routed rows on Hopper (`kernel`) and the grouped SwiGLU on them (`ops`)."""
