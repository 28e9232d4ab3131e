"""Flax layers over quantized weights, and the factory that builds them.

What lives here: what every quantized layer shares (`common`: the
`QuantizedWeight` variable, `QuantizedLinear`, the forward), the float
linear in PyTorch orientation (`linear`), the 4-bit layers (`linear4bit`
for NNX, `dense4bit` for linen), `QuantizationConfig` (`quant_config`), the
skip list (`skip`), the linear factory (`factory`) and whole-model
quantization (`quantize_model`). A new layer type is a new file here plus
one branch in `factory`.

May import: `quant`, Flax, jax, numpy. Never models, io, optim or tools.
"""
