"""LLM.int8 forward for decoding (M <= 16): one pass over the int8 weight.

`y = fp16(CA @ CB.T * row * SCB * 6.200012e-05 (+ bias))`, bitsandbytes'
`Linear8bitLt` with a frozen int8 weight, plus, for `threshold > 0`, the
outlier stream `x_out @ ((CB * SCB / 127).astype(dtype)).T` accumulated in
float32 (`x_out` is `x` with the non-outlier columns zeroed).

The caller quantizes the few activation rows (int8 `CA [M, K]`, float32 row
statistics, the masked outlier activations and the outlier column mask);
this kernel streams the weight. Each program owns `block_n` rows of `CB`
and walks its share of K in `block_k` steps. Every `[block_n, block_k]`
int8 tile is loaded once (evict-first) and feeds the exact int32 product
with the activations on the tensor cores (swap-AB: the weight rows are the
MMA's M dimension; the activations are padded to 16 or more lanes).

The outlier stream, config mode (`config[5]`):

* "limbs" (the default): the outlier activations as three int8 digits of
  2**-20 of their row absmax (`outlier_limbs`), in the lanes the
  activation rows leave free (16 lanes up to M = 4, 32 up to 8, 64 up to
  16), so the same branch-free loop computes both products; the epilogue
  recombines the digits in float32 and scales by `2**e * SCB / 127`. The
  weight is the unrounded dequantized one, where bitsandbytes rounds
  `CB * SCB / 127` to the activation dtype first (one rounding per outlier
  term). Measured on the H200: 22.3 us at M = 1 and 24.2 at M = 16 (28.4
  before the epilogue worked on whole tiles).
* "skip": only for K tiles holding an outlier column (a per-tile flag,
  `lax.cond`), bitsandbytes' dequantized weight `(CB.f32 * SCB) * (1/127)`
  rounded to the activation dtype, multiplied with the masked activations
  and accumulated in float32 (31.5 / 29.5 us: the branch stops Triton's
  software pipelining).
* "always": the same product in every tile, branch-free (36.0 us).

(A second kernel gathering the outlier weight columns after the int8 loop
measured 41.8 us and was removed; docs/benchmarks.md.)

With `threshold == 0` no outlier code is traced.

The epilogue (row and column scales, bitsandbytes' constant, the fp16
rounding, the bias, the outlier sum and the final cast) runs in the kernel
when `split_k == 1`; with `split_k > 1` the programs of one row tile split
K, write int32 (and float32) partial sums and the same epilogue runs in XLA
on their (exact, resp. deterministic) sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _backend
from pallas_kernels._backend import pl
from pallas_kernels._backend import pltriton
from pallas_kernels._backend import round_to_dtype
from pallas_kernels._backend import round_to_float16

__all__ = ["can_use", "default_config", "dot_f32",
           "epilogue", "int8_matmul", "MAX_M", "OUTLIER_MODES",
           "outlier_limbs", "round_to_dtype", "round_to_float16"]

MAX_M = 16
OUTLIER_MODES = ("skip", "always", "limbs")
_M_PAD = 16  # the tensor-core N dimension (dot dims >= 16)
_MM_DEQUANT = np.float32(6.200012e-05)  # bitsandbytes' 1/127**2
_INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes' 1/127
_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
_DIMS = (((1,), (1,)), ((), ()))  # [a, K] x [b, K] -> [a, b]


def can_use(m: int, n: int, k: int, dtype) -> bool:
  """Whether the kernel serves `[m, k] @ [n, k].T` in `dtype`.

  M up to 16 (decode); K below 2**17 keeps `127 * 128 * K` in int32.
  """
  return (_backend.available() and 1 <= m <= MAX_M and n >= 1
          and 1 <= k < 2**17 and jnp.dtype(dtype) in _DTYPES)


def _pow2_floor(v: int) -> int:
  return 1 << (max(1, v).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def default_config(m: int, n: int, k: int, num_sms: int | None = None) -> tuple:
  """(block_n, block_k, split_k, num_warps, num_stages, outliers).

  Tiles of 64 weight rows and up to 256 bytes of K (16 KB per step); K is
  split only while the row tiles fill less than one wave of SMs. The
  outlier stream rides in the int8 product as int8 digits ("limbs"), so
  the loop has no branch. Measured on the H200 (docs/benchmarks.md,
  `jaxbnb bench int8 --configs`, 4096 -> 14336, threshold 6, 5 outlier
  columns): 22.1 us at M = 1 and 28.4 us at M = 16 (the int8 loop alone:
  19.8 and 19.6), against 31.5 and 29.5 for a branch that skips the K
  tiles without outliers ("skip"), 41.8 for a second kernel that gathers
  the outlier columns (removed), 36.0 for the float product in every tile
  ("always"); other tiles of "limbs" measured 22.4-25.1 (M = 1) and
  29.4-41.8 us (M = 16). With the whole-tile epilogue (2026-12-01) this
  tile stayed the best at M = 16 (25.2 us; others 25.3-36.1).
  """
  if num_sms is None:
    num_sms = _backend.num_sms()
  del m
  block_n = 64
  block_k = max(32, min(256, _pow2_floor(k)))
  tiles = -(-n // block_n)
  steps = -(-k // block_k)
  split_k = 1
  while tiles * split_k < num_sms and split_k * 4 <= steps:
    split_k *= 2
  return (block_n, block_k, split_k, 4, 3, "limbs")


def dequantized_weight(cb, scb, dtype):
  """bitsandbytes' `(CB * SCB / 127).to(dtype)`: two fp32 products, a cast."""
  w = cb.astype(jnp.float32) * scb
  return (w * _INV_127).astype(dtype)


