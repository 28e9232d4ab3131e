"""bitsandbytes' 8-bit (and 32-bit, paged) optimizers as Optax transformations.

What lives here: the blockwise 8-bit state (`state`), the update rules
(`rules`), the Optax transformations and aliases (`aliases`), paged states
(`paged`), bitsandbytes state-dict interop (`interop`), the bridge to the
fused Pallas update kernel (`kernels`) and the fused in-place step
(`fused`).

May import: `quant` (codebooks, reference, dispatch, validation),
`pallas_kernels`, optax, jax, numpy. Never Flax: an Optax-only user never
imports it.
"""
