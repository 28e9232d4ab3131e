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
  row tiles per launch group, 4 warps, 3 stages. Measured on the H200
  (`jaxbnb bench int8 --sweep`, 4096 -> 14336, M = 4096, threshold 6):
  464 us, the best of 12 tile shapes (8 warps 492 us, 256-wide tiles 520
  to 530 us, 64-byte K steps 505 us and slower).
  """
  del n
  block_m = 64 if m <= 64 else 128
  block_k = max(32, min(128, 1 << (max(1, k).bit_length() - 1)))
  return (block_m, 128, block_k, 8, 4, 3)


def _kernel(*refs, m, n, k, block_m, block_n, block_k, group_m, outliers,
            has_bias, dtype, interpret):
  refs = list(refs)
  ca_ref, row_ref, cb_ref, scb_ref = refs[:4]
  refs = refs[4:]
  if outliers:
    xs_ref, ws_ref, x_ref, keep_ref, tiles_ref = refs[:5]
    refs = refs[5:]
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

  def load_vec(ref, start, size, ok, need):
    if need:
      return pltriton.load(ref.at[pl.ds(start, size)], mask=ok, other=0)
    return pltriton.load(ref.at[pl.ds(start, size)])

  row = load_vec(row_ref, row0, block_m, row_ok, need_m)
  scb = load_vec(scb_ref, col0, block_n, col_ok, need_n)

  out_acc = None
  if outliers:
    precision = (jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    c = xs_ref.shape[1]
    xs = load(xs_ref, (pl.ds(row0, block_m), slice(None)), (block_m, c),
              row_ok, need_m)
    ws = load(ws_ref, (pl.ds(col0, block_n), slice(None)), (block_n, c),
              col_ok, need_n)
    if interpret:  # XLA:CPU has no 16-bit x 16-bit -> f32 dot (exact)
      xs, ws = xs.astype(jnp.float32), ws.astype(jnp.float32)
    out_acc = jax.lax.dot_general(xs, ws, _DIMS, precision=precision,
                                  preferred_element_type=jnp.float32)

    def overflow(j, out_acc):
      # More outlier columns than slots (the slots are then empty): the
      # masked activations times the dequantized weight, K tile by K tile,
      # only over the tiles holding an outlier column.
      k0 = pl.multiple_of(tiles_ref[j] * block_k, block_k)
      kcols = None
      if need_k:
        kcols = (k0 + jnp.arange(block_k, dtype=jnp.int32)) < k
      xt = load(x_ref, (pl.ds(row0, block_m), pl.ds(k0, block_k)),
                (block_m, block_k), row_ok, need_m, kcols)
      keep = keep_ref[pl.ds(k0, block_k)] != 0
      xt = jnp.where(keep[None, :], xt, jnp.zeros_like(xt))
      cb = load(cb_ref, (pl.ds(col0, block_n), pl.ds(k0, block_k)),
                (block_n, block_k), col_ok, need_n, kcols)
      w = int8_matmul.dequantized_weight(cb, scb[:, None], dtype)
      if interpret:
        xt, w = xt.astype(jnp.float32), w.astype(jnp.float32)
      return out_acc + jax.lax.dot_general(
          xt, w, _DIMS, precision=precision,
          preferred_element_type=jnp.float32)

    out_acc = jax.lax.fori_loop(0, tiles_ref[tiles_ref.shape[0] - 1],
                                overflow, out_acc)
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


def _outlier_args(x, outlier_cols, cb, scb, dtype, slots, block_k):
  """(x_sub, w_sub, x, keep, tiles): the gathered slots (empty when the
  outliers overflow them) and, for the overflow, the column mask padded to
  whole K tiles and the flagged tiles' indices with their count last (0
  unless the slots overflow)."""
  k = x.shape[1]
  count = jnp.sum(outlier_cols, dtype=jnp.int32)
  fits = count <= slots
  cols = jnp.nonzero(outlier_cols, size=slots, fill_value=0)[0]
  used = (jnp.arange(slots) < count) & fits
  x_sub = jnp.where(used[None, :], x[:, cols], jnp.zeros((), dtype))
  w_sub = int8_matmul.dequantized_weight(cb[:, cols],
                                          scb.astype(jnp.float32)[:, None],
                                          dtype)
  cp = max(16, 1 << (slots - 1).bit_length())  # a dot dimension: pow2 >= 16
  x_sub = jnp.pad(x_sub, ((0, 0), (0, cp - slots)))
  w_sub = jnp.pad(w_sub, ((0, 0), (0, cp - slots)))
  keep = jnp.pad(outlier_cols, (0, -k % block_k))
  flags = jnp.any(keep.reshape(-1, block_k), axis=1)
  tiles = jnp.nonzero(flags, size=flags.shape[0], fill_value=0)[0]
  n_tiles = jnp.where(fits, 0, jnp.sum(flags, dtype=jnp.int32))
  tiles = jnp.concatenate([tiles.astype(jnp.int32), n_tiles[None]])
  return [x_sub, w_sub, x, keep.astype(jnp.int32), tiles]


@functools.partial(jax.jit,
                   static_argnames=("dtype", "slots", "config", "interpret"))
def int8_gemm(
    ca: jax.Array,
    row_stats: jax.Array,
    cb: jax.Array,
    scb: jax.Array,
    *,
    dtype,
    bias: jax.Array | None = None,
    x: jax.Array | None = None,
    outlier_cols: jax.Array | None = None,
    slots: int = 64,
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
    x: optional `[m, k]`, the activations (in `dtype`), with
      `outlier_cols`: their outlier columns are added as bitsandbytes'
      16-bit outlier product.
    outlier_cols: bool `[k]`, the outlier column mask.
    slots: how many outlier columns are gathered (`x[:, cols]` and the
      dequantized `CB[:, cols]`) for one product after the int8 loop;
      with more than that the kernel adds the masked product over the K
      tiles holding an outlier column instead (same sum, slower).
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
  outliers = x is not None
  args = [ca, row_stats.astype(jnp.float32), cb, scb.astype(jnp.float32)]
  if outliers:
    args += _outlier_args(x.astype(dtype), outlier_cols, cb, scb, dtype,
                          min(slots, k), block_k)
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
