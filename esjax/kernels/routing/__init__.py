"""Pallas top-k routing kernel (`kernel`), its jnp reference and the custom_vjp op (`ops`)."""
