"""Pallas GPU kernels for jaxbnb (a leaf package: imports jax and numpy only).

Kernels receive their lookup tables (NF4/FP4 codes, the nested 8-bit map)
as array inputs and never import jaxbnb. All but `gemv_4bit_tma`,
`gemv_4bit_lut`, `gemv_4bit_warp_tma` and `gemm_4bit_wgmma` use Pallas'
Triton lowering
(`_backend.py` is the one module that knows it):

* `quantize_4bit`: blockwise NF4/FP4 quantization, bitsandbytes' format.
* `quantize_nested`: double quantization's nested step (`absmax - offset`
  to 8-bit codes per block of 256) in one pass.
* `dequantize_4bit`: dequantization, double-quantized absmax decoded inline.
* `gemv_4bit`: fused dequantize-and-multiply for small M ("reduce", "dot",
  "mma", "warp", "lut", "warp_tma"; "tma" by config).
* `gemv_4bit_tma`: that GEMV on Mosaic GPU (TMA weight stream, inline PTX).
* `gemv_4bit_lut`: the M = 1 GEMV on Mosaic GPU by lookups in a shared
  table of x's products for every byte value (Hopper).
* `gemv_4bit_warp_tma`: the M = 2..16 GEMV on Mosaic GPU (the default at
  8..16 for every weight and group, at 2..7 for long single weights):
  "warp"'s decode and `mma.sync` on `gemv_4bit_lut`'s TMA pipeline
  (Hopper).
* `split_sum`: the K-split partials summed by adds, which XLA fuses into
  their consumer; `add_splits`, a residual add with that sum in one
  Pallas kernel (the decode's `x + mlp(x)` at one row).
* `lowering`: the Mosaic GPU kernels' entry points wrapped so that a
  program calling one on equal shapes (a model's layers) traces and lowers
  it once (`lowered_once`).
* `gemm_4bit_wgmma`: the 4-bit GEMM for M = 64-256 on Hopper (Mosaic GPU):
  the weight decoded by inline PTX into wgmma's register operand.
* `int8_matmul`: the LLM.int8 forward for decoding (M <= 16): int8 weight
  read once, int32 tensor-core product, outlier stream and bitsandbytes'
  epilogue fused.
* `int8_gemm`: the LLM.int8 forward for larger M: tiled int8 GEMM with the
  gathered outlier columns and bitsandbytes' epilogue fused.
* `decode_attention`: one new token per row against the KV cache (RoPE,
  the cache write, scores, online softmax and the value product) in one
  launch, split over the cache for long ones.
* `rms_norm`: RMSNorm of a few rows in one launch (the decode step's
  norms at batch 1, where XLA runs two kernels).
* `optim_8bit`: fused 8-bit blockwise optimizer update (dequantize the
  states, update, requantize with the sign fix) for bitsandbytes' kinds.
* `code_tables`: quantization to a sorted 8-bit map (bitsandbytes' dynamic
  maps) in two lookups instead of its binary search, bit for bit.
* `lut_decode`: the 4-bit codes decoded in registers (byte permutes).
* `warp_mma`: those values fed to a warp-wide tensor-core product
  (`mma.sync`) from registers, for `gemv_4bit`'s "warp" variant.
* `wgmma_decode`: the PTX text of `gemm_4bit_wgmma`'s decode (wgmma's A
  registers, the absmax from scale words or the double-quantized
  statistics).

Each module has `can_use(...)`; jaxbnb falls back to its pure-jnp reference
(`jaxbnb._src.quant.reference`) where a kernel cannot run. Every kernel runs under
`interpret=True` on CPU (tests/kernels/).

The package-level names (`available`, `on_nvidia_gpu`, `match_vma`,
`varying_axes`) are what jaxbnb uses; the modules' other names are private.
"""

from pallas_kernels._backend import available as available
from pallas_kernels._backend import match_vma as match_vma
from pallas_kernels._backend import on_nvidia_gpu as on_nvidia_gpu
from pallas_kernels._backend import varying_axes as varying_axes

__all__ = ["available", "match_vma", "on_nvidia_gpu", "varying_axes"]
