"""Asynchronous parameter-server training on Ray (DGS, one-way sparsification, dense ASGD)."""
