"""LLM.int8 decode activations quantized in one Pallas program.

The decode kernel's "limbs" stream (`int8_matmul`) takes, for M <= 16 rows
of activations `x [m, k]` and a threshold > 0:

* bitsandbytes' row-wise quantization of `x` cast to float16
  (`int8_vectorwise_quant`): the row absmax without the outlier elements
  (`|x| >= threshold`), `CA = round(x * 127 / absmax)` clipped to int8,
  zero at the outlier elements and (for more than one row) in every outlier
  column;
* the outlier activations (`x` in the outlier columns, zero elsewhere) as
  three int8 digits and a power-of-two row scale (`outlier_limbs`).

XLA computes these in several small kernels (a row and a column reduction
cannot share one fusion, and the digits need a second row reduction); here
one program reads `x` twice (the reductions, then the codes) and writes
the decode kernel's operand `[CA; hi; mid; lo]` (each block `limbs` rows,
`K` padded to `kp`) with the row absmax and the digit scales. The results
are bit-identical to `jaxbnb._src.quant.reference.int8_vectorwise_quant`
and `int8_matmul.outlier_limbs` (IEEE division and round-to-nearest-even
through PTX, not Triton's approximate `/`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _backend
from pallas_kernels._backend import pl

__all__ = ["limb_exponent", "quantize_decode_activations"]


def limb_exponent(amax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(2**e, 2**-e, finite) for a float32 row absmax: e = max(E - 20, -126)
  where `amax < 2**E` (E from the float's exponent bits; 2**-126 for zero
  and subnormal values), so `|x| * 2**-e < 2**20`. Plain jnp (both the
  reference and the kernel use it)."""
  bits = jax.lax.bitcast_convert_type(amax, jnp.int32)
  biased = (bits >> 23) & 255
  e = jnp.maximum(biased - 146, -126)
  pow2 = jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)
  inv = jax.lax.bitcast_convert_type((127 - e) << 23, jnp.float32)
  return pow2, inv, biased < 255


def _kernel(x_ref, a_ref, row_ref, xscale_ref, *, m, k, limbs, chunk, chunks,
            threshold, interpret):
  rows = jnp.arange(limbs, dtype=jnp.int32)[:, None]
  lane = jnp.arange(chunk, dtype=jnp.int32)[None, :]
  row_ok = rows < m
  thr = np.float32(np.float16(threshold))  # bnb compares in float16

  def load(c):
    cols = c * chunk + lane
    ok = row_ok & (cols < k)
    flat = jnp.minimum(rows, m - 1) * k + jnp.minimum(cols, k - 1)
    x = x_ref[flat].astype(jnp.float32)  # in bounds; masked below
    x = jnp.where(ok, x, jnp.zeros_like(x))
    xh = x.astype(jnp.float16).astype(jnp.float32)
    absh = jnp.abs(xh)
    outl = absh >= thr
    colany = jnp.max(outl.astype(jnp.int32), axis=0, keepdims=True) > 0
    return x, xh, absh, outl, colany

  def reduce(c, carry):
    rowmax, omax, bad = carry
    x, _, absh, outl, colany = load(c)
    keep = jnp.where(outl | (absh != absh), jnp.zeros_like(absh), absh)
    rowmax = jnp.maximum(rowmax, jnp.max(keep, axis=1))
    xo = jnp.where(colany, jnp.abs(x), jnp.zeros_like(x))
    finite = xo < np.float32(np.inf)  # False for inf and NaN
    bad = jnp.maximum(bad, jnp.max((~finite).astype(jnp.int32), axis=1))
    omax = jnp.maximum(omax, jnp.max(
        jnp.where(finite, xo, jnp.zeros_like(xo)), axis=1))
    return rowmax, omax, bad

  zeros = jnp.zeros((limbs,), jnp.float32)
  rowmax, omax, bad = jax.lax.fori_loop(
      0, chunks, reduce, (zeros, zeros, jnp.zeros((limbs,), jnp.int32)))
  scale = _backend.div_rn(jnp.full_like(rowmax, 127.0), rowmax, interpret)
  pow2, inv, _ = limb_exponent(omax)
  xscale = jnp.where(bad > 0, np.float32(np.nan), pow2)

  def write(c, carry):
    del carry
    x, xh, _, outl, colany = load(c)
    q = _backend.rint(xh * scale[:, None], interpret)
    q = jnp.where(q != q, jnp.zeros_like(q), q)
    q = jnp.clip(q, -128.0, 127.0)
    drop = outl | colany if m > 1 else outl
    q = jnp.where(drop, jnp.zeros_like(q), q)
    use = colany & (bad[:, None] == 0)
    xo = jnp.where(use, x, jnp.zeros_like(x))
    t = _backend.rint(xo * inv[:, None], interpret).astype(jnp.int32)
    hi = (t + 2**13) >> 14
    r = t - (hi << 14)
    mid = (r + 2**6) >> 7
    lo = r - (mid << 7)
    k0 = pl.multiple_of(c * chunk, chunk)
    for b, v in enumerate((q.astype(jnp.int32), hi, mid, lo)):
      a_ref[pl.ds(b * limbs, limbs), pl.ds(k0, chunk)] = v.astype(jnp.int8)
    return 0

  jax.lax.fori_loop(0, chunks, write, 0)
  row_ref[...] = rowmax
  xscale_ref[...] = xscale


@functools.partial(jax.jit, static_argnames=("threshold", "limbs", "kp",
                                             "interpret"))
def quantize_decode_activations(
    x: jax.Array,
    *,
    threshold: float,
    limbs: int,
    kp: int,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`int8_matmul`'s "limbs" operand for `x [m, k]` in one launch.

  Args:
    x: `[m, k]` activations (float32, float16 or bfloat16), m <= limbs.
    threshold: the outlier threshold (> 0).
    limbs: rows per block (4, 8 or 16).
    kp: the padded K (a multiple of 32, >= k).
    interpret: Pallas interpret mode (CPU tests).

  Returns:
    `(a, row_absmax, xscale)`: int8 `[4 * limbs, kp]` (`CA`, then the
    digits hi, mid, lo, each `limbs` rows), float32 `[limbs]` row absmax
    (bitsandbytes' `SCA`), float32 `[limbs]` digit scales (NaN for a row
    with a non-finite outlier activation).
  """
  m, k = x.shape
  if not (threshold > 0 and 1 <= m <= limbs and limbs in (4, 8, 16)
          and kp >= k and kp % 32 == 0):
    raise ValueError(
        f"quantize_decode_activations: needs threshold > 0, 1 <= m <= "
        f"limbs in (4, 8, 16) and kp >= k a multiple of 32; got threshold="
        f"{threshold}, m={m}, limbs={limbs}, k={k}, kp={kp}.")
  chunk = min(512, kp & -kp)
  kernel = functools.partial(
      _kernel, m=m, k=k, limbs=limbs, chunk=chunk, chunks=kp // chunk,
      threshold=float(threshold), interpret=interpret)
  args = _backend.same_vma(x.reshape(-1))
  return pl.pallas_call(
      kernel,
      out_shape=[_backend.out_struct((4 * limbs, kp), jnp.int8, *args),
                 _backend.out_struct((limbs,), jnp.float32, *args),
                 _backend.out_struct((limbs,), jnp.float32, *args)],
      grid=(1,),
      compiler_params=_backend.compiler_params(num_warps=4, num_stages=3),
      interpret=interpret,
      name="jaxbnb_int8_quantize_decode",
  )(*args)
