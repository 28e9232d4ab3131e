"""jaxbnb's implementation; users import the public modules instead.

Subpackages, from the bottom up (each imports only the ones below it; see
docs/architecture.md):

* `quant/`: the numerics: codebooks, `QuantState`, the quantized-weight
  interface (`QuantizedArray`: `Params4bit`, `Int8Params`), the pure-jnp
  reference, ops, matmuls, kernel dispatch and the bridge to
  `pallas_kernels`. Imports jax, numpy and `pallas_kernels` only.
* `optim/`: the 8-bit Optax optimizers. Imports `quant` and optax, never
  Flax.
* `layers/`: Flax layers over any `QuantizedArray`, the linear factory,
  `QuantizationConfig`, `quantize_params`. Imports `quant` and Flax.
* `models/`: Llama-family models, KV cache, generation, perplexity. Imports
  `layers` and `quant`.
* `io/`: checkpoints in and out (safetensors, bitsandbytes, GGUF, torch
  `.bin`, orbax), tokenizers, memory estimates. Imports `models`, `layers`,
  `quant`.
* `train/`: LoRA/QLoRA fine-tuning (data, loss, step, checkpoints, loop).
  Imports `io`, `models`, `layers`, `optim`, `quant`.
* `tools/`: the `jaxbnb` command line, the demo and the benchmarks. May
  import anything, the public modules included.
"""