def _kernel_round_to(x, dtype):
  return x.astype(dtype).astype(jnp.float32)  # Triton never skips these


def _kernel_float16(x):
  return x.astype(jnp.float16)  # Triton's conversion is never skipped


def epilogue(acc, row, scb, bias, out_acc, dtype, exact_add,
             to_float16=_kernel_float16, round_to=_kernel_round_to):
  """bitsandbytes' int8 epilogue on int32 `acc` (+ the outlier sum).

  `fp16(acc * row * scb * 6.200012e-05 (+ bias))`, a float16 bias added
  before the one rounding to fp16 (bitsandbytes' fused case; here a separate
  fp32 addition, never an FMA), any other bias added to the fp16 result and
  rounded again, then cast to `dtype`; with `out_acc` (the float32 outlier
  sum) `dtype(out_acc + float32(y))`. `row` and `scb` broadcast against
  `acc`. `exact_add(a, b)` is the fp32 `a + b` that is never contracted.
  """
  out = acc.astype(jnp.float32) * row
  out = out * scb
  out = out * _MM_DEQUANT
  if bias is not None and bias.dtype == jnp.float16:
    out = to_float16(exact_add(out, bias.astype(jnp.float32)))
  else:
    out = to_float16(out)
    if bias is not None:
      out = to_float16(out.astype(jnp.float32) + bias.astype(jnp.float32))
  if out_acc is None:
    return out.astype(dtype)
  return (out_acc + round_to(out.astype(jnp.float32), dtype)).astype(dtype)


