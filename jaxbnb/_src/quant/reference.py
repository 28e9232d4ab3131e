"""Pure-jnp implementations of every quantization op: the spec.

These functions reproduce bitsandbytes' CUDA kernels bit for bit (fp32
reciprocal-then-multiply, strict `>` decision trees, the 8-bit binary search
with its tie rules, NaN handling) and are the CPU/TPU path and the oracle the
Pallas kernels are tested against. They take and return flat arrays and do no
argument checking: `jaxbnb._src.quant.ops` validates at the public boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_matmul import round_to_float16

from jaxbnb._src.quant import codebooks

_F32_MAX = np.float32(np.finfo(np.float32).max)


def _blockwise_absmax(flat: jax.Array, blocksize: int) -> jax.Array:
  """fp32 per-block max|x| as CUDA computes it (NaN ignored, -FLT_MAX init)."""
  n = flat.shape[0]
  nb = -(-n // blocksize)
  a = jnp.abs(flat.astype(jnp.float32))
  a = jnp.where(jnp.isnan(a), -_F32_MAX, a)
  a = jnp.pad(a, (0, nb * blocksize - n), constant_values=-_F32_MAX)
  return jnp.max(a.reshape(nb, blocksize), axis=1, initial=-_F32_MAX)


def _scaled(flat: jax.Array, absmax: jax.Array, blocksize: int, pad_to: int):
  """x * (1/absmax) in fp32, padded with zeros to `pad_to` elements."""
  n = flat.shape[0]
  x = jnp.pad(flat.astype(jnp.float32), (0, pad_to - n))
  recip = jnp.float32(1.0) / absmax
  # blocksize is even, so the blocks always cover the padding element.
  return x * jnp.repeat(recip, blocksize)[:pad_to]


def quantize_nf4_codes(x: jax.Array) -> jax.Array:
  """NF4 nibbles of fp32 values already scaled to [-1, 1] (CUDA tree)."""
  t = jnp.asarray(codebooks.NF4_THRESHOLDS)
  # For sorted thresholds the CUDA decision tree returns the number of
  # thresholds strictly below x; NaN compares false everywhere and gives 0.
  return jnp.sum(x[..., None] > t, axis=-1, dtype=jnp.uint8)


def quantize_fp4_codes(x: jax.Array) -> jax.Array:
  """FP4 nibbles of fp32 values already scaled to [-1, 1] (CUDA tree)."""
  t = codebooks.FP4_THRESHOLDS
  sign = jnp.where(x < 0, jnp.uint8(8), jnp.uint8(0))
  a = jnp.abs(x)
  hi = jnp.where(
      a > t["t2"],
      jnp.where(a > t["t3"], 3, 2),
      jnp.where(a > t["t4"], 5, 4),
  )
  lo = jnp.where(
      a > t["t5"],
      jnp.where(a > t["t6"], 7, 6),
      jnp.where(a > t["t7"], 1, 0),
  )
  return (jnp.where(a > t["t1"], hi, lo).astype(jnp.uint8)) + sign


def quantize_4bit(
    flat: jax.Array, blocksize: int, quant_type: str
) -> tuple[jax.Array, jax.Array]:
  """Blockwise 4-bit quantization of a flat array.

  Args:
    flat: 1-D float array of n elements.
    blocksize: elements per absmax block.
    quant_type: "nf4" or "fp4".

  Returns:
    (packed uint8 [(n + 1) // 2], absmax float32 [ceil(n / blocksize)]);
    the even element of each pair is in the high nibble.
  """
  n = flat.shape[0]
  absmax = _blockwise_absmax(flat, blocksize)
  even = n + (n % 2)
  x = _scaled(flat, absmax, blocksize, even)
  if quant_type == "nf4":
    q = quantize_nf4_codes(x)
  else:
    q = quantize_fp4_codes(x)
  q = q.reshape(-1, 2)
  packed = (q[:, 0] << 4) | q[:, 1]
  return packed.astype(jnp.uint8), absmax


def unpack_4bit(packed: jax.Array, n: int) -> jax.Array:
  """Nibble codes of the first n elements of a packed uint8 array."""
  packed = packed.reshape(-1)
  codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)
  return codes[:n]


def dequantize_4bit(
    packed: jax.Array,
    absmax: jax.Array,
    n: int,
    blocksize: int,
    quant_type: str,
    dtype,
) -> jax.Array:
  """out[i] = dtype(code[nibble_i] * absmax[i // blocksize]) (fp32 product)."""
  codes = unpack_4bit(packed, n).astype(jnp.int32)
  table = jnp.asarray(codebooks.code_for(quant_type))
  scale = jnp.repeat(absmax.astype(jnp.float32), blocksize)[:n]
  return (table[codes] * scale).astype(dtype)


def quantize_8bit_codes(x: jax.Array, code: jax.Array) -> jax.Array:
  """Nearest code of fp32 values, exactly as the CUDA `dQuantize<0>`.

  A 7-step binary search over the sorted 256-entry code starting at pivot
  127, then a midpoint comparison with the bracketing neighbour.
  """
  code = code.astype(jnp.float32)
  pivot = jnp.full(x.shape, 127, jnp.int32)
  upper_pivot = jnp.full(x.shape, 255, jnp.int32)
  lower_pivot = jnp.zeros(x.shape, jnp.int32)
  lower = jnp.full(x.shape, -1.0, jnp.float32)
  upper = jnp.full(x.shape, 1.0, jnp.float32)
  val = code[pivot]
  for step in (64, 32, 16, 8, 4, 2, 1):
    go_up = x > val
    lower_pivot = jnp.where(go_up, pivot, lower_pivot)
    lower = jnp.where(go_up, val, lower)
    upper_pivot = jnp.where(go_up, upper_pivot, pivot)
    upper = jnp.where(go_up, upper, val)
    pivot = jnp.where(go_up, pivot + step, pivot - step)
    val = code[pivot]
  upper = jnp.where(upper_pivot == 255, code[255], upper)
  lower = jnp.where(lower_pivot == 0, code[0], lower)
  above = x > val
  mid_up = (upper + val) * jnp.float32(0.5)
  mid_lo = (lower + val) * jnp.float32(0.5)
  result = jnp.where(
      above,
      jnp.where(x > mid_up, upper_pivot, pivot),
      jnp.where(x < mid_lo, lower_pivot, pivot),
  )
  return result.astype(jnp.uint8)


def quantize_blockwise(
    flat: jax.Array, code: jax.Array, blocksize: int, codes_fn=None
) -> tuple[jax.Array, jax.Array]:
  """8-bit blockwise quantization of a flat array with a 256-entry code.

  `codes_fn(x)`: the uint8 codes of the scaled values, when another
  implementation of `quantize_8bit_codes(x, code)` gives them (the lookup
  tables of `pallas_kernels.code_tables`).
  """
  n = flat.shape[0]
  absmax = _blockwise_absmax(flat, blocksize)
  x = _scaled(flat, absmax, blocksize, n)
  if codes_fn is not None:
    return codes_fn(x), absmax
  return quantize_8bit_codes(x, code), absmax


def dequantize_blockwise(
    q: jax.Array, absmax: jax.Array, code: jax.Array, blocksize: int, dtype
) -> jax.Array:
  """out[i] = dtype(code[q_i] * absmax[i // blocksize]) (fp32 product)."""
  n = q.shape[0]
  scale = jnp.repeat(absmax.astype(jnp.float32), blocksize)[:n]
  return (code.astype(jnp.float32)[q.astype(jnp.int32)] * scale).astype(dtype)


def int8_vectorwise_quant(
    a2d: jax.Array, threshold: float
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Row-wise int8 quantization with optional outlier columns (LLM.int8).

  Args:
    a2d: [rows, cols] float array (computed in its own dtype for the
      absmax, as bitsandbytes does in fp16).
    threshold: outlier threshold; 0 disables the decomposition.

  Returns:
    (int8 [rows, cols], float32 row absmax [rows], bool outlier column mask
    [cols] or None when threshold is 0).
  """
  rows = a2d.shape[0]
  absval = jnp.abs(a2d)
  mask = None
  if threshold > 0.0:
    thr = jnp.asarray(threshold, a2d.dtype)
    outliers = absval >= thr
    mask = jnp.any(outliers, axis=0)
    absval = jnp.where(outliers, jnp.zeros_like(absval), absval)
  absval = jnp.where(jnp.isnan(absval), jnp.zeros_like(absval), absval)
  row_absmax = jnp.max(absval, axis=1).astype(jnp.float32)
  scale = jnp.float32(127.0) / row_absmax
  q = jnp.round(a2d.astype(jnp.float32) * scale[:, None])
  q = jnp.where(jnp.isnan(q), 0.0, q)
  q = jnp.clip(q, -128, 127).astype(jnp.int8)
  if mask is not None:
    q = jnp.where(outliers, jnp.int8(0), q)
    if rows > 1:
      q = jnp.where(mask[None, :], jnp.int8(0), q)
  return q, row_absmax, mask


def int8_vectorwise_dequant(q: jax.Array, stats: jax.Array) -> jax.Array:
  """q * stats[:, None] / 127 in fp32, bnb's constant and operation order."""
  stats = stats.astype(jnp.float32).reshape(-1, 1)
  return (q.astype(jnp.float32) * stats) * jnp.float32(7.874015718698502e-3)


def int8_mm_dequant(
    acc: jax.Array,
    row_stats: jax.Array,
    col_stats: jax.Array,
    bias: jax.Array | None = None,
) -> jax.Array:
  """fp16(acc * row * col * 6.200012e-05 + bias), bnb's CUDA epilogue."""
  out = acc.astype(jnp.float32) * row_stats.astype(jnp.float32)[:, None]
  out = out * col_stats.astype(jnp.float32)[None, :]
  out = out * jnp.float32(6.200012e-05)
  if bias is not None:
    # The product rounded, then the add (two roundings, as bitsandbytes and
    # the kernels' epilogue): the barrier keeps XLA from contracting the
    # two into an FMA under jit.
    out = jax.lax.optimization_barrier(out) + bias.astype(jnp.float32)
  # float16 that XLA cannot skip on the GPU (pallas_kernels' helper).
  return round_to_float16(out)


def int8_mm_dequant_any_bias(
    acc: jax.Array,
    row_stats: jax.Array,
    col_stats: jax.Array,
    bias: jax.Array | None = None,
) -> jax.Array:
  """bnb's CUDA `int8_mm_dequant` for a bias of any dtype: a float16 bias
  fused in the epilogue (`int8_mm_dequant`), any other added to the
  float16 result in float32 and rounded again (`out.add_(bias)`)."""
  if bias is None or bias.dtype == jnp.float16:
    return int8_mm_dequant(acc, row_stats, col_stats, bias)
  out = int8_mm_dequant(acc, row_stats, col_stats)
  return round_to_float16(out.astype(jnp.float32) + bias.astype(jnp.float32))
