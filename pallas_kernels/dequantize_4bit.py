"""Blockwise 4-bit (NF4/FP4) dequantization kernel, bitsandbytes' format.

`out[i] = dtype(code[nibble_i] * absmax[i // blocksize])` with the product
in fp32, the even element in the high nibble. A double-quantized absmax
(uint8 codes, an fp32 absmax per 256 codes and an fp32 offset) is decoded
inside the kernel, so the whole op is one pass over the packed bytes.
Bit-identical to `jaxbnb._src.quant.reference.dequantize_4bit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _backend
from pallas_kernels._backend import pl
from pallas_kernels._backend import pltriton
from pallas_kernels._backend import zero_index, one_index

__all__ = ["can_use", "dequantize_4bit", "decode_absmax"]


def can_use(numel: int, blocksize: int, dtype) -> bool:
  """Whether the kernel serves this dequantization (else the reference)."""
  return (_backend.available() and numel > 0
          and blocksize >= 32 and blocksize & (blocksize - 1) == 0
          and blocksize <= 4096
          and jnp.dtype(dtype) in (jnp.float32, jnp.float16, jnp.bfloat16))


def decode_absmax(codes, rows, nested_ref, code2_ref, offset, nested_blocksize,
                  nested_len, interpret):
  """fp32 absmax of double-quantized blocks `rows` (inside a kernel)."""
  if nested_blocksize & (nested_blocksize - 1) == 0:  # a shift, not a division
    grp = rows >> (nested_blocksize.bit_length() - 1)
  else:
    grp = rows // nested_blocksize
  grp = jnp.minimum(grp, nested_len - 1)
  scale = code2_ref[codes.astype(jnp.int32)] * nested_ref[grp]
  return _backend.add_rn(scale, offset, interpret)


def _kernel(*refs, nblocks, block_rows, half, dq, nested_blocksize,
            nested_len, out_mode, dtype, interpret):
  if dq:
    packed_ref, am_ref, nested_ref, code2_ref, off_ref, lut_ref, out_ref = refs
  else:
    packed_ref, am_ref, lut_ref, out_ref = refs
  pid = pl.program_id(0)
  rows = pid * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  row_ok = rows < nblocks
  mask = jnp.broadcast_to(row_ok[:, None], (block_rows, half))
  b = pltriton.load(packed_ref, mask=mask, other=0).astype(jnp.int32)
  if dq:
    codes = pltriton.load(am_ref, mask=row_ok, other=0)
    absmax = decode_absmax(codes, rows, nested_ref, code2_ref, off_ref[0],
                           nested_blocksize, nested_len, interpret)
  else:
    absmax = pltriton.load(am_ref, mask=row_ok, other=0)
  vh = (lut_ref[b >> 4] * absmax[:, None]).astype(dtype)
  vl = (lut_ref[b & 15] * absmax[:, None]).astype(dtype)
  if out_mode == "u32":  # two 16-bit results per uint32 word
    hb = jax.lax.bitcast_convert_type(vh, jnp.uint16).astype(jnp.uint32)
    lb = jax.lax.bitcast_convert_type(vl, jnp.uint16).astype(jnp.uint32)
    pltriton.store(out_ref, (lb << np.uint32(16)) | hb, mask=mask)
  elif out_mode == "join":
    mask3 = jnp.broadcast_to(mask[:, :, None], (block_rows, half, 2))
    pltriton.store(out_ref, jnp.stack([vh, vl], axis=-1), mask=mask3)
  else:
    pltriton.store(out_ref.at[:, :, zero_index()], vh, mask=mask)
    pltriton.store(out_ref.at[:, :, one_index()], vl, mask=mask)


@functools.partial(
    jax.jit,
    static_argnames=("numel", "blocksize", "dtype", "nested_blocksize",
                     "block_rows", "num_warps", "out_mode", "interpret"))
def dequantize_4bit(
    packed: jax.Array,
    absmax: jax.Array,
    lut: jax.Array,
    *,
    numel: int,
    blocksize: int,
    dtype,
    nested: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    nested_blocksize: int = 256,
    block_rows: int | None = None,
    num_warps: int = 4,
    out_mode: str | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Dequantizes packed 4-bit codes to a flat array of `numel` elements.

  Args:
    packed: uint8 [(numel + 1) // 2], even element in the high nibble.
    absmax: float32 [nblocks], or uint8 codes [nblocks] when `nested`.
    lut: float32 [16], the 4-bit code table.
    numel: number of elements.
    blocksize: elements per absmax block (power of two, 32..4096).
    dtype: output dtype.
    nested: for double quantization, (nested_absmax float32
      [ceil(nblocks / nested_blocksize)], nested code float32 [256],
      offset float32 scalar).
    nested_blocksize: absmax codes per nested absmax.
    block_rows: quantization blocks per program (power of two).
    num_warps: Triton warps per program.
    out_mode: how results are written: "u32" (two 16-bit values per word,
      the default for 16-bit dtypes), "join" (interleaved in registers) or
      "strided" (even and odd halves as two strided stores).
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    The dequantized flat array, [numel] in `dtype`.
  """
  nblocks = -(-numel // blocksize)
  half = blocksize // 2
  if block_rows is None:
    block_rows = max(1, min(64, 2048 // blocksize))
  nbytes = nblocks * half
  if packed.shape[0] != nbytes:
    packed = jnp.pad(packed, (0, nbytes - packed.shape[0]))
  p2 = packed.reshape(nblocks, half)
  grid = (pl.cdiv(nblocks, block_rows),)
  full = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
  dq = nested is not None
  args = [p2, absmax]
  specs = [pl.BlockSpec((block_rows, half), lambda i: (i, 0)),
           pl.BlockSpec((block_rows,), lambda i: (i,))]
  nested_len = 0
  if dq:
    nested_absmax, code2, offset = nested
    offset = jnp.asarray(offset, jnp.float32).reshape(1)
    nested_len = nested_absmax.shape[0]
    extra = [nested_absmax.astype(jnp.float32), code2.astype(jnp.float32),
             offset]
    args += extra
    specs += [full(a) for a in extra]
  lut = lut.astype(jnp.float32)
  args.append(lut)
  specs.append(full(lut))
  args = _backend.same_vma(*args)
  dtype = jnp.dtype(dtype)
  if out_mode is None:
    out_mode = "u32" if dtype.itemsize == 2 else "join"
  if out_mode == "u32" and dtype.itemsize != 2:
    raise ValueError(f"out_mode='u32' needs a 16-bit dtype, got {dtype}.")
  kernel = functools.partial(
      _kernel, nblocks=nblocks, block_rows=block_rows, half=half, dq=dq,
      nested_blocksize=nested_blocksize, nested_len=nested_len,
      out_mode=out_mode, dtype=dtype, interpret=interpret)
  if out_mode == "u32":
    out_shape = _backend.out_struct((nblocks, half), jnp.uint32, *args)
    out_spec = pl.BlockSpec((block_rows, half), lambda i: (i, 0))
  else:
    out_shape = _backend.out_struct((nblocks, half, 2), dtype, *args)
    out_spec = pl.BlockSpec((block_rows, half, 2), lambda i: (i, 0, 0))
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=specs,
      out_specs=out_spec,
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=2),
      interpret=interpret,
      name="jaxbnb_dequantize_4bit",
      cost_estimate=pl.CostEstimate(
          flops=2 * nblocks * blocksize, transcendentals=0,
          bytes_accessed=nbytes + nblocks * blocksize * dtype.itemsize
          + nblocks * (1 if dq else 4)),
  )(*args)
  if out_mode == "u32":
    out = jax.lax.bitcast_convert_type(out, dtype)
  out = out.reshape(-1)
  if out.shape[0] != numel:
    out = out[:numel]
  return out
