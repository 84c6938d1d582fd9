"""Optimizer pieces: DGS (dual-way gradient sparsification) and SAMomentum."""