def _kernel(*refs, m, n, k, block_n, block_k, steps, split_k, outliers,
            limbs, has_bias, dtype, skip_clean, interpret):
  refs = list(refs)
  ca_ref, row_ref, cb_ref, scb_ref = refs[:4]
  refs = refs[4:]
  lanes = ca_ref.shape[0]  # 16, or 4 * limbs for the "limbs" stream
  if limbs:
    xscale_ref = refs.pop(0)
  if outliers:
    xo_ref, flag_ref = refs[:2]
    refs = refs[2:]
  bias_ref = refs.pop(0) if has_bias else None
  out_refs = refs

  i = pl.program_id(0)
  s = pl.program_id(1)
  row0 = i * block_n
  rows = row0 + jnp.arange(block_n, dtype=jnp.int32)
  need_nmask = n % block_n != 0
  need_kmask = k % block_k != 0 or split_k * steps * block_k > k
  row_ok = rows < n
  precision = (jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None)

  def body(t, accs):
    kt = s * steps + t
    k0 = pl.multiple_of(kt * block_k, block_k)
    cb_at = cb_ref.at[pl.ds(row0, block_n), pl.ds(k0, block_k)]
    if need_nmask or need_kmask:
      ok = jnp.ones((block_n, block_k), jnp.bool_)
      if need_nmask:
        ok = ok & row_ok[:, None]
      if need_kmask:
        cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
        ok = ok & (cols < k)[None, :]
      cb = pltriton.load(cb_at, mask=ok, other=0,
                         eviction_policy="evict_first")
    else:
      cb = pltriton.load(cb_at, eviction_policy="evict_first")
    # CA and the outlier activations are padded to whole tiles (zeros).
    ca = ca_ref[:, pl.ds(k0, block_k)]
    acc = accs[0] + jax.lax.dot_general(cb, ca, _DIMS,
                                        preferred_element_type=jnp.int32)
    if not outliers:
      return (acc,)

    def add_outliers(acc_out):
      xo = xo_ref[:, pl.ds(k0, block_k)]
      w = dequantized_weight(cb, scb[:, None], dtype)
      return acc_out + jax.lax.dot_general(
          w, xo, _DIMS, precision=precision,
          preferred_element_type=jnp.float32)

    if skip_clean:
      acc_out = jax.lax.cond(flag_ref[kt] != 0, add_outliers, lambda a: a,
                             accs[1])
    else:  # branch-free: no control flow in the loop to stop pipelining
      acc_out = add_outliers(accs[1])
    return acc, acc_out

  if need_nmask:
    scb = pltriton.load(scb_ref.at[pl.ds(row0, block_n)], mask=row_ok,
                        other=0)
  else:
    scb = scb_ref[pl.ds(row0, block_n)]
  init = (jnp.zeros((block_n, lanes), jnp.int32),)
  if outliers:
    init += (jnp.zeros((block_n, _M_PAD), jnp.float32),)
  accs = jax.lax.fori_loop(0, steps, body, init)

  # The [block_n, lanes] accumulator -> [block_n, width] tiles, one column
  # per activation row: the int32 product, and the float32 outlier sum.
  if limbs:
    # Lanes [limbs * l, limbs * (l + 1)) hold limb l of the outlier
    # activations (l = 1, 2, 3: weights 2**14, 2**7, 1; l = 0: CA).
    width = limbs
    acc, hi, mid, lo = jnp.split(accs[0], 4, axis=1)
    f32 = jnp.float32
    digits = ((hi.astype(f32) * np.float32(2.0**14)
               + mid.astype(f32) * np.float32(2.0**7)) + lo.astype(f32))
    xscale = xscale_ref[pl.ds(0, width)]
    out_acc = ((digits * scb[:, None]) * _INV_127) * xscale[None, :]
  else:
    width = lanes
    acc = accs[0]
    out_acc = accs[1] if outliers else None
  lane = jnp.arange(width, dtype=jnp.int32)

  def pick(v, r):  # column r of a [block_n, width] tile, exactly
    return jnp.sum(jnp.where(lane[None, :] == r, v, jnp.zeros_like(v)),
                   axis=1)

  if split_k > 1:
    # Partial sums [split_k, m, n]; the caller sums them and runs the
    # epilogue. Rows are picked out of the [block_n, width] tile exactly.
    for r in range(m):
      vals = (pick(acc, r), None if out_acc is None else pick(out_acc, r))
      for v, out_ref in zip(vals, out_refs):
        at = out_ref.at[s, jnp.int32(r), pl.ds(row0, block_n)]
        if need_nmask:
          pltriton.store(at, v, mask=row_ok)
        else:
          pltriton.store(at, v)
    return

  bias = None
  if has_bias:
    if need_nmask:
      bias = pltriton.load(bias_ref.at[pl.ds(row0, block_n)], mask=row_ok,
                           other=0)
    else:
      bias = bias_ref[pl.ds(row0, block_n)]
  exact_add = functools.partial(_exact_add, interpret=interpret)
  out_ref = out_refs[0]
  row_all = row_ref[pl.ds(0, width)]  # float32, zero-padded
  if m == width:
    # The whole [m, block_n] output tile in one epilogue and one store.
    y = epilogue(acc, row_all[None, :], scb[:, None],
                 None if bias is None else bias[:, None], out_acc, dtype,
                 exact_add)
    at = out_ref.at[pl.ds(0, m), pl.ds(row0, block_n)]
    if need_nmask:
      pltriton.store(at, y.T, mask=jnp.broadcast_to(row_ok[None, :],
                                                    (m, block_n)))
    else:
      pltriton.store(at, y.T)
    return
  for r in range(m):
    rs = jnp.sum(jnp.where(lane == r, row_all, jnp.zeros_like(row_all)))
    y = epilogue(pick(acc, r), rs, scb, bias,
                 None if out_acc is None else pick(out_acc, r), dtype,
                 exact_add)
    at = out_ref.at[jnp.int32(r), pl.ds(row0, block_n)]
    if need_nmask:
      pltriton.store(at, y, mask=row_ok)
    else:
      pltriton.store(at, y)


