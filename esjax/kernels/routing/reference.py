"""The jnp reference the kernel is tested against: `esjax.routing.router.route` itself.

Kept as a name here so kernel tests and benchmarks read `reference.route`; the math lives
in one place (`router.route` = top-k selection + `router.routing_from_indices`).
"""

from esjax.routing.router import Routing, route, routing_from_indices

__all__ = ["Routing", "route", "routing_from_indices"]
