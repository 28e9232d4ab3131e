"""Public quantization ops: validate, then run the reference (or a kernel).

Names, defaults and semantics follow `bitsandbytes.functional`.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant import kernels
from jaxbnb._src.quant import reference
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.state import QuantState

__all__ = [
    "check_packed_4bit",
    "double_quantize",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "dequantize_nf4",
    "dequantize_fp4",
    "quantize_blockwise",
    "dequantize_blockwise",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_mm_dequant",
]


def _quantize_4bit_flat(flat, blocksize, quant_type, nested=False):
  return _quantize_4bit_jit(flat, blocksize, quant_type, dispatch.resolve(),
                            nested)


@functools.partial(jax.jit, static_argnames=("blocksize", "quant_type",
                                             "mode", "nested"))
def _quantize_4bit_jit(flat, blocksize, quant_type, mode, nested):
  return kernels.quantize_4bit_flat(flat, blocksize, quant_type, mode,
                                    nested)


@functools.partial(jax.jit, static_argnames=("blocksize",))
def _quantize_blockwise_flat(flat, code, blocksize):
  return reference.quantize_blockwise(flat, code, blocksize)


@functools.partial(jax.jit, static_argnames=("blocksize", "mode", "kernel"))
def _quantize_nested(absmax, total, blocksize, mode, kernel):
  return kernels.quantize_nested_flat(
      absmax, total, codebooks.create_dynamic_map(signed=True), blocksize,
      mode, kernel)


def _double_quantize(absmax: jax.Array, nested_blocksize: int,
                     kernel: bool = True):
  """bnb's nested absmax: offset = mean, 8-bit blockwise codes of the rest
  (two table lookups per value outside the "reference" kernel mode, in one
  kernel pass with `kernel`, which also makes the mean from the sum;
  8-bit blockwise quantization, which has no kernel, passes False)."""
  code = jnp.asarray(codebooks.create_dynamic_map(signed=True))
  q, nested_absmax, offset = _quantize_nested(
      absmax, jnp.sum(absmax), nested_blocksize, dispatch.resolve(), kernel)
  return q, nested_absmax, offset, code


def double_quantize(qs: QuantState) -> QuantState:
  """`qs` (float32 absmax) with its absmax double-quantized as
  `quantize_4bit(..., compress_statistics=True)` does it.

  The same arithmetic on the same absmax array gives the same bytes, so a
  weight quantized piece by piece (its absmax then joined, in order) ends
  up bit-identical to the whole tensor quantized at once.
  """
  if qs.nested:
    raise ValueError("double_quantize: `qs` is already double-quantized.")
  q, nested_absmax, offset, ncode = _double_quantize(qs.absmax, 256)
  return QuantState(absmax=q, offset=offset, nested_absmax=nested_absmax,
                    nested_code=ncode, nested_blocksize=256, code=qs.code,
                    shape=qs.shape, dtype=qs.dtype, blocksize=qs.blocksize,
                    quant_type=qs.quant_type)


def float_absmax(qs: QuantState, first=None) -> jax.Array:
  """fp32 absmax of a (possibly nested) state, as bnb reconstructs it.

  With `first`, `qs.absmax` holds a slice of the codes starting at code
  `first` (a shard's; may be traced), with the whole nested statistics.
  """
  if not qs.nested:
    return qs.absmax.astype(jnp.float32)
  if first is None:
    deq = reference.dequantize_blockwise(
        qs.absmax, qs.nested_absmax, qs.nested_code, qs.nested_blocksize,
        jnp.float32,
    )
  else:  # the same fp32 products, each code's nested absmax by its index
    index = first + jnp.arange(qs.absmax.shape[0], dtype=jnp.int32)
    deq = (qs.nested_code.astype(jnp.float32)[qs.absmax.astype(jnp.int32)]
           * qs.nested_absmax.astype(jnp.float32)[
               index // qs.nested_blocksize])
  # A separate fp32 add after the rounded product, as bnb does: the barrier
  # keeps XLA from contracting the two into an FMA under jit.
  deq = jax.lax.optimization_barrier(deq)
  return deq + qs.offset.astype(jnp.float32)


def to_storage(packed: jax.Array, quant_storage) -> jax.Array:
  """The packed uint8 bytes `packed` reinterpreted as `quant_storage`
  elements, as a `[n, 1]` column (bnb's 4-bit weight layout)."""
  storage = jnp.dtype(quant_storage)
  if storage.name not in validation.QUANT_STORAGE_DTYPES:
    raise ValueError(
        "quantize_4bit: `quant_storage` must be one of "
        f"{validation.QUANT_STORAGE_DTYPES}, got {storage.name}."
    )
  nbytes = packed.shape[0]
  if storage.itemsize == 1:
    out = jax.lax.bitcast_convert_type(packed, storage)
  else:
    if nbytes % storage.itemsize:
      raise ValueError(
          "quantize_4bit: the packed weight has "
          f"{nbytes} bytes, not a multiple of the {storage.name} itemsize "
          f"{storage.itemsize}; use quant_storage=uint8 or an element count "
          f"divisible by {2 * storage.itemsize}."
      )
    out = jax.lax.bitcast_convert_type(
        packed.reshape(-1, storage.itemsize), storage
    )
  return out.reshape(-1, 1)


def from_storage(a: jax.Array) -> jax.Array:
  """The inverse of `to_storage`: the flat uint8 bytes of a packed weight."""
  a = a.reshape(-1)
  if a.dtype == jnp.uint8:
    return a
  if jnp.dtype(a.dtype).itemsize == 1:
    return jax.lax.bitcast_convert_type(a, jnp.uint8)
  return jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(-1)


def quantize_4bit(
    A: jax.Array,  # pylint: disable=invalid-name
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage=jnp.uint8,
) -> tuple[jax.Array, QuantState]:
  """Blockwise 4-bit (NF4/FP4) quantization, bit-exact with bitsandbytes.

  The array is flattened row-major and split into blocks of `blocksize`
  elements (the last block may be partial); each block is scaled by its
  absmax and every element mapped to a 4-bit code, two codes per byte with
  the even element in the high nibble.

  Args:
    A: float32, float16 or bfloat16 array of any shape. A Flax `[in, out]`
      kernel should be passed transposed, as bitsandbytes quantizes the
      PyTorch `[out, in]` weight.
    blocksize: elements per block, one of 32, 64, ..., 4096 (default 64).
    compress_statistics: double quantization: the absmax is stored as 8-bit
      codes of `absmax - mean(absmax)` with a float32 absmax per 256 blocks.
    quant_type: "nf4" or "fp4" (bitsandbytes' default is "fp4").
    quant_storage: dtype the packed bytes are viewed as (a bitcast): uint8,
      int8, float16, bfloat16 or float32.

  Returns:
    `(packed, quant_state)`: packed of shape `[(n + 1) // 2 // itemsize, 1]`
    and dtype `quant_storage`, and the `QuantState`.

  Raises:
    TypeError: if `A` is not a float array.
    ValueError: for an empty `A`, a blocksize or quant_type not allowed, or a
      quant_storage whose itemsize does not divide the packed byte count.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> w = jax.random.normal(jax.random.key(0), (64, 32), jnp.bfloat16)
    >>> packed, qs = F.quantize_4bit(w, quant_type="nf4",
    ...                              compress_statistics=True)
    >>> packed.shape, packed.dtype, qs.absmax.dtype, qs.shape
    ((1024, 1), dtype('uint8'), dtype('uint8'), (64, 32))
    >>> F.dequantize_4bit(packed, qs).dtype
    dtype(bfloat16)

  References:
    Dettmers et al., QLoRA: Efficient Finetuning of Quantized LLMs, 2023.
  """
  fn = "quantize_4bit"
  validation.check_float_array(A, "A", fn)
  blocksize = 64 if blocksize is None else blocksize
  validation.check_blocksize(blocksize, validation.BLOCKSIZES_4BIT, fn=fn)
  validation.check_quant_type(quant_type, fn=fn)
  blocksize = int(blocksize)
  A = jnp.asarray(A)
  packed, absmax = _quantize_4bit_flat(A.reshape(-1), blocksize, quant_type,
                                       bool(compress_statistics))
  code = jnp.asarray(codebooks.get_4bit_type(quant_type))
  common = dict(shape=tuple(A.shape), dtype=validation.dtype_name(A.dtype),
                blocksize=blocksize, quant_type=quant_type, code=code)
  qs = QuantState(absmax=absmax, **common)
  if compress_statistics:
    qs = double_quantize(qs)
  return to_storage(packed, quant_storage), qs


def quantize_nf4(A, blocksize=None, compress_statistics=False,  # pylint: disable=invalid-name
                 quant_storage=jnp.uint8):
  """`quantize_4bit` with `quant_type="nf4"`."""
  return quantize_4bit(A, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, blocksize=None, compress_statistics=False,  # pylint: disable=invalid-name
                 quant_storage=jnp.uint8):
  """`quantize_4bit` with `quant_type="fp4"`."""
  return quantize_4bit(A, blocksize, compress_statistics, "fp4", quant_storage)


def _check_tables(qs: QuantState, code_size: int, fn: str,
                  code_name: str = "quant_state.code") -> None:
  """`qs.code` has `code_size` entries; a nested state's nested absmax
  covers every block (a row shard may keep more) and its code is 256."""
  got = math.prod(jnp.shape(qs.code))
  if got != code_size:
    raise ValueError(f"{fn}: {code_name} must have {code_size} entries, "
                     f"got shape {tuple(jnp.shape(qs.code))}.")
  if not qs.nested:
    return
  nb = math.prod(jnp.shape(qs.absmax))
  nnb = -(-nb // qs.nested_blocksize)
  got = math.prod(jnp.shape(qs.nested_absmax))
  if got < nnb:
    raise ValueError(
        f"{fn}: quant_state.nested_absmax has {got} entries, expected "
        f"ceil({nb} / nested_blocksize {qs.nested_blocksize}) = {nnb}."
    )
  if qs.nested_code is None or math.prod(jnp.shape(qs.nested_code)) != 256:
    raise ValueError(
        f"{fn}: quant_state.nested_code must have 256 entries, got "
        f"{None if qs.nested_code is None else tuple(qs.nested_code.shape)}."
    )


def _check_packed(A, fn, name="A"):  # pylint: disable=invalid-name
  if not hasattr(A, "dtype"):
    raise TypeError(f"{fn}: `{name}` must be an array, got "
                    f"{type(A).__name__}.")
  if validation.dtype_name(A.dtype) not in validation.QUANT_STORAGE_DTYPES:
    raise TypeError(
        f"{fn}: packed `{name}` must have a quant_storage dtype "
        f"{validation.QUANT_STORAGE_DTYPES}, got {validation.dtype_name(A.dtype)}."
    )


def dequantize_4bit(
    A: jax.Array,  # pylint: disable=invalid-name
    quant_state: QuantState | None = None,
    absmax: jax.Array | None = None,
    blocksize: int | None = None,
    quant_type: str = "fp4",
    *,
    shape: tuple[int, ...] | None = None,
    dtype=None,
) -> jax.Array:
  """Dequantizes packed 4-bit codes: `dtype(code[q] * absmax[block])`.

  Args:
    A: packed bytes from `quantize_4bit` (any `quant_storage` dtype).
    quant_state: the state from `quantize_4bit`. If None, `absmax`, `shape`
      and `dtype` must be given (bitsandbytes takes them from `out`).
    absmax: float32 per-block absmax, used only without `quant_state`.
    blocksize: used only without `quant_state` (default 64).
    quant_type: used only without `quant_state`.
    shape: output shape, used only without `quant_state`.
    dtype: output dtype (float32, float16 or bfloat16), used only without
      `quant_state`.

  Returns:
    The array of `quant_state.shape` in `quant_state.dtype`.

  Raises:
    TypeError: if `A` is not of a quant_storage dtype, `quant_state` is not
      a `QuantState`, or the output dtype is not a float dtype.
    ValueError: if neither a state nor absmax/shape/dtype are given, or the
      packed size or the absmax length does not match the shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> packed, qs = F.quantize_4bit(jnp.linspace(-1, 1, 8), quant_type="nf4")
    >>> F.dequantize_4bit(packed, qs)
    Array([-1.        , -0.6961928 , -0.3949175 , -0.18477343,  0.1609302 ,
            0.44070983,  0.72295684,  1.        ], dtype=float32)
  """
  fn = "dequantize_4bit"
  _check_packed(A, fn)
  if quant_state is None:
    if absmax is None or shape is None or dtype is None:
      raise ValueError(
          f"{fn}: without `quant_state`, `absmax`, `shape` and `dtype` are "
          "all required."
      )
    blocksize = 64 if blocksize is None else blocksize
    validation.check_blocksize(blocksize, validation.BLOCKSIZES_4BIT, fn=fn)
    validation.check_quant_type(quant_type, fn=fn)
    quant_state = QuantState(
        absmax=jnp.asarray(absmax, jnp.float32),
        code=jnp.asarray(codebooks.get_4bit_type(quant_type)),
        shape=tuple(shape),
        dtype=validation.float_dtype_name(dtype, "dtype", fn),
        blocksize=blocksize, quant_type=quant_type)
  elif not isinstance(quant_state, QuantState):
    raise TypeError(f"{fn}: `quant_state` must be a QuantState, got "
                    f"{type(quant_state).__name__}.")
  qs = quant_state
  validation.check_quant_type(qs.quant_type, "quant_state.quant_type", fn)
  validation.float_dtype_name(qs.dtype, "quant_state.dtype", fn)
  check_packed_4bit(A, qs, fn)
  out = dequantize_flat(from_storage(jnp.asarray(A)), qs)
  return out.reshape(qs.shape)


def check_packed_4bit(A, qs: QuantState, fn: str,  # pylint: disable=invalid-name
                      name: str = "A") -> None:
  """Packed 4-bit bytes `A` fit the state `qs`: their count, the absmax
  length and the code tables, each error naming the argument.

  Examples:
    >>> packed, qs = quantize_4bit(jnp.ones((4, 64)), quant_type="nf4")
    >>> check_packed_4bit(packed[:-1], qs, "f")
    Traceback (most recent call last):
    ...
    ValueError: f: packed `A` has 127 bytes, expected (n + 1) // 2 = 128 for shape (4, 64).
  """
  _check_packed(A, fn, name)
  n = qs.numel
  nbytes = A.size * jnp.dtype(A.dtype).itemsize
  if nbytes != (n + 1) // 2:
    raise ValueError(
        f"{fn}: packed `{name}` has {nbytes} bytes, expected "
        f"(n + 1) // 2 = {(n + 1) // 2} for shape {qs.shape}."
    )
  if qs.absmax.shape[0] != -(-n // qs.blocksize):
    raise ValueError(
        f"{fn}: absmax has {qs.absmax.shape[0]} entries, expected "
        f"ceil(n / blocksize) = {-(-n // qs.blocksize)} for shape {qs.shape} "
        f"and blocksize {qs.blocksize}."
    )
  _check_tables(qs, 16, fn)


def dequantize_flat(packed: jax.Array, qs: QuantState, dtype=None,
                    mode: str | None = None) -> jax.Array:
  """The flat dequantized array of `qs.numel` elements (kernel or reference).

  `mode=None` resolves the current kernel mode (`dispatch.resolve`).
  """
  if mode is None:
    mode = dispatch.resolve()
  dtype = jnp.dtype(qs.dtype if dtype is None else dtype).name
  n = qs.numel
  if mode != "reference" and kernels.can_dequantize(n, qs.blocksize, dtype):
    return _dequantize_kernel_jit(packed, qs.absmax, kernels.nested_of(qs),
                                  n, qs.blocksize, qs.quant_type, dtype,
                                  qs.nested_blocksize, mode)
  if mode != "reference":
    dispatch.no_kernel(f"dequantize_4bit of {n} elements")
  return _dequantize_4bit_jit(packed, float_absmax(qs), n, qs.blocksize,
                              qs.quant_type, dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _dequantize_4bit_jit(packed, absmax, n, blocksize, quant_type, dtype):
  return reference.dequantize_4bit(packed, absmax, n, blocksize, quant_type,
                                   jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _dequantize_kernel_jit(packed, absmax, nested, n, blocksize, quant_type,
                           dtype, nested_blocksize, mode):
  return kernels.dequantize_4bit_flat(packed, absmax, nested, n, blocksize,
                                      quant_type, dtype, nested_blocksize,
                                      mode)


def dequantize_nf4(A, quant_state=None, absmax=None, blocksize=None, **kw):  # pylint: disable=invalid-name
  """`dequantize_4bit` with `quant_type="nf4"`."""
  return dequantize_4bit(A, quant_state, absmax, blocksize, "nf4", **kw)


def dequantize_fp4(A, quant_state=None, absmax=None, blocksize=None, **kw):  # pylint: disable=invalid-name
  """`dequantize_4bit` with `quant_type="fp4"`."""
  return dequantize_4bit(A, quant_state, absmax, blocksize, "fp4", **kw)


def quantize_blockwise(
    A: jax.Array,  # pylint: disable=invalid-name
    code: jax.Array | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[jax.Array, QuantState]:
  """8-bit blockwise quantization with a 256-entry code (bitsandbytes').

  Each block of `blocksize` elements of the flattened array is scaled by its
  absmax and mapped to the nearest code with bitsandbytes' binary search.

  Args:
    A: float32, float16 or bfloat16 array.
    code: 256 sorted float32 values; default the signed dynamic map.
    blocksize: one of 64, 128, ..., 4096.
    nested: also quantize the absmax (offset = mean, same blocksize).

  Returns:
    `(q, quant_state)`: uint8 codes of A's shape and the `QuantState`.

  Raises:
    TypeError: if `A` is not a float array.
    ValueError: for an empty `A`, a bad blocksize or a code that is not 256
      values.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> q, qs = F.quantize_blockwise(jnp.linspace(-1, 1, 300), blocksize=256)
    >>> q.dtype, qs.absmax.shape
    (dtype('uint8'), (2,))
    >>> float(abs(F.dequantize_blockwise(q, qs) - jnp.linspace(-1, 1, 300)).max()) < 0.01
    True
  """
  fn = "quantize_blockwise"
  validation.check_float_array(A, "A", fn)
  validation.check_blocksize(blocksize, validation.BLOCKSIZES_8BIT, fn=fn)
  blocksize = int(blocksize)
  A = jnp.asarray(A)
  if code is None:
    code = codebooks.create_dynamic_map(signed=True)
  code = jnp.asarray(code, jnp.float32)
  if code.shape != (256,):
    raise ValueError(f"{fn}: `code` must have shape (256,), got {code.shape}.")
  q, absmax = _quantize_blockwise_flat(A.reshape(-1), code, blocksize)
  common = dict(shape=tuple(A.shape), dtype=validation.dtype_name(A.dtype),
                blocksize=blocksize, code=code)
  if nested:
    q2, nested_absmax, offset, ncode = _double_quantize(absmax, blocksize,
                                                        kernel=False)
    qs = QuantState(absmax=q2, offset=offset, nested_absmax=nested_absmax,
                    nested_code=ncode, nested_blocksize=blocksize, **common)
  else:
    qs = QuantState(absmax=absmax, **common)
  return q.reshape(A.shape), qs


def dequantize_blockwise(
    A: jax.Array,  # pylint: disable=invalid-name
    quant_state: QuantState | None = None,
    absmax: jax.Array | None = None,
    code: jax.Array | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> jax.Array:
  """Dequantizes 8-bit blockwise codes: `dtype(code[q] * absmax[block])`.

  Args:
    A: uint8 codes.
    quant_state: the state from `quantize_blockwise`; if None, `absmax` is
      required and the output is float32 (as bitsandbytes).
    absmax: float32 per-block absmax (without `quant_state`).
    code: the 256-entry code (without `quant_state`; default dynamic map).
    blocksize: the blocksize (without `quant_state`).
    nested: unused without a state (kept for bitsandbytes' signature).

  Returns:
    The dequantized array of A's shape, in `quant_state.dtype` (float32
    without a state).

  Raises:
    TypeError: if `A` is not uint8 or `quant_state` not a `QuantState`.
    ValueError: if neither a state nor absmax is given, the absmax does not
      have one entry per block (`ceil(A.size / blocksize)`) or the code is
      not 256 values.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> q, qs = F.quantize_blockwise(jnp.ones((4, 64)), blocksize=64)
    >>> F.dequantize_blockwise(q, qs)[0, :3]
    Array([1., 1., 1.], dtype=float32)
  """
  del nested
  fn = "dequantize_blockwise"
  if not hasattr(A, "dtype") or A.dtype != jnp.uint8:
    raise TypeError(
        f"{fn}: `A` must be a uint8 array, got "
        f"{getattr(A, 'dtype', type(A).__name__)}."
    )
  if quant_state is None:
    if absmax is None:
      raise ValueError(f"{fn}: requires either `quant_state` or `absmax`.")
    validation.check_blocksize(blocksize, validation.BLOCKSIZES_8BIT, fn=fn)
    if code is None:
      code = codebooks.create_dynamic_map(signed=True)
    quant_state = QuantState(absmax=jnp.asarray(absmax, jnp.float32),
                             code=jnp.asarray(code, jnp.float32),
                             shape=tuple(A.shape), dtype="float32",
                             blocksize=blocksize)
    what = "`absmax`", "`code`"
  elif not isinstance(quant_state, QuantState):
    raise TypeError(f"{fn}: `quant_state` must be a QuantState, got "
                    f"{type(quant_state).__name__}.")
  else:
    what = "quant_state.absmax", "quant_state.code"
    validation.float_dtype_name(quant_state.dtype, "quant_state.dtype", fn)
  qs = quant_state
  if qs.quant_type in validation.QUANT_TYPES:
    raise ValueError(
        f"{fn}: `quant_state` is a 4-bit ({qs.quant_type}) state from "
        "quantize_4bit; dequantize its codes with dequantize_4bit.")
  nb = -(-A.size // qs.blocksize)
  if math.prod(jnp.shape(qs.absmax)) != nb:
    raise ValueError(
        f"{fn}: {what[0]} has {math.prod(jnp.shape(qs.absmax))} entries, "
        f"expected ceil(n / blocksize) = ceil({A.size} / {qs.blocksize}) = "
        f"{nb} for {A.size} codes."
    )
  _check_tables(qs, 256, fn, what[1])
  A = jnp.asarray(A)
  out = reference.dequantize_blockwise(
      A.reshape(-1), float_absmax(qs), qs.code, qs.blocksize,
      jnp.dtype(qs.dtype))
  return out.reshape(A.shape)


def int8_vectorwise_quant(
    A: jax.Array, threshold: float = 0.0  # pylint: disable=invalid-name
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Row-wise absmax int8 quantization (LLM.int8), as bitsandbytes' CUDA op.

  `CA[r, j] = rint(A[r, j] * 127 / absmax_r)`. With `threshold > 0`,
  elements with `|A| >= threshold` are outliers: they are excluded from the
  row absmax and, when there is more than one row, their whole columns are
  zeroed in `CA` (they go through the fp16 outlier matmul instead).

  Args:
    A: float array `[..., cols]` (bitsandbytes' CUDA path requires float16;
      other float dtypes are accepted and their absmax taken in that dtype).
    threshold: outlier threshold; 0 disables the decomposition.

  Returns:
    `(CA, row_stats, outlier_cols)`: int8 of A's shape, float32 row absmax of
    shape `[rows]`, and the sorted int32 indices of outlier columns (None
    when `threshold == 0`). Under `jax.jit` with `threshold > 0` use
    `int8_vectorwise_quant_mask`, which returns a boolean column mask.

  Raises:
    TypeError: if `A` is not a float array.
    ValueError: for a negative threshold or an empty `A`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> ca, stats, cols = F.int8_vectorwise_quant(
    ...     jnp.asarray([[1.0, -2.0, 8.0], [0.5, 1.0, 0.0]], jnp.float16), 6.0)
    >>> ca, stats, cols
    (Array([[  64, -127,    0],
           [  64,  127,    0]], dtype=int8), Array([2., 1.], dtype=float32), Array([2], dtype=int32))
  """
  ca, stats, mask = int8_vectorwise_quant_mask(A, threshold)
  if mask is None:
    return ca, stats, None
  if isinstance(mask, jax.core.Tracer):
    raise NotImplementedError(
        "int8_vectorwise_quant: outlier column indices have a data-dependent "
        "length and cannot be traced; use int8_vectorwise_quant_mask under "
        "jax.jit."
    )
  return ca, stats, jnp.asarray(np.flatnonzero(np.asarray(mask)), jnp.int32)


def int8_vectorwise_quant_mask(A: jax.Array, threshold: float = 0.0):  # pylint: disable=invalid-name
  """`int8_vectorwise_quant` with a boolean outlier-column mask (jittable).

  Returns:
    `(CA, row_stats, mask)` with `mask` a bool `[cols]` array, or None when
    `threshold == 0`.
  """
  fn = "int8_vectorwise_quant"
  validation.check_float_array(A, "A", fn)
  if A.ndim < 1:
    raise ValueError(f"{fn}: `A` must have at least one dimension (rows of "
                     f"columns), got a scalar of shape {tuple(A.shape)}.")
  threshold = validation.check_threshold(threshold, fn)
  A = jnp.asarray(A)
  a2d = A.reshape(-1, A.shape[-1])
  ca, stats, mask = reference.int8_vectorwise_quant(a2d, threshold)
  return ca.reshape(A.shape), stats, mask


def int8_vectorwise_dequant(A: jax.Array, stats: jax.Array) -> jax.Array:  # pylint: disable=invalid-name
  """`A * stats[:, None] / 127` in float32 (bitsandbytes' constant).

  Args:
    A: int8 `[rows, cols]` (or `[..., cols]`).
    stats: float32 row absmax, one per row.

  Returns:
    float32 array of A's shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> F.int8_vectorwise_dequant(jnp.asarray([[127, -64]], jnp.int8),
    ...                           jnp.asarray([2.0]))
    Array([[ 2.      , -1.007874]], dtype=float32)
  """
  fn = "int8_vectorwise_dequant"
  if not hasattr(A, "dtype") or A.dtype != jnp.int8:
    raise TypeError(
        f"{fn}: `A` must be int8, got {getattr(A, 'dtype', type(A).__name__)}."
    )
  A = jnp.asarray(A)
  rows = A.size // A.shape[-1]
  stats = jnp.asarray(stats)
  if stats.size != rows:
    raise ValueError(
        f"{fn}: `stats` must have one entry per row ({rows}), got shape "
        f"{stats.shape}."
    )
  out = reference.int8_vectorwise_dequant(A.reshape(rows, -1), stats)
  return out.reshape(A.shape)


def int8_mm_dequant(
    A: jax.Array,  # pylint: disable=invalid-name
    row_stats: jax.Array,
    col_stats: jax.Array,
    bias: jax.Array | None = None,
) -> jax.Array:
  """float16 `A * row * col / 127**2 + bias` of an int32 int8-GEMM result.

  Args:
    A: int32 `[rows, cols]` accumulator of `CA @ CB.T`.
    row_stats: float32 `[rows]` (activation absmax).
    col_stats: float32 `[cols]` (weight `SCB`).
    bias: optional `[cols]`: a float16 bias is added before the float16
      rounding (fused, as bitsandbytes' CUDA kernel), any other dtype to
      the float16 result (bitsandbytes' `out.add_(bias)`).

  Returns:
    float16 `[rows, cols]`.

  Raises:
    TypeError: `A` is not int32.
    ValueError: `row_stats` / `col_stats` without one entry per row /
      column of `A`, or a `bias` that is not `[cols]`.
  """
  fn = "int8_mm_dequant"
  if not hasattr(A, "dtype") or A.dtype != jnp.int32:
    raise TypeError(
        f"{fn}: `A` must be int32, got {getattr(A, 'dtype', type(A).__name__)}."
    )
  A = jnp.asarray(A)
  if A.ndim < 1:
    raise ValueError(f"{fn}: `A` must be [rows, cols], got a scalar.")
  a2d = A.reshape(-1, A.shape[-1])
  rows, cols = a2d.shape
  row_stats, col_stats = jnp.asarray(row_stats), jnp.asarray(col_stats)
  for name, stats, want, what in (("row_stats", row_stats, rows, "row"),
                                  ("col_stats", col_stats, cols, "column")):
    if stats.size != want:
      raise ValueError(f"{fn}: `{name}` must have one entry per {what} of "
                       f"`A` ({want}), got shape {tuple(stats.shape)}.")
  if bias is not None and tuple(jnp.shape(bias)) != (cols,):
    raise ValueError(f"{fn}: `bias` must have shape ({cols},) (one entry per "
                     f"column of `A`), got {tuple(jnp.shape(bias))}.")
  out = reference.int8_mm_dequant_any_bias(
      a2d, row_stats.reshape(-1), col_stats.reshape(-1),
      None if bias is None else jnp.asarray(bias))
  return out.reshape(A.shape)


def deprecated_kn(quant_state: QuantState, k: int) -> bool:
  """Whether a `[N, K]` matmul got a weight quantized as `[K, N]` (warns).

  bitsandbytes accepts such a weight with a DeprecationWarning and uses its
  transpose; `matmul_4bit` does the same.
  """
  n_, k_ = quant_state.shape
  if k == n_ and k != k_:
    warnings.warn(
        "matmul_4bit: the weight was quantized from a [K, N] array "
        f"(quant_state.shape={list(quant_state.shape)}); quantize the "
        "[N, K] (out_features, in_features) weight instead.",
        DeprecationWarning, stacklevel=3)
    return True
  return False