def _limb_lanes(m: int) -> int:
  """Rows per block of the "limbs" activations: 4 blocks fill 16, 32 or 64
  tensor-core lanes."""
  return 4 if m <= 4 else 8 if m <= 8 else 16


def outlier_limbs(x_outlier: jax.Array) -> tuple[tuple[jax.Array, ...],
                                                 jax.Array]:
  """The outlier activations as three int8 digits and a row scale.

  Row r of `x_outlier [m, k]` becomes `q = round(x * 2**-e_r)` with
  `|q| <= 2**20` (`e_r` from the row's absmax, a power of two, so 16-bit
  values within 2**12 of the absmax are exact), split into digits
  `q = hi * 2**14 + mid * 2**7 + lo` with every digit in [-64, 64]. The int8
  weight times each digit is an exact int32 product on the tensor cores;
  the kernel recombines them in float32 and scales by `2**e_r * SCB / 127`.
  A row with a non-finite value gets a NaN scale (so the output is NaN, as
  bitsandbytes' float product would be).

  Returns:
    `((hi, mid, lo), scale)`: int8 `[m, k]` digits, float32 `[m]` scale.
  """
  x = x_outlier.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=1)
  _, ex = jnp.frexp(amax)  # amax < 2**ex
  e = jnp.maximum(ex - 20, -126)
  finite = jnp.isfinite(amax)
  q = jnp.round(jnp.ldexp(jnp.where(finite[:, None], x, 0.0),
                          -e[:, None])).astype(jnp.int32)
  hi = (q + 2**13) >> 14
  r = q - (hi << 14)
  mid = (r + 2**6) >> 7
  lo = r - (mid << 7)
  scale = jnp.where(finite, jnp.ldexp(jnp.float32(1.0), e), jnp.nan)
  return tuple(v.astype(jnp.int8) for v in (hi, mid, lo)), scale


def dot_f32(a, b, dtype, interpret):
  """`a @ b.T` of `dtype` tiles in a kernel, float32 accumulation."""
  if interpret:  # XLA:CPU has no 16-bit x 16-bit -> f32 dot; exact in f32
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, _DIMS, precision=precision,
                             preferred_element_type=jnp.float32)


def _exact_add(a, b, interpret):
  return _backend.add_rn(a, b, interpret)


def _xla_exact_add(a, b):
  return jax.lax.optimization_barrier(a) + b


