"""Layouts, folded meshes, the parallel plan and the collectives model code calls.

The layer below `esjax.models`: it imports nothing from the rest of esjax, so models, routing
and the parallel step can all build on it.
"""
