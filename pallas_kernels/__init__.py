"""Pallas GPU kernels for jaxbnb (a leaf package: imports jax only).

Kernels receive their lookup tables (NF4/FP4/dynamic-8-bit codes) as array
inputs and never import jaxbnb. Until a kernel exists for an op, jaxbnb runs
its pure-jnp reference (`jaxbnb._src.reference`) on every backend.
"""
