"""The numerics: bitsandbytes' formats, bit for bit, and the kernel bridge.

What lives here: codebooks (`codebooks`), validation of user arguments
(`validation`), `QuantState` (`state`), the pure-jnp reference that is the
spec (`reference`), the public ops (`ops`), the matmuls with their custom
VJPs (`matmul`), the quantized-weight interface and its formats
(`weights`: `QuantizedArray`, `Params4bit`, `Int8Params`), the kernel mode
(`dispatch`) and the bridge that calls `pallas_kernels` (`kernels`).

May import: jax, numpy, ml_dtypes and `pallas_kernels`. Never Flax, optax,
or any other jaxbnb subpackage.
"""
