"""LLM.int8 forward for prefill and training sizes (M > 16): a tiled int8 GEMM.

`y = fp16(CA @ CB.T * row * SCB * 6.200012e-05 (+ bias))` as bitsandbytes'
`Linear8bitLt` with a frozen int8 weight, plus, for `threshold > 0`,
bitsandbytes' 16-bit outlier product: the outlier columns of the
activations times the same columns of the dequantized weight
`(CB * SCB / 127).astype(dtype)`, accumulated in float32 and added to the
int8 result before the one rounding to `dtype`.

Each program owns a `[block_m, block_n]` output tile (grouped launch order
for L2 reuse) and walks K in `block_k` steps: int8 x int8 -> int32 on the
tensor cores (both operands K-major, the layout int8 MMAs want). The loop
has no branch, so the pipeliner keeps it fed. After it, up to `slots`
gathered outlier columns (`x[:, cols]` and the dequantized `CB[:, cols]`,
a `[block_m, C] x [C, block_n]` product) are added, then bitsandbytes'
epilogue (row and column scales, its constant, the fp16 rounding, the bias,
the outlier sum and the final cast) runs on the tile before the one store:
nothing of size `[M, N]` but the output is written (XLA's int8 dot writes
an int32 `[M, N]` product and reads it back for the epilogue).

More outlier columns than `slots` (activations with outliers everywhere)
leave the slots empty; a second kernel (`_overflow_kernel`) then adds the
masked product over the K tiles that hold outlier columns to the finished
output in place. It is always launched (no host round trip to decide) and
returns at once when there is no overflow. A data-dependent loop inside the
GEMM itself measured 2.8x slower on the H200.
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


class _Tile:
  """One program's output tile and its masked loads."""

  def __init__(self, m, n, k, block_m, block_n, block_k, row0, col0):
    self.block_m, self.block_n, self.block_k = block_m, block_n, block_k
    self.k = k
    self.row0, self.col0 = row0, col0
    self.row_ok = row0 + jnp.arange(block_m, dtype=jnp.int32) < m
    self.col_ok = col0 + jnp.arange(block_n, dtype=jnp.int32) < n
    self.need_m = m % block_m != 0
    self.need_n = n % block_n != 0
    self.need_k = k % block_k != 0

  def _kcols(self, k0):
    if not self.need_k:
      return None
    return (k0 + jnp.arange(self.block_k, dtype=jnp.int32)) < self.k

  def _load(self, ref, start, size, ok_rows, need_rows, k0=None, width=None):
    kcols = None if k0 is None else self._kcols(k0)
    idx = (pl.ds(start, size),
           slice(None) if k0 is None else pl.ds(k0, self.block_k))
    shape = (size, width if k0 is None else self.block_k)
    ok = ok_rows[:, None] if need_rows else None
    if kcols is not None:
      ok = kcols[None, :] if ok is None else ok & kcols[None, :]
    if ok is None:
      return pltriton.load(ref.at[idx])
    return pltriton.load(ref.at[idx], mask=jnp.broadcast_to(ok, shape),
                         other=0)

  def rows(self, ref, k0=None, width=None):
    """`ref[rows of the tile, K tile at k0 (or all `width` columns)]`."""
    return self._load(ref, self.row0, self.block_m, self.row_ok, self.need_m,
                      k0, width)

  def cols(self, ref, k0=None, width=None):
    """`ref[columns of the tile (rows of the weight), K tile or all]`."""
    return self._load(ref, self.col0, self.block_n, self.col_ok, self.need_n,
                      k0, width)

  def vec(self, ref, along_rows):
    start, size, ok, need = ((self.row0, self.block_m, self.row_ok,
                              self.need_m) if along_rows else
                             (self.col0, self.block_n, self.col_ok,
                              self.need_n))
    if need:
      return pltriton.load(ref.at[pl.ds(start, size)], mask=ok, other=0)
    return pltriton.load(ref.at[pl.ds(start, size)])

  def store(self, ref, y):
    at = ref.at[pl.ds(self.row0, self.block_m), pl.ds(self.col0, self.block_n)]
    if self.need_m or self.need_n:
      pltriton.store(at, y, mask=self.row_ok[:, None] & self.col_ok[None, :])
    else:
      pltriton.store(at, y)

  def load_out(self, ref):
    at = ref.at[pl.ds(self.row0, self.block_m), pl.ds(self.col0, self.block_n)]
    if self.need_m or self.need_n:
      return pltriton.load(
          at, mask=self.row_ok[:, None] & self.col_ok[None, :], other=0)
    return pltriton.load(at)


