"""Bridges jaxbnb's ops to the Pallas kernels in `pallas_kernels`.

Each function takes `mode`, the resolved kernel mode `dispatch.resolve()`
returns at trace time: "reference" (the pure-jnp reference), "pallas"
(compiled kernels) or "interpret" (Pallas interpret mode). A kernel whose
`can_use` rejects the shape returns None (or runs the reference) after
`dispatch.no_kernel`, the one place that decides whether that is an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _backend
from pallas_kernels import code_tables
from pallas_kernels import dequantize_4bit as dk
from pallas_kernels import gemm_4bit_wgmma as gw
from pallas_kernels import gemv_4bit as gk
from pallas_kernels import gemv_4bit_lut as lg
from pallas_kernels import quantize_4bit as qk
from pallas_kernels import quantize_nested as nk

from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant import reference

# The fused GEMV serves M up to GEMV_ALL_WEIGHTS_M (16-bit x: at 1 the
# table kernel on Hopper for NF4/FP4 + DQ weights of >= 4096 rows and
# groups such as q/k/v, `gemv_4bit.lut_serves`, else "reduce"; at 2 to
# 16 the TMA warp GEMV on Hopper where `gemv_4bit.warp_tma_serves`, else
# "warp" at 2 to 8, "mma" above; `gemv_4bit.default_config`), and up to
# GEMV_MAX_M for 16-bit x and weights of at least GEMV_LARGE_M_MIN_SIZE
# elements; other M dequantizes with the kernel and multiplies with XLA's
# dot (cuBLAS).
# docs/benchmarks.md, "the fused kernel at M = 64-256" (H200): at M = 96
# and 128 the "mma" kernel took 67-73 us on 14336x4096 against 80-87 for
# dequantize + dot, 66-69 against 86-93 on 4096x14336, 30-32 against
# 31-35 on 4096x4096 and 39 against 45-46 on 6144x4096, but 21 against
# 17 on 1024x4096 at M = 128; at M = 256 it lost on every shape.
GEMV_ALL_WEIGHTS_M = 64
GEMV_MAX_M = 128
GEMV_LARGE_M_MIN_SIZE = 4096 * 4096

# Before those (`matmul._forward` asks first), the wgmma GEMM
# (`gemm_4bit_wgmma`, Hopper only) serves GEMM_MIN_M to GEMM_MAX_M rows of
# bf16 x times a blocksize-64 weight of at least GEMM_MIN_N rows.
# docs/benchmarks.md, "4-bit GEMM on wgmma" (H200, NF4 + DQ, `jaxbnb bench
# matmul`): on 14336x4096 it takes 38.7 / 41.8 / 59.2 us at M = 64 / 128 /
# 256 where the paths before it took 48.8 / 67.8 / 95.7; on 11008x4096
# 38.0 / 41.1 / 56.4 against 39.6 / 57.6 / 70.8. With fewer rows too few
# programs fill the GPU: unsplit, it lost on 4096 and 6144 rows.
GEMM_MIN_M = 64
GEMM_MAX_M = 256
GEMM_MIN_N = gw.SPLIT_BELOW_N  # the kernel's own tiles split K below it
# Smaller weights of GEMM_SPLIT_MIN_N rows or more and GEMM_SPLIT_MIN_K
# columns or more go to it up to GEMM_SPLIT_MAX_M rows of x, their K split
# over programs (`gemm_4bit_wgmma.default_config`'s `n`). Seventeenth
# session, sweep run m (H200, NF4 + DQ, the sweep timer): 4096x14336 at M
# = 64 38.2 us against the path before's 51.5 and XLA bf16's 43.1, at M =
# 128 45.5 against 65.8 and 46.3; 4096x4096 20.2 against 29.8 and 23.0 at
# M = 64, 21.6 against 33.1 and 20.0 at 128. Up to M = 256 it also serves
# the weights of at most GEMM_SPLIT_WIDE_MAX_N rows, and down to 1024 rows
# (twenty-second session, sweep runs o and p: 4096x14336 at M = 256 65.0-
# 66.6 us against 86.3-87.0 and XLA's 46.7-49.0, 4096x4096 23.8-26.1
# against 29.6-32.1 and 17.9-19.1; 1024x4096 at M = 64 / 128 / 256 7.3-7.5
# / 9.5 / 12.2 against 9.2-10.8 / 14.2 / 15.1 and XLA's 5.0-6.9 / 9.8 /
# 12.7). Weights of 4097-8192 rows at M = 129-256 take it unsplit, one
# program an SM (twenty-third session, sweep run q: 37.9 us on 6144x4096
# and 39.2 on 8192x4096 against dequantize + dot's 46.0 and 51.3 and XLA
# bf16's 25.1 and 27.3). At every M the split stops where the programs
# would pass one wave of the SMs (run s: 6144x4096 at M = 64 19.2 us
# unsplit against split 2's 24.1 and XLA's 20.6). K of 3584 (Qwen2.5-7B's
# hidden size) takes it too (forty-ninth session, H100, sweep run x:
# 3584x3584 at M = 64 / 128 / 256 13.9 / 19.3 / 21.7 us against the path
# before's 19.5 / 23.4 / 28.7 and XLA bf16's 17.2 / 16.9 / 15.9), and so
# do K = 3072 and 2048 (Llama-3.2-3B and 1B, TinyLlama; fiftieth session,
# H100, `jaxbnb bench matmul`, us, against the path before and XLA bf16:
# 8192x3072 at M = 64 / 128 / 256 14.5 / 21.4 / 28.0 against 25.3 / 31.9
# / 46.2 and 25.7 / 26.7 / 23.9; 3072x3072 10.6 / 13.5 / 19.2 against
# 16.9 / 19.3 / 23.8 and 11.8 / 13.5 / 15.6; 2048x2048 7.0 / 10.0 / 12.1
# against 10.1 / 13.8 / 16.1 and 7.2 / 10.5 / 12.2; faster on all 18
# cases of six weights), and K = 1536 (Qwen2.5-1.5B; same session:
# 8960x1536 at M = 64 / 128 15.3 / 16.8 against 18.8 / 27.8, 1536x1536
# at M = 64 / 128 / 256 6.4 / 8.8 / 10.2 against 8.8 / 9.8 / 12.4). At K =
# 1024 it lost on 2 of 6 cases (4096x1024 at M = 256 12.0 against 10.4,
# 2048x1024 at 128 9.3 against 8.4).
GEMM_SPLIT_MIN_N = 1024
GEMM_SPLIT_MIN_K = 1536
GEMM_SPLIT_MAX_M = gw.SPLIT_MAX_M
GEMM_SPLIT_WIDE_MAX_N = gw.SPLIT_WIDE_MAX_N
# The kernel decodes the double quantization itself (docs/benchmarks.md,
# "wgmma GEMM: the double quantization decoded in the kernel", H200): on
# 14336x4096 that took the two XLA passes' 7.7 us off each call and cost
# the kernel 2.6 us at M = 64, 5.3 at M = 128 (before its steps went to
# 256 columns); `jaxbnb bench matmul`: M = 64 37.7 -> 33.7 us, M = 128
# 43.9 -> 38.4. At M = 129-256 the kernel lost 8.6 us until its steps went
# to 128 columns with the scale words made a step ahead (seventeenth
# session, Nsight Compute: 52.1-52.6 us against 48.6 + 7.6). With a bias
# (a float32 output tile, less shared memory) that form does not fit, so
# there XLA decodes above GEMM_NESTED_BIAS_MAX_M rows.
GEMM_NESTED_BIAS_MAX_M = 128
# Past GEMM_MAX_M, up to GEMM_LARGE_MAX_M rows, the GEMM also serves
# double-quantized weights of GEMM_LARGE_MIN_N rows or more without a
# bias, unsplit ("ws", x's 256-row tile, `gemm_4bit_wgmma.default_config`),
# where x's rows padded to whole 256-row tiles are at most 9/8 of them
# and its programs (128 weight rows by 256 rows of x) fill at least
# GEMM_LARGE_MIN_FILL of the waves of SMs they take (`gemm_large_m`).
# Forty-sixth session (H100, NF4 + DQ, docs/benchmarks.md "The wgmma GEMM
# past M = 256"), sweep run t (the sweep timer), us, against dequantize +
# dot and XLA bf16: 14336x4096 at M = 512 103.7 against 141.9 and 89.2,
# at 1024 206.3 against 209.2 and 168.3; 4096x14336 at 1024 182.3
# against 198.5; 11008x4096 158.4 against 162.1; 4096x4096 53.3 against
# 59.6. At M = 4096 it lost on the two large shapes (809.5 against 733.4
# on 14336x4096, 802.4 against 718.5) and tied on 4096x4096 (218.5
# against 210.7). Its time grows with the padded rows, dequantize +
# dot's with the rows: 300 rows would run as 512. Each program takes
# about the same time, so 64 programs take as long as 132: `jaxbnb bench
# matmul`, same session, us, against dequantize + dot: 4096x14336 at M =
# 512 (64 programs) 169.7 against 129.8, at 768 (96) 175.3 against
# 169.4, at 1024 (128) 185.3 against 200.3; 4096x4096 48.1 / 49.7 / 52.2
# against 41.2 / 49.2 / 59.9; 11008x4096 at 512 (172 programs in two
# waves) 102.0 against 102.9, at 768 (258) 103.1 against 127.6;
# 14336x4096 (224 / 336 / 448) 102.8 / 150.8 / 206.6 against 139.9 /
# 172.9 / 210.2.
GEMM_LARGE_MAX_M = 1024
GEMM_LARGE_MIN_N = 4096
GEMM_LARGE_MIN_FILL = 0.8


def gemm_large_m(m: int, n: int, qs, bias: bool = False) -> bool:
  """Whether M = m past GEMM_MAX_M is in the GEMM's range (above):
  at most GEMM_LARGE_MAX_M rows, padded to 256-row tiles by at most an
  eighth, on a double-quantized weight of GEMM_LARGE_MIN_N rows or more,
  without a bias, its programs filling at least GEMM_LARGE_MIN_FILL of
  their waves of the GPU's SMs (`_backend.num_sms`: 132 on an H100 or
  H200 SXM, 114 on an H100 PCIe). The tiles are the ones
  `gemm` will take (`gemm_4bit_wgmma.default_config`)."""
  cfg = gw.default_config(m, bias, nested=True)
  rows = cfg["tile_w"] * (2 if cfg["variant"] == "ws" else 1)
  tiles = -(-m // cfg["tile_x"])
  programs = n // rows * tiles
  sms = _backend.num_sms()
  waves = -(-programs // sms)
  return (GEMM_MAX_M < m <= GEMM_LARGE_MAX_M
          and 8 * cfg["tile_x"] * tiles <= 9 * m
          and n >= GEMM_LARGE_MIN_N and qs.nested and not bias
          and programs >= GEMM_LARGE_MIN_FILL * waves * sms)


def gemm_serves(m: int, n: int, k: int, dtype, qs, mode: str,
                bias: bool = False) -> bool:
  """Whether `[m, k]` times the 4-bit weight of `qs` (`[n, k]`) goes to
  the wgmma GEMM: M, N and the dtype in its range (above), blocksize 64,
  a kernel mode, and for "pallas" a Hopper GPU and a JAX with Mosaic GPU."""
  if m > GEMM_MAX_M:
    shape_ok = gemm_large_m(m, n, qs, bias)
  else:
    shape_ok = m >= GEMM_MIN_M and (n >= GEMM_MIN_N or (
        GEMM_SPLIT_MIN_N <= n and k >= GEMM_SPLIT_MIN_K
        and (m <= GEMM_SPLIT_MAX_M or n <= GEMM_SPLIT_WIDE_MAX_N)))
  if not (shape_ok
          and qs.blocksize == 64 and jnp.dtype(dtype) == jnp.bfloat16
          and gw.can_use(m, n, k, qs.blocksize, dtype, bias)):
    return False
  if mode == "interpret":
    return True
  return mode == "pallas" and gw.available() and gw.on_hopper()


def gemm_decodes_nested(m: int, qs, bias: bool = False) -> bool:
  """Whether the wgmma GEMM takes `qs`'s double-quantized statistics at M =
  m and decodes them itself (no XLA pass over the absmax before it):
  nested, and without a bias or m at most GEMM_NESTED_BIAS_MAX_M."""
  return qs.nested and (not bias or m <= GEMM_NESTED_BIAS_MAX_M)


def gemm(x2d, packed, qs, absmax, bias, mode):
  """`x2d @ W.T + bias` through the wgmma GEMM (`gemm_serves` holds).
  `absmax`: the float32 absmax (`ops.float_absmax`), or None where
  `gemm_decodes_nested` holds."""
  n, k = qs.shape
  nested = absmax is None
  if nested:
    absmax = (qs.absmax, qs.nested_absmax, qs.nested_code, qs.offset)
  m = x2d.shape[0]
  cfg = gw.default_config(m, bias is not None, k, nested=nested, n=n)
  tail = 0 if bias is not None else gw.tail_rows_for(m, n, k, cfg)
  return gw.gemm(x2d, packed, absmax, code=code(qs.quant_type),
                 n=n, k=k, bias=bias, interpret=mode == "interpret",
                 nested_blocksize=qs.nested_blocksize, tail_rows=tail, **cfg)


def gemv_serves(m: int, n: int, k: int, dtype) -> bool:
  """Whether M rows of `dtype` times a 4-bit `[n, k]` weight (or a group
  of `n` rows in all) go to the fused GEMV rather than dequantize + dot."""
  if m <= GEMV_ALL_WEIGHTS_M:
    return True
  return (m <= GEMV_MAX_M and jnp.dtype(dtype) != jnp.float32
          and n * k >= GEMV_LARGE_M_MIN_SIZE)


def thresholds(quant_type: str) -> tuple[float, ...]:
  """The decision thresholds of the NF4/FP4 quantizer, as kernel constants."""
  if quant_type == "nf4":
    return tuple(float(t) for t in np.asarray(codebooks.NF4_THRESHOLDS))
  t = codebooks.FP4_THRESHOLDS
  return tuple(float(t[f"t{i}"]) for i in range(1, 8))


def code(quant_type: str) -> tuple[float, ...]:
  """The 16 code values as static floats (the GEMV's in-register decode)."""
  return tuple(float(c) for c in codebooks.code_for(quant_type))


def lut(quant_type: str) -> jax.Array:
  """The 16-entry NF4/FP4 code table the kernels take as an input."""
  return jnp.asarray(codebooks.code_for(quant_type), jnp.float32)


def quantize_4bit_flat(flat, blocksize, quant_type, mode, nested=False):
  """(packed uint8, absmax f32) of a flat array; `nested`: the absmax will
  be double-quantized next (the kernel keeps it in L2 for those passes)."""
  if mode != "reference":
    if qk.can_use(flat.shape[0], blocksize, flat.dtype):
      return qk.quantize_4bit(
          flat, blocksize=blocksize, quant_type=quant_type,
          thresholds=thresholds(quant_type), evict=nested,
          interpret=mode == "interpret")
    dispatch.no_kernel(
        f"quantize_4bit of {flat.shape[0]} {flat.dtype} elements")
  return reference.quantize_4bit(flat, blocksize, quant_type)


def quantize_blockwise_flat(flat, code_np, blocksize, mode):
  """(uint8 codes, float32 absmax) of bitsandbytes' 8-bit blockwise
  quantization to the concrete map `code_np` (numpy [256]).

  Each value's code comes from two lookups (`code_tables`, bit-identical to
  the reference's binary search) unless `mode` is "reference" or the map
  has no tables.
  """
  tables = None if mode == "reference" else code_tables.quantize_tables(
      code_np)
  if tables is None:
    codes_fn = None
  else:
    lo, aux = (jnp.asarray(t) for t in tables)

    def codes_fn(x):
      return code_tables.quantize_lut(x, lo, aux).astype(jnp.uint8)
  return reference.quantize_blockwise(flat, jnp.asarray(code_np, jnp.float32),
                                      blocksize, codes_fn)


def quantize_nested_flat(absmax, total, code_np, blocksize, mode,
                         kernel=True):
  """(uint8 codes, float32 absmax, offset) of double quantization's nested
  step: the offset, the mean of `absmax` from its sum `total` (`total *
  nk.mean_factor(n)`, rounded once), then `absmax - offset` quantized
  blockwise to the map `code_np`. One kernel pass that also takes the mean
  outside the "reference" mode, where the map has lookup tables and
  `kernel` is set; else XLA's product and `quantize_blockwise_flat` of the
  difference (the same bytes)."""
  n = absmax.shape[0]
  if mode != "reference" and kernel:
    tables = code_tables.quantize_tables(code_np)
    if tables is not None and nk.can_use(n, blocksize):
      lo, aux = (jnp.asarray(t) for t in tables)
      return nk.quantize_nested(absmax, total, lo, aux, blocksize=blocksize,
                                count=n, interpret=mode == "interpret")
    if tables is not None:
      dispatch.no_kernel(f"nested quantization of {n} values")
  # Rounded before the subtraction (no FMA under jit), as bnb does.
  offset = jax.lax.optimization_barrier(total * nk.mean_factor(n))
  q, nested_absmax = quantize_blockwise_flat(absmax - offset, code_np,
                                             blocksize, mode)
  return q, nested_absmax, offset


def dequantize_4bit_flat(packed, absmax, nested, n, blocksize, quant_type,
                         dtype, nested_blocksize, mode):
  """Flat dequantized array through the kernel.

  `nested` = (nested_absmax, nested code, offset) for a double-quantized
  absmax (then `absmax` holds its uint8 codes), else None.
  """
  return dk.dequantize_4bit(
      packed, absmax, lut(quant_type), numel=n, blocksize=blocksize,
      dtype=jnp.dtype(dtype), nested=nested,
      nested_blocksize=nested_blocksize, interpret=mode == "interpret")


def can_dequantize(n, blocksize, dtype) -> bool:
  """Whether the dequantize kernel serves `n` elements in blocks of
  `blocksize` to `dtype`."""
  return dk.can_use(n, blocksize, dtype)


def nested_of(qs):
  """(nested_absmax, nested code, offset) of a double-quantized state (the
  kernels' `nested` argument), else None."""
  return (qs.nested_absmax, qs.nested_code, qs.offset) if qs.nested else None


# A weight the wgmma GEMM serves with K split stays in a GEMV group up to
# this many rows of x (`can_group`; the GEMV takes groups up to GEMV_MAX_M
# rows). Fifty-first session (H100, `jaxbnb bench decode --impl
# jax-nf4-dq`, 15 reps) against 0 (each such weight alone on the GEMM):
# decode at batch 64 (M = 64) 2.78 / 2.65 ms a step against 2.85 on
# Llama-3.2-1B, 6.16 against 6.33 on 3B; the prefill of 128 tokens (M =
# 128) 4.73 / 4.08 ms against 4.97 on 1B, 12.49 against 10.86 on 3B, a
# spread the prefill's own (3B: 9.02-9.37 ms in another call) covers.
GROUP_KEEPS_SPLIT_MAX_M = 128


def can_group(m, k, dtype, qss, mode=None) -> bool:
  """Whether `gemv_group` serves `[m, k]` times these 4-bit weights in one
  launch: M the GEMV serves (`gemv_serves`, all rows together), one K,
  quantization type, block size and double quantization for all, and no
  weight of GEMM_MIN_N rows or more the wgmma GEMM serves (`gemm_serves`:
  it is faster alone). A smaller weight it would serve with K split (a
  4096 x 4096 q projection beside its k and v) stays in the group up to
  GROUP_KEEPS_SPLIT_MAX_M rows of x (decode at batch 64 measured faster
  with it in the group)."""
  first = qss[0]
  mode = mode or dispatch.resolve()
  if any((q.shape[0] >= GEMM_MIN_N or m > GROUP_KEEPS_SPLIT_MAX_M)
         and gemm_serves(m, q.shape[0], k, dtype, q, mode) for q in qss):
    return False
  return gemv_serves(m, sum(q.shape[0] for q in qss), k, dtype) and all(
      q.shape[1] == k and q.quant_type == first.quant_type
      and q.blocksize == first.blocksize and q.nested == first.nested
      and (not q.nested or q.nested_blocksize == first.nested_blocksize)
      and gk.can_use(m, q.shape[0], k, q.blocksize, dtype) for q in qss)


def gemv_group(x2d, packeds, qss, mode):
  """`[x2d @ W_g.T]` for several 4-bit weights in one GEMV launch (the
  weights pass `can_group`)."""
  k = x2d.shape[1]
  first = qss[0]
  weights = tuple((p, q.absmax, nested_of(q)) for p, q in zip(packeds, qss))
  return gk.gemv_4bit_group(
      x2d, weights, lut(first.quant_type), ns=tuple(q.shape[0] for q in qss),
      k=k, blocksize=first.blocksize,
      nested_blocksize=first.nested_blocksize if first.nested else 256,
      code=code(first.quant_type), interpret=mode == "interpret")


def _lut_weights(packeds, qss):
  """`(packed, codes, nested_absmax, nested_code, offset)` per weight, as
  the table GEMV (`gemv_4bit_lut`) takes double-quantized weights."""
  return [(p, q.absmax, q.nested_absmax, q.nested_code, q.offset)
          for p, q in zip(packeds, qss)]


def norm_serves(m, k, dtype, qss, mode=None) -> bool:
  """Whether `gemv_group_norm` serves `[m, k]` of `dtype`, RMSNorm'd,
  times these weights in one launch: `can_group`'s conditions, NF4/FP4
  double-quantized, and `gemv_4bit.norm_serves` (`NORM_FUSED` on, the
  table GEMV)."""
  mode = mode or dispatch.resolve()
  first = qss[0]
  return (mode != "reference" and first.nested
          and first.quant_type in ("nf4", "fp4")
          and can_group(m, k, dtype, qss, mode)
          and gk.norm_serves(m, tuple(q.shape[0] for q in qss), k,
                             first.blocksize, dtype, True,
                             first.nested_blocksize, code(first.quant_type),
                             interpret=mode == "interpret"))


def gemv_group_norm(x2d, norm_weight, eps, packeds, qss, mode):
  """`[rms_norm(x2d) @ W_g.T]` in x2d's dtype, the norm made in the table
  GEMV's builds (the weights pass `norm_serves`)."""
  k = x2d.shape[1]
  ns = tuple(q.shape[0] for q in qss)
  cfg = lg.group_config(ns, k)
  ys = lg.gemv_group(x2d, _lut_weights(packeds, qss),
                     code=code(qss[0].quant_type), ns=ns, k=k, **cfg,
                     rms_norm=(norm_weight, eps),
                     interpret=mode == "interpret")
  return tuple(y.astype(x2d.dtype) for y in ys)


def swiglu_serves(m, k, dtype, qss, mode=None) -> bool:
  """Whether `swiglu` runs `[m, k]` of `dtype` through a SwiGLU MLP's
  weights `qss` (gate, up, down): gate and up `[n, k]`, down `[n_out,
  n]`, one NF4/FP4 double-quantized format, and the table GEMV serving
  them (`gemv_4bit.swiglu_serves`: `SWIGLU_FUSED` on, one row, Hopper,
  sizes)."""
  mode = mode or dispatch.resolve()
  gate, up, down = qss
  n = gate.shape[0]
  return (mode != "reference" and gate.nested
          and gate.quant_type in ("nf4", "fp4")
          and tuple(gate.shape) == tuple(up.shape) == (n, k)
          and down.shape[1] == n
          and all(q.quant_type == gate.quant_type
                  and q.blocksize == gate.blocksize and q.nested
                  and q.nested_blocksize == gate.nested_blocksize
                  for q in (up, down))
          and gk.swiglu_serves(m, n, k, down.shape[0], gate.blocksize, dtype,
                               True, gate.nested_blocksize,
                               code(gate.quant_type),
                               interpret=mode == "interpret"))


def swiglu(x2d, packeds, qss, mode, rms_norm=None, residual=None):
  """`down(silu(x2d @ gate.T) * (x2d @ up.T))` in x2d's dtype through the
  table GEMV's two launches (`gemv_4bit_lut.gemv_swiglu`: down makes its
  input from gate/up's partials); the weights pass `swiglu_serves` (and,
  with `rms_norm` `(weight, eps)`, x RMSNorm'd first in gate/up's
  builds, `norm_serves` for gate and up). With `residual` (`[1, n_out]`
  in x2d's dtype), `residual + ` that, added with down's partials' sum."""
  gate, _, down = qss
  return lg.gemv_swiglu(x2d, *_lut_weights(packeds, qss),
                        code=code(gate.quant_type), n=gate.shape[0],
                        k=x2d.shape[1], n_out=down.shape[0],
                        rms_norm=rms_norm, residual=residual,
                        interpret=mode == "interpret").astype(x2d.dtype)


def gemv(x2d, packed, qs, bias, mode):
  """`x2d @ W.T + bias` through the fused kernel, or None if it cannot.

  What the GEMV leaves out (M that `gemv_serves` does not take, K not a
  multiple of the blocksize) the caller dequantizes with the dequantize
  kernel and multiplies, so it returns None without `no_kernel` (which
  would raise in "pallas" mode although a kernel serves the product).
  """
  m, k = x2d.shape
  n = qs.shape[0]
  if not gemv_serves(m, n, k, x2d.dtype):
    return None
  if not gk.can_use(m, n, k, qs.blocksize, x2d.dtype):
    return None
  return gk.gemv_4bit(
      x2d, packed, qs.absmax, lut(qs.quant_type), n=n, k=k,
      blocksize=qs.blocksize, nested=nested_of(qs),
      nested_blocksize=qs.nested_blocksize if qs.nested else 256,
      bias=bias, code=code(qs.quant_type), interpret=mode == "interpret")
