"""Double quantization's nested step in one kernel: `absmax - offset`
quantized blockwise to an 8-bit map, bitsandbytes' format.

bitsandbytes' double quantization subtracts the mean of the 4-bit absmax
(`offset`) and quantizes the rest in blocks of 256 to its signed dynamic
map. One program here takes `block_rows` such blocks: it subtracts the
offset, takes the fp32 absmax of each block (NaN ignored), scales by the
fp32 reciprocal and finds each code by two lookups (`code_tables`). Given
the absmax's sum and count (`count`), each program also makes the offset
itself, the sum times `mean_factor(count)`, and the first stores it. As XLA
ops the same step read and wrote the absmax three times (the subtraction,
the block maxima, the codes). The result is bit-identical to the reference
(`jaxbnb._src.quant.reference.quantize_blockwise` of `absmax - offset` with
the same lookups, or bitsandbytes' binary search).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _backend
from pallas_kernels import code_tables
from pallas_kernels._backend import pl
from pallas_kernels._backend import pltriton

__all__ = ["can_use", "mean_factor", "quantize_nested"]

_F32_MAX = float(np.finfo(np.float32).max)


def can_use(numel: int, blocksize: int) -> bool:
  """Whether the kernel serves this nested quantization."""
  return (_backend.available() and numel > 0 and blocksize >= 32
          and blocksize & (blocksize - 1) == 0 and blocksize <= 4096)


def mean_factor(count: int) -> np.float32:
  """The float32 `1 / count` a mean multiplies its sum by, as XLA does
  for `jnp.mean` (it turns a division by a constant into that product;
  checked on the CPU by tests/kernels/quantize_nested_test.py)."""
  return np.float32(1) / np.float32(count)


def _kernel(x_ref, off_ref, lo_ref, aux_ref, q_ref, absmax_ref, *out_ref,
            nblocks, numel, block_rows, blocksize, max_skips_nan, count,
            interpret):
  pid = pl.program_id(0)
  rows = pid * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  row_ok = rows < nblocks
  mask = jnp.broadcast_to(row_ok[:, None], (block_rows, blocksize))
  if count is None:
    v = pltriton.load(x_ref, mask=mask, other=0) - off_ref[0]
  else:  # the mean from the sum: every program makes it, the first stores
    off = _backend.mul_rn(jnp.full((block_rows,), off_ref[0], jnp.float32),
                          mean_factor(count), interpret)
    pltriton.store(out_ref[0], off,
                   mask=jnp.full((block_rows,), pid == 0))
    v = pltriton.load(x_ref, mask=mask, other=0) - off[:, None]
  a = jnp.abs(v)
  neg = jnp.float32(-_F32_MAX)
  if not max_skips_nan:  # compiled, `max` is `maxnumf`: it skips NaNs
    a = jnp.where(a != a, neg, a)
  if numel is not None:  # a partial last block: its padding is not data
    idx = rows[:, None] * blocksize + jnp.arange(blocksize, dtype=jnp.int32)
    ok = idx < numel
    a = jnp.where(ok, a, neg)
    v = jnp.where(ok, v, 0.0)
  absmax = jnp.max(a, axis=1)
  if max_skips_nan:  # a block of NaNs: -FLT_MAX, as bitsandbytes
    absmax = jnp.where(absmax != absmax, neg, absmax)
  recip = jnp.float32(1.0) / absmax
  codes = code_tables.quantize_lut(v * recip[:, None], lo_ref, aux_ref)
  pltriton.store(q_ref, codes.astype(jnp.uint8), mask=mask)
  pltriton.store(absmax_ref, absmax, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("blocksize", "block_rows",
                                             "num_warps", "count",
                                             "interpret"))
def quantize_nested(
    absmax: jax.Array,
    offset: jax.Array,
    lo: jax.Array,
    aux: jax.Array,
    *,
    blocksize: int = 256,
    block_rows: int = 2,
    num_warps: int = 2,
    count: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
  """8-bit blockwise codes of `absmax - offset` and their block absmax.

  Args:
    absmax: float32 `[n]`, the 4-bit quantization's absmax.
    offset: float32 scalar subtracted first (bitsandbytes: the mean); with
      `count`, the sum of that many values, of which the kernel takes the
      mean first.
    lo, aux: `code_tables.quantize_tables` of the 8-bit map.
    blocksize: values per nested block (a power of two, 32..4096).
    block_rows: nested blocks per program. Two, with two warps, took
      10.3 us under Nsight Compute for the 4.2 M absmax of 2^28 values on
      the H200, and 4.8 for 14336x4096's; 16 blocks and four warps (the
      earlier default) 12.5 and 8.2 (docs/benchmarks.md, eighteenth
      session).
    num_warps: Triton warps per program.
    count: when given, the offset is `offset * mean_factor(count)`, the
      product rounded once, made inside the kernel and returned: the mean
      from its sum without an XLA kernel of its own (under Nsight Compute
      that kernel took 1.7-2.2 us at every size, docs/benchmarks.md,
      eighteenth session).
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    (uint8 codes `[n]`, float32 absmax `[ceil(n / blocksize)]`), then with
    `count` the float32 scalar offset.

  Examples:
    >>> import numpy as np, jax.numpy as jnp
    >>> from jaxbnb._src.quant import codebooks
    >>> lo, aux = code_tables.quantize_tables(
    ...     codebooks.create_dynamic_map(signed=True))
    >>> q, am = quantize_nested(jnp.linspace(0.5, 1.5, 300), jnp.float32(1),
    ...                         jnp.asarray(lo), jnp.asarray(aux),
    ...                         interpret=True)
    >>> q.shape, am.shape
    ((300,), (2,))
  """
  n = absmax.shape[0]
  nblocks = -(-n // blocksize)
  padded = nblocks * blocksize
  x = absmax.astype(jnp.float32)
  if padded != n:
    x = jnp.pad(x, (0, padded - n))
  x2 = x.reshape(nblocks, blocksize)
  block_rows = max(1, min(block_rows, 1 << (nblocks - 1).bit_length()))
  kernel = functools.partial(
      _kernel, nblocks=nblocks, numel=None if padded == n else n,
      block_rows=block_rows, blocksize=blocksize,
      max_skips_nan=not interpret, count=count, interpret=interpret)
  args = _backend.same_vma(x2, jnp.asarray(offset, jnp.float32).reshape(1),
                           lo, aux)
  spec = pl.BlockSpec((block_rows, blocksize), lambda i: (i, 0))
  out_shape = [_backend.out_struct((nblocks, blocksize), jnp.uint8, x2),
               _backend.out_struct((nblocks,), jnp.float32, x2)]
  out_specs = [pl.BlockSpec((block_rows, blocksize), lambda i: (i, 0)),
               pl.BlockSpec((block_rows,), lambda i: (i,))]
  if count is not None:  # the offset, block_rows copies: program 0's
    out_shape.append(_backend.out_struct((block_rows,), jnp.float32, x2))
    out_specs.append(pl.BlockSpec((block_rows,), lambda i: (0,)))
  outs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(pl.cdiv(nblocks, block_rows),),
      in_specs=[spec, pl.BlockSpec((1,), lambda i: (0,)),
                pl.BlockSpec(lo.shape, lambda i: (0,)),
                pl.BlockSpec(aux.shape, lambda i: (0,))],
      out_specs=tuple(out_specs),
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=2),
      interpret=interpret,
      name="jaxbnb_quantize_nested",
      cost_estimate=pl.CostEstimate(flops=8 * padded, transcendentals=0,
                                    bytes_accessed=5 * padded + 4 * nblocks),
  )(*args)
  q, nested_absmax = outs[0].reshape(-1)[:n], outs[1]
  if count is None:
    return q, nested_absmax
  return q, nested_absmax, outs[2][0]