def _grouped(pid, m, n, block_m, block_n, group_m):
  """Grouped launch order: `group_m` row tiles share each weight tile."""
  tiles_m = pl.cdiv(m, block_m)
  tiles_n = pl.cdiv(n, block_n)
  per_group = group_m * tiles_n
  first_m = (pid // per_group) * group_m
  size_m = jnp.minimum(tiles_m - first_m, group_m)
  pid_m = first_m + (pid % per_group) % size_m
  pid_n = (pid % per_group) // size_m
  return pid_m * block_m, pid_n * block_n


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
  row0, col0 = _grouped(pl.program_id(0), m, n, block_m, block_n, group_m)
  tile = _Tile(m, n, k, block_m, block_n, block_k, row0, col0)

  def body(t, acc):
    k0 = pl.multiple_of(t * block_k, block_k)
    a = tile.rows(ca_ref, k0)
    b = tile.cols(cb_ref, k0)
    return acc + jax.lax.dot_general(a, b, _DIMS,
                                     preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, pl.cdiv(k, block_k), body,
                          jnp.zeros((block_m, block_n), jnp.int32))
  out_acc = None
  if outliers:
    c = xs_ref.shape[1]
    out_acc = int8_matmul.dot_f32(tile.rows(xs_ref, width=c),
                                  tile.cols(ws_ref, width=c), dtype,
                                  interpret)
  row = tile.vec(row_ref, along_rows=True)
  scb = tile.vec(scb_ref, along_rows=False)
  bias = tile.vec(bias_ref, along_rows=False)[None, :] if has_bias else None
  exact_add = functools.partial(_backend.add_rn, interpret=interpret)
  tile.store(out_ref, int8_matmul.epilogue(
      acc, row[:, None], scb[None, :], bias, out_acc, dtype, exact_add))


def _overflow_kernel(x_ref, keep_ref, tiles_ref, cb_ref, scb_ref, y_ref,
                     out_ref, *, m, n, k, block_m, block_n, block_k, dtype,
                     interpret):
  del y_ref  # aliased with out_ref
  tile = _Tile(m, n, k, block_m, block_n, block_k,
               pl.program_id(0) * block_m, pl.program_id(1) * block_n)
  count = tiles_ref[tiles_ref.shape[0] - 1]

  @pl.when(count > 0)
  def _():
    scb = tile.vec(scb_ref, along_rows=False)

    def body(j, out_acc):
      k0 = pl.multiple_of(tiles_ref[j] * block_k, block_k)
      xt = tile.rows(x_ref, k0)
      keep = keep_ref[pl.ds(k0, block_k)] != 0
      xt = jnp.where(keep[None, :], xt, jnp.zeros_like(xt))
      w = int8_matmul.dequantized_weight(tile.cols(cb_ref, k0),
                                         scb[:, None], dtype)
      return out_acc + int8_matmul.dot_f32(xt, w, dtype, interpret)

    out_acc = jax.lax.fori_loop(0, count, body,
                                jnp.zeros((block_m, block_n), jnp.float32))
    # The finished output is the int8 result rounded to `dtype` (the empty
    # slots added exactly 0): bitsandbytes' `dtype(outliers + int8 part)`.
    y = tile.load_out(out_ref).astype(jnp.float32)
    tile.store(out_ref, (out_acc + y).astype(dtype))


def _outlier_args(x, outlier_cols, cb, scb, dtype, slots, block_k):
  """The gathered slots (empty when the outlier columns overflow them) and,
  for the overflow, the column mask padded to whole K tiles and the flagged
  K tiles' indices with their count last (0 unless the slots overflow)."""
  k = x.shape[1]
  count = jnp.sum(outlier_cols, dtype=jnp.int32)
  fits = count <= slots
  cols = jnp.nonzero(outlier_cols, size=slots, fill_value=0)[0]
  used = (jnp.arange(slots) < count) & fits
  x_sub = jnp.where(used[None, :], x[:, cols], jnp.zeros((), dtype))
  w_sub = int8_matmul.dequantized_weight(
      cb[:, cols], scb.astype(jnp.float32)[:, None], dtype)
  cp = max(16, 1 << (slots - 1).bit_length())  # a dot dimension: pow2 >= 16
  x_sub = jnp.pad(x_sub, ((0, 0), (0, cp - slots)))
  w_sub = jnp.pad(w_sub, ((0, 0), (0, cp - slots)))
  keep = jnp.pad(outlier_cols, (0, -k % block_k))
  flags = jnp.any(keep.reshape(-1, block_k), axis=1)
  tiles = jnp.nonzero(flags, size=flags.shape[0], fill_value=0)[0]
  n_tiles = jnp.where(fits, 0, jnp.sum(flags, dtype=jnp.int32))
  tiles = jnp.concatenate([tiles.astype(jnp.int32), n_tiles[None]])
  return (x_sub, w_sub), (keep.astype(jnp.int32), tiles)


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
    slots: int = 32,
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
    x: optional `[m, k]` activations (in `dtype`), with `outlier_cols`:
      their outlier columns are added as bitsandbytes' 16-bit product.
    outlier_cols: bool `[k]`, the outlier column mask.
    slots: how many outlier columns are gathered for the one product after
      the int8 loop; more than that go through the overflow kernel (the
      same sum, slower).
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
    x = x.astype(dtype)
    sub, overflow = _outlier_args(x, outlier_cols, cb, scb, dtype,
                                  min(slots, k), block_k)
    args += list(sub)
  has_bias = bias is not None
  if has_bias:
    args.append(bias)
  args = _backend.same_vma(*args)
  kernel = functools.partial(
      _kernel, m=m, n=n, k=k, block_m=block_m, block_n=block_n,
      block_k=block_k, group_m=group_m, outliers=outliers,
      has_bias=has_bias, dtype=dtype, interpret=interpret)
  params = _backend.compiler_params(num_warps=num_warps,
                                    num_stages=num_stages)
  y = pl.pallas_call(
      kernel,
      out_shape=_backend.out_struct((m, n), dtype, *args),
      grid=(pl.cdiv(m, block_m) * pl.cdiv(n, block_n),),
      compiler_params=params,
      interpret=interpret,
      name="jaxbnb_int8_gemm",
      cost_estimate=pl.CostEstimate(
          flops=2 * m * n * k, transcendentals=0,
          bytes_accessed=n * k + m * k + m * n * dtype.itemsize),
  )(*args)
  if not outliers:
    return y
  args = _backend.same_vma(x, *overflow, cb, scb.astype(jnp.float32), y)
  kernel = functools.partial(
      _overflow_kernel, m=m, n=n, k=k, block_m=block_m, block_n=block_n,
      block_k=block_k, dtype=dtype, interpret=interpret)
  return pl.pallas_call(
      kernel,
      out_shape=_backend.out_struct((m, n), dtype, *args),
      grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
      input_output_aliases={len(args) - 1: 0},
      compiler_params=params,
      interpret=interpret,
      name="jaxbnb_int8_gemm_overflow",
  )(*args)
