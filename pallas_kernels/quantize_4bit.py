"""Blockwise 4-bit (NF4/FP4) quantization kernel, bitsandbytes' format.

One program quantizes `block_rows` quantization blocks: it reads the block
(even and odd elements as two strided halves), takes the fp32 absmax
(NaN ignored), scales by the fp32 reciprocal, maps each value with the
strict-`>` decision thresholds (NF4: by default one lookup of the value's
bucket, its top 12 bits, and one comparison, `bucket_table`; else a tree
whose last two levels read their threshold from a 16-entry table; FP4:
bitsandbytes' tree) and packs two codes per byte, the even element in the
high nibble. The result is bit-identical to jaxbnb's pure-jnp reference
(`jaxbnb._src.quant.reference.quantize_4bit`).

Compiled, the NF4 bucket lookup reads its two tables from shared memory
(`smem`, the default): each program copies them there from an initialized
global array in its PTX, meets at a barrier, and codes each pair of values
with inline PTX (`SMEM_CODES_PTX`). Shared addresses are 32 bits, so the
lookups take fewer instructions than through global memory's 64-bit
pointers; 6% faster on the H200 at 2^28 values (twentieth session).

Compiled, the absmax takes no per-element NaN test: Triton lowers `max`
to `maxnumf`, which returns the other operand of a NaN, as bitsandbytes'
`fmaxf` does; only a block of NaNs gets its -FLT_MAX afterwards. That
took the kernel from 242.7 to 233.4 us on 2^28 bf16 values on the H200
(docs/benchmarks.md, eighteenth session). Interpret mode, where XLA's
`max` returns the NaN, masks NaNs first.
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

__all__ = ["can_use", "quantize_4bit"]

_F32_MAX = float(np.finfo(np.float32).max)


def can_use(numel: int, blocksize: int, dtype) -> bool:
  """Whether the kernel serves this quantization (else use the reference)."""
  return (_backend.available() and numel > 0
          and blocksize >= 32 and blocksize & (blocksize - 1) == 0
          and blocksize <= 4096
          and jnp.dtype(dtype) in (jnp.float32, jnp.float16, jnp.bfloat16))


def _nf4_codes(x, thresholds):
  """Number of the 15 sorted thresholds strictly below x, as a 4-step tree.

  Binary search with strict `>` at each level: the threshold compared at a
  level is picked by selects on the bits found so far (11 selects and 4
  compares instead of 15 compares and adds). NaN compares false: code 0.
  """
  bits = []
  for level in range(4):
    step = 8 >> level
    # Candidate threshold indices for every prefix of earlier bits.
    def pick(prefix_bits, base):
      if len(prefix_bits) == len(bits):
        return thresholds[base + step - 1]
      b = bits[len(prefix_bits)]
      size = 8 >> len(prefix_bits)
      return jnp.where(b, pick(prefix_bits + [1], base + size),
                       pick(prefix_bits + [0], base))
    t = pick([], 0) if bits else thresholds[step - 1]
    bits.append(x > t)
  q = jnp.zeros(x.shape, jnp.int32)
  for level, b in enumerate(bits):
    q = q | (b.astype(jnp.int32) << (3 - level))
  return q


def _nf4_codes_gather(x, thresholds, t_ref):
  """`_nf4_codes` with the last two levels' thresholds gathered from the
  16-entry table `t_ref` (the 15 thresholds, then +inf) instead of chosen
  by selects: two loads in place of ten selects per value. The same
  comparisons, so the same codes."""
  b0 = x > thresholds[7]
  t1 = jnp.where(b0, jnp.float32(thresholds[11]), jnp.float32(thresholds[3]))
  b1 = x > t1
  base = jnp.where(b0, 8, 0) + jnp.where(b1, 4, 0)
  b2 = x > t_ref[base + 1]
  base = base + jnp.where(b2, 2, 0)
  b3 = x > t_ref[base]
  return base + jnp.where(b3, 1, 0)


# `_nf4_codes_bucket`: a float32's top 12 bits (sign, exponent, 3 mantissa
# bits) name its bucket; no NF4 threshold shares a bucket with another.
_BUCKET_SHIFT = 20


@functools.lru_cache(maxsize=None)
def bucket_table(thresholds: tuple[float, ...]) -> np.ndarray:
  """uint8 `[4096]`: per bucket, the count of thresholds strictly below its
  smallest value, for `_nf4_codes_bucket`.

  A bucket holds the float32s sharing their top 12 bits (sign, exponent,
  3 mantissa bits): one contiguous range of values. With at most one
  threshold in each, a value's code is `lo + (x > t[lo])`, `t` the
  thresholds then +inf (the next threshold above the bucket's start: if
  it lies beyond the bucket, no value of the bucket passes it). The
  infinities' buckets hold their codes (+inf: 15, -inf: 0) and the NaNs'
  code 0, as the tree gives them; a signalling NaN, which shares +inf's
  bucket, cannot come out of the kernel's multiply (the product of a NaN
  is quiet). Checked against a count of the thresholds on all 2.1e9
  float32s in [-1, 1] (0 mismatches; not in CI).

  Raises:
    ValueError: thresholds two of which share a bucket (not NF4's).
  """
  t = np.asarray(thresholds, np.float32)
  b = np.arange(1 << (32 - _BUCKET_SHIFT), dtype=np.uint32)
  first = (b << _BUCKET_SHIFT).view(np.float32)
  last = ((b << _BUCKET_SHIFT) | ((1 << _BUCKET_SHIFT) - 1)).view(np.float32)
  neg = (b >> (31 - _BUCKET_SHIFT)) == 1
  low = np.where(neg, last, first)     # the bucket's smallest value
  high = np.where(neg, first, last)    # and its largest
  special = ((b << _BUCKET_SHIFT) & 0x7F800000) == 0x7F800000
  with np.errstate(invalid="ignore"):
    lo = np.sum(t[None, :] < low[:, None], axis=1)
    inside = (t[None, :] >= low[:, None]) & (t[None, :] < high[:, None])
  if np.any(inside[~special].sum(axis=1) > 1):
    raise ValueError("bucket_table: two thresholds share a bucket")
  lo[special] = 0                                   # NaN -> 0, -inf -> 0
  lo[0x7F800000 >> _BUCKET_SHIFT] = len(t)          # +inf -> 15
  return lo.astype(np.uint8)


def _nf4_codes_bucket(x, lo_ref, t_ref):
  """`_nf4_codes` by one lookup of x's bucket (`bucket_table`) and one
  comparison with the next threshold (`t_ref`: the 15 thresholds, then
  +inf). The same strict comparisons, so the same codes. The buckets
  that normalized weights fall in sit in two runs of about 50 bytes, so
  a warp's lookups touch few sectors."""
  idx = jax.lax.bitcast_convert_type(x, jnp.uint32) >> np.uint32(
      _BUCKET_SHIFT)
  lo = lo_ref[idx.astype(jnp.int32)].astype(jnp.int32)
  return lo + jnp.where(x > t_ref[lo], 1, 0)


# `smem`: the bucket table and the 16 thresholds in shared memory, the
# thresholds at this byte offset.
_SMEM_THRESHOLDS = 4096


@functools.lru_cache(maxsize=None)
def smem_fill_ptx(thresholds: tuple[float, ...], threads: int) -> str:
  """Inline PTX: the bucket table and the thresholds (then +inf) as an
  initialized global array, copied into a shared array of the same
  bytes by the program's `threads` threads, 16 bytes a load, then
  `bar.sync 0`. Function-scope declarations (no enclosing braces), so a
  kernel runs it once, outside loops and branches. Operand $0 (out): the
  shared array's address; $1: an unused input (the program id)."""
  lo = bucket_table(thresholds)
  t = np.asarray(list(thresholds) + [np.inf], np.float32)
  words = np.concatenate([lo.view("<u4"), t.view("<u4")])
  chunks = words.size // 4
  init = ", ".join(f"0x{int(w):08x}" for w in words)
  lines = [f".global .align 16 .b32 jaxbnb_q4_g[{words.size}] = {{{init}}};",
           f".shared .align 16 .b32 jaxbnb_q4_s[{words.size}];",
           "{", ".reg .b32 tid, sa, w<4>;", ".reg .b64 ga, off;",
           ".reg .pred p;", "mov.u32 tid, %tid.x;",
           "mul.wide.u32 off, tid, 16;", "mov.u64 ga, jaxbnb_q4_g;",
           "add.u64 ga, ga, off;", "mov.u32 sa, jaxbnb_q4_s;",
           "mad.lo.u32 sa, tid, 16, sa;"]
  for c in range(-(-chunks // threads)):
    guard = ""
    if (c + 1) * threads > chunks:
      lines.append(f"setp.lt.u32 p, tid, {chunks - c * threads};")
      guard = "@p "
    lines += [f"{guard}ld.global.nc.v4.u32 {{w0, w1, w2, w3}}, "
              f"[ga+{16 * c * threads}];",
              f"{guard}st.shared.v4.u32 [sa+{16 * c * threads}], "
              "{w0, w1, w2, w3};"]
  lines += ["bar.sync 0;", "}", "mov.u32 $0, jaxbnb_q4_s;"]
  return "\n".join(lines)


# `smem`'s lookups for an (even, odd) pair: each value's bucket count from
# the shared table, its next threshold, the strict comparison, and the
# packed byte (even in the high nibble). $0: out; $1, $2: the scaled even
# and odd values; $3: the tables' shared address. ptxas folds the shift
# and the address into one LEA.HI, so a value costs a multiply, LEA.HI,
# LDS.U8, LEA, LDS, FSETP and a predicated add, and a pair one IMAD.
SMEM_CODES_PTX = "\n".join(
    ["{", ".reg .b32 i, a, qe, qo;", ".reg .f32 t;", ".reg .pred p;"]
    + [line for q, v in (("qe", "$1"), ("qo", "$2")) for line in (
        f"shr.u32 i, {v}, {_BUCKET_SHIFT};",
        "add.u32 a, i, $3;",
        f"ld.shared.u8 {q}, [a];",
        f"mad.lo.u32 a, {q}, 4, $3;",
        f"ld.shared.f32 t, [a+{_SMEM_THRESHOLDS}];",
        f"setp.gt.f32 p, {v}, t;",
        f"@p add.u32 {q}, {q}, 1;")]
    + ["mad.lo.u32 $0, qe, 16, qo;", "}"])


def _smem_tables(thresholds, threads):
  """The shared tables (`smem_fill_ptx`), filled; their address, int32
  `[1]`."""
  (addr,) = pltriton.elementwise_inline_asm(
      smem_fill_ptx(tuple(thresholds), threads),
      args=[jnp.full((1,), pl.program_id(0), jnp.int32)],
      constraints="=r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])
  return addr


def _nf4_packed_smem(se, so, addr):
  """The packed bytes of `_nf4_codes_bucket(se) << 4 | ..(so)` from the
  shared tables at `addr` (`_smem_tables`): the same lookups and
  comparisons, in shared memory."""
  base = jnp.broadcast_to(addr.reshape(1, 1), se.shape)
  (packed,) = pltriton.elementwise_inline_asm(
      SMEM_CODES_PTX, args=[se, so, base], constraints="=r,r,r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(se.shape, jnp.int32)])
  return packed


def _fp4_codes(x, t):
  # t = (t1, ..., t7) as in bitsandbytes' dQuantizeFP4 tree.
  t1, t2, t3, t4, t5, t6, t7 = t
  sign = jnp.where(x < 0, 8, 0)
  a = jnp.abs(x)
  hi = jnp.where(a > t2, jnp.where(a > t3, 3, 2), jnp.where(a > t4, 5, 4))
  lo = jnp.where(a > t5, jnp.where(a > t6, 7, 6), jnp.where(a > t7, 1, 0))
  return jnp.where(a > t1, hi, lo) + sign


def _unpack_pair(u, in_dtype):
  """fp32 (even, odd) elements of uint32 words holding two 16-bit floats."""
  if in_dtype == jnp.bfloat16:
    even = jax.lax.bitcast_convert_type(u << np.uint32(16), jnp.float32)
    odd = jax.lax.bitcast_convert_type(u & np.uint32(0xFFFF0000),
                                       jnp.float32)
    return even, odd
  lo = (u & np.uint32(0xFFFF)).astype(jnp.uint16)
  hi = (u >> np.uint32(16)).astype(jnp.uint16)
  even = jax.lax.bitcast_convert_type(lo, in_dtype).astype(jnp.float32)
  odd = jax.lax.bitcast_convert_type(hi, in_dtype).astype(jnp.float32)
  return even, odd


def _kernel(x_ref, *refs, nblocks, numel, block_rows, half, quant_type,
            thresholds, load_u32, in_dtype, gather, bucket, max_skips_nan,
            smem_threads, evict):
  if smem_threads:  # before any load: every thread fills and meets
    addr = _smem_tables(thresholds, smem_threads)
  if bucket:
    lo_ref, t_ref, packed_ref, absmax_ref = refs
  elif gather:
    t_ref, packed_ref, absmax_ref = refs
  else:
    packed_ref, absmax_ref = refs
  pid = pl.program_id(0)
  rows = pid * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  row_ok = rows < nblocks
  mask = jnp.broadcast_to(row_ok[:, None], (block_rows, half))
  first = dict(eviction_policy="evict_first") if evict else {}
  if load_u32:  # a pair of 16-bit floats per uint32 word, little-endian
    u = pltriton.load(x_ref, mask=mask, other=0, **first)
    xe, xo = _unpack_pair(u, in_dtype)
  else:
    xe = pltriton.load(x_ref.at[:, :, zero_index()], mask=mask, other=0)
    xo = pltriton.load(x_ref.at[:, :, one_index()], mask=mask, other=0)
    xe = xe.astype(jnp.float32)
    xo = xo.astype(jnp.float32)
  if numel is not None:  # a partial last block: mask the padding
    idx = rows[:, None] * (2 * half) + 2 * jnp.arange(half, dtype=jnp.int32)
    ok_e = idx < numel
    ok_o = idx + 1 < numel
  neg = jnp.float32(-_F32_MAX)
  ae = jnp.abs(xe)
  ao = jnp.abs(xo)
  if not max_skips_nan:  # interpret mode: XLA's `max` returns the NaN
    ae = jnp.where(ae != ae, neg, ae)
    ao = jnp.where(ao != ao, neg, ao)
  if numel is not None:
    ae = jnp.where(ok_e, ae, neg)
    ao = jnp.where(ok_o, ao, neg)
  absmax = jnp.maximum(jnp.max(ae, axis=1), jnp.max(ao, axis=1))
  if max_skips_nan:  # a block of NaNs: -FLT_MAX, as bitsandbytes
    absmax = jnp.where(absmax != absmax, neg, absmax)
  recip = jnp.float32(1.0) / absmax
  se = xe * recip[:, None]
  so = xo * recip[:, None]
  if numel is not None:
    se = jnp.where(ok_e, se, 0.0)
    so = jnp.where(ok_o, so, 0.0)
  if smem_threads:
    packed = _nf4_packed_smem(se, so, addr)
  else:
    if bucket:
      qe = _nf4_codes_bucket(se, lo_ref, t_ref)
      qo = _nf4_codes_bucket(so, lo_ref, t_ref)
    elif quant_type == "nf4" and gather:
      qe = _nf4_codes_gather(se, thresholds, t_ref)
      qo = _nf4_codes_gather(so, thresholds, t_ref)
    elif quant_type == "nf4":
      qe, qo = _nf4_codes(se, thresholds), _nf4_codes(so, thresholds)
    else:
      qe, qo = _fp4_codes(se, thresholds), _fp4_codes(so, thresholds)
    packed = (qe << 4) | qo
  pltriton.store(packed_ref, packed.astype(jnp.uint8), mask=mask, **first)
  pltriton.store(absmax_ref, absmax, mask=row_ok,
                 **(dict(eviction_policy="evict_last") if evict else {}))


@functools.partial(
    jax.jit,
    static_argnames=("blocksize", "quant_type", "thresholds", "block_rows",
                     "num_warps", "load_u32", "gather", "bucket",
                     "smem", "evict", "interpret"))
def quantize_4bit(
    flat: jax.Array,
    *,
    blocksize: int,
    quant_type: str,
    thresholds: tuple[float, ...],
    block_rows: int | None = None,
    num_warps: int | None = None,
    load_u32: bool | None = None,
    gather: bool = True,
    bucket: bool = True,
    smem: bool = True,
    evict: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Quantizes a flat float array in blocks of `blocksize`.

  Args:
    flat: 1-D float32/float16/bfloat16 array of n elements.
    blocksize: elements per absmax block (a power of two, 32..4096).
    quant_type: "nf4" or "fp4".
    thresholds: NF4: the 15 sorted fp32 decision thresholds; FP4: the seven
      thresholds t1..t7 of bitsandbytes' FP4 tree (as Python floats holding
      fp32 values).
    block_rows: quantization blocks per program (power of two); default
      8,192 values a program (at most 128 blocks) with `smem`, else 4,096
      (at most 64 blocks).
    num_warps: Triton warps per program; default 16 with `smem`, 8 for
      the NF4 bucket lookup from global memory (2^28 bf16 values on the
      H200: 285.9 us against 299.7 with 4), else 4.
    load_u32: read 16-bit inputs as uint32 pairs (contiguous loads);
      default True for float16/bfloat16.
    gather: NF4 with `bucket=False` only: the decision tree's last two
      levels load their thresholds from a 16-entry table instead of
      selecting them (two loads per value in place of ten selects; the
      same codes). Measured on the H200, 2^28 bf16 values: 467.5 against
      559.0 us per call (host-timed, docs/benchmarks.md).
    bucket: NF4 only, in place of the tree (the default): each value's
      code from one lookup by its top 12 bits (`bucket_table`) and one
      comparison. Measured on the H200, 2^28 bf16 values, 64 blocks per
      program: 285.9 us against 389.7 for the gathering tree (under ncu
      at 2^26: 32% fewer instructions, 62.2 against 84.4 us).
    smem: NF4 bucket lookup compiled only (the default): the tables
      copied into shared memory once a program (`smem_fill_ptx`) and each
      pair of values coded by inline PTX from there (`SMEM_CODES_PTX`:
      32-bit shared addresses in place of 64-bit global ones); the same
      codes. Measured on the H200 (twentieth session), 128 blocks of 64
      and 16 warps a program: 199 us under ncu at 2^28 bf16 values
      against 212 from global memory (10% fewer instructions), 46.2
      against 49.9 on 14336x4096. Ignored in interpret mode.
    evict: L2 hints: the input read and the codes stored `evict_first`,
      the absmax stored `evict_last`, so that the absmax is still in L2
      for double quantization's passes over it (`F.quantize_4bit` sets it
      with `compress_statistics`). The same bytes. Measured on the H200
      (twenty-first session): quantize + DQ of 2^28 bf16 values 1.7-3.9
      us faster; within the spread on 14336x4096 and at 2^24, and no
      change without DQ. Ignored in interpret mode.
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    (packed uint8 [(n + 1) // 2], absmax float32 [ceil(n / blocksize)]).
  """
  n = flat.shape[0]
  nblocks = -(-n // blocksize)
  half = blocksize // 2
  shared = smem and bucket and quant_type == "nf4" and not interpret
  if block_rows is None:
    block_rows = max(1, min(128, 8192 // blocksize) if shared
                     else min(64, 4096 // blocksize))
  if num_warps is None:
    num_warps = 16 if shared else 8 if bucket and quant_type == "nf4" else 4
  padded = nblocks * blocksize
  if padded != n:
    flat = jnp.pad(flat, (0, padded - n))
  in_dtype = jnp.dtype(flat.dtype)
  if load_u32 is None:
    load_u32 = in_dtype.itemsize == 2
  if load_u32:
    x3 = jax.lax.bitcast_convert_type(flat.reshape(nblocks, half, 2),
                                      jnp.uint32)
    spec = pl.BlockSpec((block_rows, half), lambda i: (i, 0))
  else:
    x3 = flat.reshape(nblocks, half, 2)
    spec = pl.BlockSpec((block_rows, half, 2), lambda i: (i, 0, 0))
  grid = (pl.cdiv(nblocks, block_rows),)
  (x3,) = _backend.same_vma(x3)
  kernel = functools.partial(
      _kernel, nblocks=nblocks, numel=None if padded == n else n,
      block_rows=block_rows, half=half, quant_type=quant_type,
      thresholds=thresholds, load_u32=load_u32, in_dtype=in_dtype,
      gather=gather and quant_type == "nf4",
      bucket=bucket and quant_type == "nf4", max_skips_nan=not interpret,
      smem_threads=32 * num_warps if shared else 0,
      evict=evict and not interpret)
  args, in_specs = [x3], [spec]
  if bucket and quant_type == "nf4":
    lo = bucket_table(tuple(thresholds))
    args.append(jnp.asarray(lo))
    in_specs.append(pl.BlockSpec(lo.shape, lambda i: (0,)))
  if (gather or bucket) and quant_type == "nf4":
    table = jnp.asarray(list(thresholds) + [float("inf")], jnp.float32)
    args.append(table)
    in_specs.append(pl.BlockSpec((16,), lambda i: (0,)))
  args = _backend.same_vma(*args)
  packed, absmax = pl.pallas_call(
      kernel,
      out_shape=(_backend.out_struct((nblocks, half), jnp.uint8, x3),
                 _backend.out_struct((nblocks,), jnp.float32, x3)),
      grid=grid,
      in_specs=in_specs,
      out_specs=(pl.BlockSpec((block_rows, half), lambda i: (i, 0)),
                 pl.BlockSpec((block_rows,), lambda i: (i,))),
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=2),
      interpret=interpret,
      name=f"jaxbnb_quantize_{quant_type}",
      cost_estimate=pl.CostEstimate(
          flops=20 * padded, transcendentals=0,
          bytes_accessed=padded * flat.dtype.itemsize + padded // 2
          + 4 * nblocks),
  )(*args)
  packed = packed.reshape(-1)
  if padded != n:
    packed = packed[:(n + 1) // 2]
  return packed, absmax
