"""LLM.int8 forward for prefill and training sizes (M > 16): a tiled int8 GEMM.

`y = fp16(CA @ CB.T * row * SCB * 6.200012e-05 (+ bias))` as bitsandbytes'
`Linear8bitLt` with a frozen int8 weight, plus, for `threshold > 0`, the
outlier product `x_sub @ w_sub.T` accumulated in float32, where the caller
has gathered the (few) outlier columns: `x_sub [M, C]` holds the outlier
activations and `w_sub [N, C]` bitsandbytes' dequantized weight columns
`(CB[:, cols] * SCB / 127).astype(dtype)`, zeros in unused slots.

Each program owns a `[block_m, block_n]` output tile (grouped launch order
for L2 reuse) and walks K in `block_k` steps: int8 x int8 -> int32 on the
tensor cores (both operands K-major, the layout int8 MMAs want). After the
loop one `[block_m, C] x [C, block_n]` product in `dtype` with float32
accumulation adds the outlier stream, and bitsandbytes' epilogue (row and
column scales, its constant, the fp16 rounding, the bias, the outlier sum
and the final cast) runs on the tile before the one store. Nothing of
size `[M, N]` but the output is ever written: XLA's int8 dot writes an
int32 `[M, N]` product and reads it back for the epilogue, and its outlier
product another float32 `[M, N]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _backend
from pallas_kernels import int8_matmul
from pallas_kernels._backend import pl
from pallas_kernels._backend import pltriton

__all__ = ["can_use", "default_config", "int8_gemm"]

_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
_DIMS = (((1,), (1,)), ((), ()))  # [a, K] x [b, K] -> [a, b]


def can_use(m: int, n: int, k: int, dtype) -> bool:
  """Whether the kernel serves `[m, k] @ [n, k].T` in `dtype`.

  Any M >= 1 (it is meant for M > 16); K below 2**17 keeps the int32
  accumulator exact.
  """
  return (_backend.available() and m >= 1 and n >= 1 and 1 <= k < 2**17
          and jnp.dtype(dtype) in _DTYPES)


@functools.lru_cache(maxsize=None)
def default_config(m: int, n: int, k: int) -> tuple:
  """(block_m, block_n, block_k, group_m, num_warps, num_stages).

  128 x 128 output tiles (64 rows for short M) over 128 bytes of K, eight
  row tiles per launch group.
  """
  del n
  block_m = 64 if m <= 64 else 128
  block_k = max(32, min(128, 1 << (max(1, k).bit_length() - 1)))
  return (block_m, 128, block_k, 8, 8, 3)


def _kernel(*refs, m, n, k, block_m, block_n, block_k, group_m, outliers,
            has_bias, dtype, interpret):
  refs = list(refs)
  ca_ref, row_ref, cb_ref, scb_ref = refs[:4]
  refs = refs[4:]
  if outliers:
    xs_ref, ws_ref = refs[:2]
    refs = refs[2:]
  bias_ref = refs.pop(0) if has_bias else None
  out_ref = refs[0]

  # Grouped launch order: `group_m` row tiles share each weight tile in L2.
  pid = pl.program_id(0)
  tiles_m = pl.cdiv(m, block_m)
  tiles_n = pl.cdiv(n, block_n)
  per_group = group_m * tiles_n
  first_m = (pid // per_group) * group_m
  size_m = jnp.minimum(tiles_m - first_m, group_m)
  pid_m = first_m + (pid % per_group) % size_m
  pid_n = (pid % per_group) // size_m
  row0 = pid_m * block_m
  col0 = pid_n * block_n
  rows = row0 + jnp.arange(block_m, dtype=jnp.int32)
  cols = col0 + jnp.arange(block_n, dtype=jnp.int32)
  row_ok = rows < m
  col_ok = cols < n
  need_m = m % block_m != 0
  need_n = n % block_n != 0
  need_k = k % block_k != 0

  def load(ref, idx, shape, ok_rows, need_rows, kcols=None):
    ok = None
    if need_rows:
      ok = ok_rows[:, None]
    if kcols is not None:
      ok = kcols[None, :] if ok is None else ok & kcols[None, :]
    if ok is None:
      return pltriton.load(ref.at[idx])
    return pltriton.load(ref.at[idx], mask=jnp.broadcast_to(ok, shape),
                         other=0)

  def body(t, acc):
    k0 = pl.multiple_of(t * block_k, block_k)
    kcols = None
    if need_k:
      kcols = (k0 + jnp.arange(block_k, dtype=jnp.int32)) < k
    a = load(ca_ref, (pl.ds(row0, block_m), pl.ds(k0, block_k)),
             (block_m, block_k), row_ok,
             need_m, kcols)
    b = load(cb_ref, (pl.ds(col0, block_n), pl.ds(k0, block_k)),
             (block_n, block_k), col_ok,
             need_n, kcols)
    return acc + jax.lax.dot_general(a, b, _DIMS,
                                     preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, pl.cdiv(k, block_k), body,
                          jnp.zeros((block_m, block_n), jnp.int32))

  out_acc = None
  if outliers:
    c = xs_ref.shape[1]
    xs = load(xs_ref, (pl.ds(row0, block_m), slice(None)), (block_m, c),
              row_ok, need_m)
    ws = load(ws_ref, (pl.ds(col0, block_n), slice(None)), (block_n, c),
              col_ok, need_n)
    precision = (jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    out_acc = jax.lax.dot_general(xs, ws, _DIMS, precision=precision,
                                  preferred_element_type=jnp.float32)

  def load_vec(ref, start, size, ok, need):
    if need:
      return pltriton.load(ref.at[pl.ds(start, size)], mask=ok, other=0)
    return pltriton.load(ref.at[pl.ds(start, size)])

  row = load_vec(row_ref, row0, block_m, row_ok, need_m)
  scb = load_vec(scb_ref, col0, block_n, col_ok, need_n)
  bias = None
  if has_bias:
    bias = load_vec(bias_ref, col0, block_n, col_ok, need_n)[None, :]
  exact_add = functools.partial(_backend.add_rn, interpret=interpret)
  y = int8_matmul.epilogue(acc, row[:, None], scb[None, :], bias, out_acc,
                           dtype, exact_add)
  at = out_ref.at[pl.ds(row0, block_m), pl.ds(col0, block_n)]
  if need_m or need_n:
    pltriton.store(at, y, mask=row_ok[:, None] & col_ok[None, :])
  else:
    pltriton.store(at, y)


@functools.partial(jax.jit, static_argnames=("dtype", "config", "interpret"))
def int8_gemm(
    ca: jax.Array,
    row_stats: jax.Array,
    cb: jax.Array,
    scb: jax.Array,
    *,
    dtype,
    bias: jax.Array | None = None,
    x_sub: jax.Array | None = None,
    w_sub: jax.Array | None = None,
    config: tuple | None = None,
    interpret: bool = False,
) -> jax.Array:
  """bitsandbytes' LLM.int8 forward `[m, k] x [n, k] -> [m, n]`, any m.

  Args:
    ca: int8 `[m, k]`, the row-wise quantized activations (outlier columns
      zeroed).
    row_stats: float32 `[m]`, their row absmax.
    cb: int8 `[n, k]`, the weight.
    scb: float32 `[n]`, the weight's row absmax.
    dtype: the activation dtype: the output dtype and that of the outlier
      product (float32, float16 or bfloat16).
    bias: optional `[n]`; a float16 bias is added before the fp16 rounding,
      any other after it (bitsandbytes).
    x_sub: optional `[m, c]` in `dtype`: the gathered outlier columns of the
      activations (zeros in unused slots), with `w_sub`.
    w_sub: optional `[n, c]` in `dtype`: the same columns of the dequantized
      weight, `((CB * SCB) * (1/127)).astype(dtype)`.
    config: (block_m, block_n, block_k, group_m, num_warps, num_stages),
      powers of two (block_k >= 32); default from `default_config`.
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    `[m, n]` in `dtype`.
  """
  m, k = ca.shape
  n = cb.shape[0]
  dtype = jnp.dtype(dtype)
  if config is None:
    config = default_config(m, n, k)
  block_m, block_n, block_k, group_m, num_warps, num_stages = config
  outliers = x_sub is not None
  args = [ca, row_stats.astype(jnp.float32), cb, scb.astype(jnp.float32)]
  if outliers:
    c = x_sub.shape[1]
    cp = max(16, 1 << (c - 1).bit_length())  # a power of two, >= 16
    args += [jnp.pad(x_sub.astype(dtype), ((0, 0), (0, cp - c))),
             jnp.pad(w_sub.astype(dtype), ((0, 0), (0, cp - c)))]
  has_bias = bias is not None
  if has_bias:
    args.append(bias)
  args = _backend.same_vma(*args)
  kernel = functools.partial(
      _kernel, m=m, n=n, k=k, block_m=block_m, block_n=block_n,
      block_k=block_k, group_m=group_m, outliers=outliers,
      has_bias=has_bias, dtype=dtype, interpret=interpret)
  grid = pl.cdiv(m, block_m) * pl.cdiv(n, block_n)
  return pl.pallas_call(
      kernel,
      out_shape=_backend.out_struct((m, n), dtype, *args),
      grid=(grid,),
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=num_stages),
      interpret=interpret,
      name="jaxbnb_int8_gemm",
      cost_estimate=pl.CostEstimate(
          flops=2 * m * n * k, transcendentals=0,
          bytes_accessed=n * k + m * k + m * n * dtype.itemsize),
  )(*args)
