"""Bridges jaxbnb's ops to the Pallas kernels in `pallas_kernels`.

Each function takes `impl`, decided at trace time by `dispatch.use_kernels`:
None (the pure-jnp reference), "gpu" (compiled kernels) or "interpret"
(Pallas interpret mode). A kernel whose `can_use` rejects the shape falls
back to the reference unless the mode is "pallas", which raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src import codebooks
from jaxbnb._src import dispatch
from jaxbnb._src import reference

# The fused GEMV serves M up to here ("reduce" up to 4, then "dot"); larger
# M dequantizes with the kernel and multiplies with XLA's dot (cuBLAS).
GEMV_MAX_M = 64


def current_impl() -> str | None:
  """"gpu", "interpret" or None for the current kernel mode."""
  use, interpret = dispatch.use_kernels()
  if not use:
    return None
  return "interpret" if interpret else "gpu"


def _fallback(what: str) -> None:
  if dispatch.get_kernel_mode() == "pallas":
    raise NotImplementedError(
        f"kernel mode 'pallas': no Pallas kernel serves {what}; use mode "
        "'auto' to fall back to the reference.")


def _thresholds(quant_type: str) -> tuple[float, ...]:
  if quant_type == "nf4":
    return tuple(float(t) for t in np.asarray(codebooks.NF4_THRESHOLDS))
  t = codebooks.FP4_THRESHOLDS
  return tuple(float(t[f"t{i}"]) for i in range(1, 8))


def _lut(quant_type: str) -> jax.Array:
  return jnp.asarray(codebooks.code_for(quant_type), jnp.float32)


def quantize_4bit_flat(flat, blocksize, quant_type, impl):
  """(packed uint8, absmax f32) of a flat array."""
  if impl is not None:
    from pallas_kernels import quantize_4bit as qk  # pylint: disable=g-import-not-at-top
    if qk.can_use(flat.shape[0], blocksize, flat.dtype):
      return qk.quantize_4bit(
          flat, blocksize=blocksize, quant_type=quant_type,
          thresholds=_thresholds(quant_type),
          interpret=impl == "interpret")
    _fallback(f"quantize_4bit of {flat.shape[0]} {flat.dtype} elements")
  return reference.quantize_4bit(flat, blocksize, quant_type)


def dequantize_4bit_flat(packed, absmax, nested, n, blocksize, quant_type,
                         dtype, nested_blocksize, impl):
  """Flat dequantized array through the kernel.

  `nested` = (nested_absmax, nested code, offset) for a double-quantized
  absmax (then `absmax` holds its uint8 codes), else None.
  """
  from pallas_kernels import dequantize_4bit as dk  # pylint: disable=g-import-not-at-top
  return dk.dequantize_4bit(
      packed, absmax, _lut(quant_type), numel=n, blocksize=blocksize,
      dtype=jnp.dtype(dtype), nested=nested,
      nested_blocksize=nested_blocksize, interpret=impl == "interpret")


def can_dequantize(n, blocksize, dtype) -> bool:
  from pallas_kernels import dequantize_4bit as dk  # pylint: disable=g-import-not-at-top
  return dk.can_use(n, blocksize, dtype)


def gemv(x2d, packed, qs, bias, impl):
  """`x2d @ W.T + bias` through the fused kernel, or None if it cannot."""
  from pallas_kernels import gemv_4bit as gk  # pylint: disable=g-import-not-at-top
  m, k = x2d.shape
  n = qs.shape[0]
  if m > GEMV_MAX_M or not gk.can_use(m, n, k, qs.blocksize, x2d.dtype):
    return None
  nested = None
  if qs.nested:
    nested = (qs.nested_absmax, qs.nested_code, qs.offset)
  return gk.gemv_4bit(
      x2d, packed, qs.absmax, _lut(qs.quant_type), n=n, k=k,
      blocksize=qs.blocksize, nested=nested,
      nested_blocksize=qs.nested_blocksize if qs.nested else 256,
      bias=bias, interpret=impl == "interpret")
