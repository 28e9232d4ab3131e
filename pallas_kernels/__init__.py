"""Pallas GPU kernels for jaxbnb (a leaf package: imports jax only).

Kernels receive their lookup tables (NF4/FP4 codes, the nested 8-bit map)
as array inputs and never import jaxbnb. All use Pallas' Triton lowering
(`_backend.py` is the one module that knows it):

* `quantize_4bit`: blockwise NF4/FP4 quantization, bitsandbytes' format.
* `dequantize_4bit`: dequantization, double-quantized absmax decoded inline.
* `gemv_4bit`: fused dequantize-and-multiply for small M ("reduce", "dot").
* `optim_8bit`: fused 8-bit blockwise optimizer update (dequantize the
  states, update, requantize with the sign fix) for bitsandbytes' kinds.

Each module has `can_use(...)`; jaxbnb falls back to its pure-jnp reference
(`jaxbnb._src.quant.reference`) where a kernel cannot run. Every kernel runs under
`interpret=True` on CPU (tests/kernels/).
"""
