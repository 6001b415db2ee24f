"""POLCA in JAX."""