@functools.partial(jax.jit, static_argnames=("dtype", "config", "interpret"))
def int8_matmul(
    ca: jax.Array,
    row_stats: jax.Array,
    cb: jax.Array,
    scb: jax.Array,
    *,
    dtype,
    bias: jax.Array | None = None,
    x_outlier: jax.Array | None = None,
    outlier_cols: jax.Array | None = None,
    config: tuple | None = None,
    interpret: bool = False,
) -> jax.Array:
  """bitsandbytes' LLM.int8 forward `[m, k] x [n, k] -> [m, n]` for m <= 16.

  Args:
    ca: int8 `[m, k]`, the row-wise quantized activations (outlier columns
      zeroed).
    row_stats: float32 `[m]`, their row absmax.
    cb: int8 `[n, k]`, the weight (read once, never copied).
    scb: float32 `[n]`, the weight's row absmax.
    dtype: the activation dtype: the output dtype and that of the outlier
      stream (float32, float16 or bfloat16).
    bias: optional `[n]`; a float16 bias is added before the fp16 rounding,
      any other after it (bitsandbytes).
    x_outlier: optional `[m, k]` activations in `dtype`, zero outside the
      outlier columns; with it the outlier stream is added.
    outlier_cols: bool `[k]`, the outlier column mask (with `x_outlier`);
      K tiles without an outlier column skip the outlier work.
    config: (block_n, block_k, split_k, num_warps, num_stages[, outliers]);
      default from `default_config`. `outliers` (default "limbs") is one
      of `OUTLIER_MODES`, described in the module docstring. `block_n`,
      `block_k` powers of two >= 16, 32.
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    `[m, n]` in `dtype`.
  """
  m, k = ca.shape
  n = cb.shape[0]
  dtype = jnp.dtype(dtype)
  if config is None:
    config = default_config(m, n, k)
  block_n, block_k, split_k, num_warps, num_stages = config[:5]
  mode = config[5] if len(config) > 5 else "limbs"
  if mode not in OUTLIER_MODES:
    raise ValueError(f"int8_matmul: config[5] (outliers) must be one of "
                     f"{OUTLIER_MODES}, got {mode!r}.")
  skip_clean = mode == "skip"
  nkt = -(-k // block_k)
  steps = -(-nkt // split_k)
  kp = split_k * steps * block_k  # K of the padded activations
  has_outliers = x_outlier is not None
  limbs = _limb_lanes(m) if has_outliers and mode == "limbs" else 0
  outliers = has_outliers and not limbs  # the float stream in the loop

  row_p = row_stats.astype(jnp.float32)
  if limbs:  # [CA; hi; mid; lo], each padded to `limbs` rows
    digits, xscale = outlier_limbs(x_outlier)
    ca_p = jnp.concatenate([
        jnp.pad(v, ((0, limbs - m), (0, kp - k))) for v in (ca, *digits)])
    # The epilogue reads `limbs` row scales: no padding (no extra XLA
    # kernel) when M fills them.
    row_p = jnp.pad(row_p, (0, limbs - m))
    args = [ca_p, row_p, cb, scb.astype(jnp.float32),
            jnp.pad(xscale, (0, limbs - m))]
  else:
    ca_p = jnp.pad(ca, ((0, _M_PAD - m), (0, kp - k)))
    args = [ca_p, jnp.pad(row_p, (0, _M_PAD - m)), cb,
            scb.astype(jnp.float32)]
  if outliers:
    xo = jnp.pad(x_outlier.astype(dtype), ((0, _M_PAD - m), (0, kp - k)))
    if outlier_cols is None:
      outlier_cols = jnp.any(x_outlier != 0, axis=0)
    flags = jnp.pad(outlier_cols, (0, kp - k)).reshape(-1, block_k)
    args += [xo, jnp.any(flags, axis=1).astype(jnp.int32)]
  has_bias = bias is not None and split_k == 1
  if has_bias:
    args.append(bias)
  args = _backend.same_vma(*args)
  if split_k == 1:
    out_shape = [_backend.out_struct((m, n), dtype, *args)]
  else:
    out_shape = [_backend.out_struct((split_k, m, n), jnp.int32, *args)]
    if has_outliers:
      out_shape.append(
          _backend.out_struct((split_k, m, n), jnp.float32, *args))
  kernel = functools.partial(
      _kernel, m=m, n=n, k=k, block_n=block_n, block_k=block_k, steps=steps,
      split_k=split_k, outliers=outliers, limbs=limbs, has_bias=has_bias,
      dtype=dtype, skip_clean=skip_clean, interpret=interpret)
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(pl.cdiv(n, block_n), split_k),
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=num_stages),
      interpret=interpret,
      name="jaxbnb_int8_matmul",
      cost_estimate=pl.CostEstimate(
          flops=2 * m * n * k * (2 if has_outliers else 1),
          transcendentals=0,
          bytes_accessed=n * k + 4 * n + m * k * (1 + dtype.itemsize)
          + m * n * dtype.itemsize),
  )(*args)
  if split_k == 1:
    return outs[0]
  acc = jnp.sum(outs[0], axis=0)
  out_acc = jnp.sum(outs[1], axis=0) if has_outliers else None
  return epilogue(acc, row_stats.astype(jnp.float32)[:, None],
                  scb.astype(jnp.float32)[None, :], bias, out_acc, dtype,
                  _xla_exact_add, round_to_float16, round_to_dtype)
