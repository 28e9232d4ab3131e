"""The 4-bit GEMV at M = 2..16 on a TMA pipeline, through the warp's MMA.

The "warp" kernel (`warp_mma`, Triton) decodes each thread's bytes in
registers and feeds them to `mma.sync.m16n8k16`; it is latency-bound,
with one or two steps of loads in flight (docs/benchmarks.md, fifth
session). Here the same values and product run on the table GEMV's
pipeline (`gemv_4bit_lut`): a TMA warpgroup streams the weight and absmax
code tiles into shared memory, several steps ahead, while two compute
warpgroups take them.

* Grid: `(row groups, K chunks)`, as `gemv_4bit_lut`: a program owns a
  chunk of 256 columns (128 bytes a row, four blocks of 64) and a group
  of rows, brought in steps of 128 rows (64 a compute warpgroup, 16 a
  warp) with their `[rows, 16]` absmax code tiles.
* Before the pipeline the compute threads copy the chunk of x (`[M, 256]`)
  to shared memory, a row of x at 576 bytes and each block of it at 144
  (16 bytes of padding, so the warp's 16-byte loads hit distinct banks),
  with the nested codes and the program's span of nested absmax. Up to
  `EARLY_MAX_M` rows of x the TMA warpgroup does not wait for them: it
  branches past the build, so its first copies go out meanwhile.
* A warp's 16 rows are the MMA's A: lane `4 g + c` holds block `c` of rows
  `g` and `g + 8` (8 words each). Word `i` of row g and of row g + 8,
  decoded into the values times the block's absmax (rounded once to x's
  dtype; the decode below), give two MMAs: bytes 0-1, then
  2-3. x is B: lane `4 g' + c` gives `x[g' % M]` at the columns of the
  same bytes of block c (every lane with equal `c` holds the same byte
  positions of its rows), so the MMA's column n is row `n % M` of x.
* The 16 MMAs of a step accumulate in fp32; column `n < M` of the result
  is the chunk's partial of `y[n]`, stored to `[chunks, M, rows]`. XLA
  sums the chunks (`split_sum.sum_splits`). From 9 rows of x the same
  decoded words go to a second pair of MMAs a word, whose B is rows
  `8 + g' % (M - 8)`: M = 9..16 costs 16 more MMAs a step, not a second
  decode. The default (`gemv_4bit.warp_tma_serves`) takes M = 8..16 for
  every weight and group, M = 2..7 for single weights with a side of
  8192, and with k of 4096 for single weights of 4096 rows and groups of
  8192-row weights (gate/up).
* The decode ("lds", the default): a 32 KiB table in shared memory
  holds each byte value's pair of codes, 32 copies (lane l reads copy l,
  so a warp's lookups never share a bank), written by the compute threads
  before the pipeline. A byte costs a permute (to take it out of its
  word), a multiply-add (its entry's address), the shared load and the
  packed multiply by the absmax: 16 instructions a word of eight
  weights against the permutes' 26 ("prmt", `lut_decode`, by config),
  most of those on the ALU pipe. Same values. On the H100 (fortieth
  session) 14336x4096 at M = 16 takes 21.9 us against 24.3, the gate/up
  pair at M = 8 31.2 against 39.9, and the 8B decode at batch 8 runs
  2,466 tokens/s against 2,135.

The per-thread work is inline PTX (`plgpu.inline_mgpu`). `interpret=True`
runs a jnp twin: the same values (code and absmax rounded to x's dtype,
their product rounded once), the fp32 sums in another order.
"""

from __future__ import annotations

import functools
import heapq

import jax
import jax.numpy as jnp

from jax import lax

from pallas_kernels import _backend
from pallas_kernels import lowering
from pallas_kernels import gemv_4bit_lut as lut
from pallas_kernels import lut_decode
from pallas_kernels.dequantize_4bit import decode_absmax
from pallas_kernels.split_sum import sum_splits

try:  # pragma: no cover - depends on the installed JAX
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  pass

__all__ = ["DECODES", "EARLY_MAX_M", "EARLY_SMALL_ELEMENTS", "KCHUNKS",
           "MAX_M", "available", "build_ptx", "check", "default_config",
           "gemv", "gemv_group", "makespan", "skips_build", "smem_bytes",
           "step_ptx"]

CHUNK = lut.CHUNK  # columns of x (and of W) a program: 128 bytes a row
STEP_ROWS = 64  # rows a compute warpgroup a step: 4 warps x 16
WGS = 2  # compute warpgroups beside the TMA one, by default (2 or 3)
MAX_M = 16  # rows of x: two MMAs of 8 columns from 9 rows on
KCHUNKS = (1, 2, 4)  # K chunks a program can take in turn
DECODES = ("prmt", "lds")  # byte permutes, or a shared-memory table
DECODE = "lds"  # the default decode (fortieth session, measured faster)
# K chunks a program by default for a launch of two weights (a gate/up
# pair), by K; 1 elsewhere. Fifty-second session (H100, the 8B decode,
# `jaxbnb bench decode --impl jax-nf4-dq`, 3 reps, two rounds): at K =
# 4096, 2 chunks halve the fp32 partials `silu(gate) * up` reads (14.7 MB
# at batch 8: that XLA kernel 3.6 us against 5.4 a layer): batch 8
# 2,512 / 2,517 tokens/s against 2,473 / 2,490 / 2,484, batch 16 4,096
# against 3,911 / 3,906. Two chunks for every K = 4096 launch (q/k/v and
# o as well) made those slower (4-layer profiles, same call).
PAIR_KCHUNKS = {4096: 2}
# Rows of x up to which the TMA warpgroup branches past the build and the
# compute threads meet at named barrier 15 instead of a barrier of every
# thread (`build_ptx`'s `early`), so that, with the pipeline allocated
# first (`gemv_4bit_lut.ALLOC_FIRST`), the first copies go out while x is
# copied; 0 turns it off, `MAX_M` puts it on for every launch. Fifty-fifth
# session (H100, `jaxbnb bench matmul`, 20 reps, two rounds each, the
# table GEMV's loads first as well): M = 4 and 8 0.1-1.2 us faster on
# 14336x4096, 4096x4096, 4096x14336 and 1024x4096 (4096x4096 at M = 8:
# 8.12 / 8.35 us against 9.30 / 9.30); M = 16 0.1-0.6 us slower on
# 14336x4096 and 4096x14336 (22.45 / 22.74 against 22.34 / 22.06), even
# on 4096x4096, 0.7 us faster on 1024x4096. The 8B decode at batch 8
# (`jaxbnb bench decode`, 3 reps): 2,571.6 / 2,574.5 tokens/s against
# 2,506.0 in the same call.
EARLY_MAX_M = 8
# Past `EARLY_MAX_M`, up to `MAX_M` rows, launches whose weights hold at
# most this many elements together branch past the build as well:
# 1024x4096 at M = 16 took 5.13 us against 5.78 (fifty-seventh session,
# H100, two rounds; 0.7 us faster in the fifty-fifth too), where
# 4096x4096 was even and the larger weights slower. Fifty-ninth session
# (H100, 20 reps, two rounds, M = 12 / 16): 2048x2048 5.74-5.85 us
# against 6.35-6.50, and past the old bound of 1024 x 4096 elements
# 3072x2048, 1536x4096 and 2048x4096 0.2-0.6 us faster (2048x4096 7.38-
# 7.59 against 8.00-8.19), 4096x4096 up to 0.2 us slower; and on an H200
# (one round, M = 16) 3072x3072 7.80 against 8.16 and 3072x4096 8.19
# against 8.58. So the bound is 3072 x 4096; 4096x4096 stays out. 0 turns
# it off.
EARLY_SMALL_ELEMENTS = 3072 * 4096


def skips_build(m: int, ns: tuple[int, ...], k: int) -> bool:
  """Whether a launch of `m` rows of x over weights of `ns` rows and `k`
  columns has its TMA warpgroup branch past the build (`EARLY_MAX_M`,
  `EARLY_SMALL_ELEMENTS`).

  Example:
    >>> from pallas_kernels.gemv_4bit_warp_tma import skips_build
    >>> skips_build(16, (1024,), 4096), skips_build(16, (4096,), 4096)
    (True, False)
  """
  return m <= EARLY_MAX_M or (m <= MAX_M
                              and sum(ns) * k <= EARLY_SMALL_ELEMENTS)


_CODES = 16  # absmax codes a row in the codes tile
_XBLOCK = 144  # bytes a block of x in shared memory: 128 + 16 of padding
_XROW = 4 * _XBLOCK  # bytes a row of x
_LDS_BYTES = 256 * 32 * 4  # the "lds" table: 256 entries, 32 copies
_LDS_ROWS = -(-_LDS_BYTES // _XROW)  # its rows of the kernel's own scratch
_MMA = {"bfloat16": "bf16", "float16": "f16"}


def available() -> bool:
  """Whether this JAX has the Mosaic GPU pieces the kernel uses."""
  return lut.available()


def check(m: int, n: int, k: int, blocksize: int, dtype, nested: bool,
          nested_blocksize: int = 256) -> None:
  """Raises ValueError naming the argument this kernel cannot take."""
  dtype = jnp.dtype(dtype)
  if not 2 <= m <= MAX_M:
    raise ValueError(f"x: the TMA warp GEMV takes 2 to {MAX_M} rows, got {m}")
  if not nested or nested_blocksize != 256:
    raise ValueError(
        "absmax: the TMA warp GEMV needs double-quantized weights with 256 "
        "codes per nested absmax, got "
        + ("plain float32 absmax" if not nested else
           f"nested_blocksize {nested_blocksize}"))
  if blocksize != 64:
    raise ValueError(f"blocksize: the TMA warp GEMV needs 64, got "
                     f"{blocksize}")
  if dtype.name not in _MMA:
    raise ValueError(f"x: the TMA warp GEMV needs bfloat16 or float16, got "
                     f"{dtype.name}")
  if k % CHUNK:
    raise ValueError(f"k: the TMA warp GEMV needs a multiple of {CHUNK} "
                     f"(its K chunks), got {k}")
  if n < 1:
    raise ValueError(f"n: must be >= 1, got {n}")


def x_rows(m: int) -> int:
  """Rows of x's copy in shared memory: 8, or 16 from 9 rows of x."""
  return 8 if m <= 8 else 16


def x_bytes(m: int, kchunks: int = 1) -> int:
  """Bytes of x's copy in the kernel's own scratch; the "lds" decode's
  table follows it."""
  return kchunks * x_rows(m) * _XROW


def own_rows(m: int, kchunks: int, decode: str) -> int:
  """Rows (of 576 bytes) of the kernel's own scratch: x's copy, then for
  the "lds" decode its 32 KiB table."""
  return kchunks * x_rows(m) + (decode == "lds") * _LDS_ROWS


def smem_bytes(ns: tuple[int, ...], k: int, rows: tuple[int, ...],
               stages: int, m: int = 8, wgs: int = WGS,
               kchunks: int = 1, decode: str | None = None) -> int:
  """Shared memory of a config: x's chunks (and the "lds" table), the
  nested table and span, the step counters, the accumulators between
  steps (`kchunks` > 1) and the pipeline's weight and codes tiles
  (`decode`: by default `DECODE`)."""
  decode = DECODE if decode is None else decode
  tile = STEP_ROWS * wgs
  span = max(lut.layout(n, k, r, tile, 4 * kchunks)[2]
             for n, r in zip(ns, rows))
  accs = (kchunks > 1) * (1 + (m > 8)) * 128 * wgs * 16
  return (own_rows(m, kchunks, decode) * _XROW + 512 * 4 + span * 4
          + wgs * 512
          + accs + stages * tile * (CHUNK // 2 + _CODES))


def default_config(ns: tuple[int, ...], k: int, num_sms: int | None = None,
                   kchunks: int | None = None, decode: str | None = None
                   ) -> dict:
  """`gemv_group`'s keywords: one program an SM (as `gemv_4bit_lut`'s row
  groups, `kchunks` K chunks a program: up to `num_sms / (k / 256 /
  kchunks)` groups, shared among the weights in proportion to their rows
  and rounded, one at least a weight: of the shares from that count
  down, the one whose groups end soonest by `makespan`, the largest on a
  tie) and four steps in flight; fewer stages, then more row groups,
  where the shared memory would not hold that for 16 rows of x (a long
  program's span of nested absmax: 28672x28672, say), with `decode`'s
  table if it has one (`decode`: by default `DECODE`). `kchunks` None:
  `PAIR_KCHUNKS[k]` for two weights (a gate/up pair), else 1."""
  decode = DECODE if decode is None else decode
  if kchunks is None:
    kchunks = PAIR_KCHUNKS.get(k, 1) if len(ns) == 2 else 1
  if num_sms is None:
    num_sms = _backend.num_sms()
  programs = k // CHUNK // kchunks
  total = max(1, min(num_sms // programs, -(-sum(ns) // STEP_ROWS)))
  share = min(range(total, 0, -1), key=lambda t: makespan(
      ns, [max(1, round(t * n / sum(ns))) for n in ns], k, kchunks,
      num_sms))
  rows, stages = lut.fit(
      tuple(ns), share, 4,
      functools.partial(smem_bytes, tuple(ns), k, m=MAX_M, kchunks=kchunks,
                        decode=decode))
  return dict(rows=rows, stages=stages, kchunks=kchunks, decode=decode)


def makespan(ns, rows, k: int, kchunks: int = 1, num_sms: int | None = None,
             start: int = 1) -> int:
  """Pipeline steps until the last program ends, programs taken in launch
  order (K chunks fastest) by the first free SM: weight g's row groups
  take `ceil(tiles / rows[g]) * kchunks` steps each, plus `start` for the
  build and the pipeline's fill. A model of the wave, not a timing: a
  group's shares rounded up to a few more programs than SMs (q/k/v at 2
  K chunks a program: 136 on 132 SMs, 19.2 us against 15.5 with 112 in
  docs/benchmarks.md's run "e") cost a second wave."""
  if num_sms is None:
    num_sms = _backend.num_sms()
  free = [0] * num_sms
  for n, r in zip(ns, rows):
    steps = -(-(-(-n // (STEP_ROWS * WGS))) // r) * kchunks + start
    for _ in range(r * (k // CHUNK // kchunks)):
      heapq.heapreplace(free, free[0] + steps)
  return max(free)


@functools.lru_cache(maxsize=None)
def build_ptx(code: tuple[float, ...], dtype_name: str, m: int, n: int,
              k: int, rows_a_program: int, span: int, n_nested: int,
              group0: int = 0, wgs: int = WGS, kchunks: int = 1,
              decode: str = DECODE, early: bool = False) -> str:
  """x's chunk, the nested code table, the program's span of nested
  absmax and the step counters, copied by the compute threads; then a
  barrier of every thread of the program.

  Operands: `$0` x's shared copy, `$1` the nested table's (`[256]` codes,
  then the offset at byte 1024 and, from byte 1056, `lut_decode`'s
  permute words 0, 2, 4 and 6 once for each lane: a step loads them, so
  they sit in ordinary registers; as immediates, or loaded by every lane
  from one address, `ptxas` keeps them in uniform registers and copies
  one before every permute), `$2` the span's, `$3` the step counters' (one a
  compute thread); `$4` x's global address (`[m, k]`), `$5` the nested
  codes' (256 floats), `$6` the nested absmax's, `$7` the offset's. Every
  global load comes first. The program's `kchunks` chunks of x (from
  chunk `kchunks %ctaid.x`) are copied one after another, `x_rows(m)`
  rows of 576 bytes each: word `u` (word `e = u % 128` of chunk
  `q = u / 128 % kchunks` of row `a = u / (128 kchunks)`) goes to
  `576 (x_rows q + a) + 144 (e / 32) + 4 (e % 32)`. The TMA warpgroup's
  threads load and store nothing.

  With the "lds" decode, thread `t < 256` also writes the table after x's
  copy (`x_bytes`): byte value t's pair of codes (`lut_decode`'s permutes
  on t, times 1), 32 copies, copy l at word `32 t + l`, so that lane l of
  a step reads its own bank. The thread's eight 16-byte stores go to
  copies `4 ((i + t) % 8)` onward, so a quarter-warp's stores meet
  distinct banks.

  With `early`, the TMA warpgroup's threads branch past the block and
  the compute threads meet at named barrier 15 instead.
  """
  loads = span // 128
  lk = kchunks.bit_length() - 1
  # words of x a compute thread
  words = -(-m * 128 * kchunks // (128 * wgs))
  lines = [
      "{",
      ".reg .b32 t, c, a, b, q, e;",
      f".reg .b32 xw<{words}>, xa<{words}>;",
      f".reg .f32 g<{loads + 3}>;",
      ".reg .b64 px, pc, pf, d;",
      f".reg .pred pw, pt, p0, px<{words}>;",
      "mov.u32 t, %tid.x;", f"setp.lt.u32 pw, t, {128 * wgs};",
  ]
  if early:
    lines += ["@!pw bra WT_BUILT;"]
  lines += [
      "and.b32 c, t, 127;",
      "setp.lt.u32 pt, t, 128;", "setp.eq.u32 p0, t, 0;",
      "cvta.to.global.u64 px, $4;",
  ]
  # Mosaic GPU reverses the grid: ctaid.x is the K chunk.
  for j in range(words):
    lines += [f"add.u32 q, t, {128 * wgs * j};",
              f"setp.lt.u32 px{j}, q, {128 * m * kchunks};",
              f"and.pred px{j}, px{j}, pw;",
              f"shr.u32 a, q, {7 + lk};", "and.b32 e, q, 127;",
              # q: the chunk of the program's, c: of x
              "shr.u32 q, q, 7;", f"and.b32 q, q, {kchunks - 1};",
              "mov.u32 c, %ctaid.x;", f"mad.lo.u32 c, c, {kchunks}, q;",
              # global word: row a, column 256 c + 2 e
              f"mul.lo.u32 b, a, {k // 2};",
              "mad.lo.u32 b, c, 128, b;", "add.u32 b, b, e;",
              "mul.wide.u32 d, b, 4;", "add.u64 d, d, px;",
              f"@px{j} ld.global.nc.b32 xw{j}, [d];",
              # shared: 576 (x_rows q + a) + 144 (e >> 5) + 4 (e & 31)
              f"mad.lo.u32 a, q, {x_rows(m)}, a;",
              f"mul.lo.u32 b, a, {_XROW};", "shr.u32 q, e, 5;",
              f"mad.lo.u32 b, q, {_XBLOCK}, b;", "and.b32 q, e, 31;",
              "mad.lo.u32 b, q, 4, b;", f"add.u32 xa{j}, b, $0;"]
  lines += [
      "and.b32 c, t, 127;",
      "cvta.to.global.u64 pc, $5;", "mul.wide.u32 d, c, 4;",
      "add.u64 pc, pc, d;", "@pt ld.global.nc.f32 g0, [pc];",
      "@pt ld.global.nc.f32 g1, [pc+512];", "cvta.to.global.u64 pf, $7;",
      "@p0 ld.global.nc.f32 g2, [pf];",
  ]
  lut.span_start(lines, n, rows_a_program, k // 64, group0, 4 * kchunks)
  lines += ["add.u32 a, a, c;", "cvta.to.global.u64 pc, $6;"]
  for j in range(loads):
    lines += [f"add.u32 q, a, {128 * j};", f"min.u32 q, q, {n_nested - 1};",
              "mul.wide.u32 d, q, 4;", "add.u64 d, d, pc;",
              f"@pt ld.global.nc.f32 g{3 + j}, [d];"]
  lines += [f"@px{j} st.shared.b32 [xa{j}], xw{j};" for j in range(words)]
  # Thread t < 128 stores permute word 2 (t % 4) at byte 1056 + 4 t: a
  # copy of the four for each lane.
  words = lut_decode.table_words(code, jnp.dtype(dtype_name))
  lines += ["and.b32 q, t, 3;", f"mov.b32 e, 0x{words[0]:08x};"]
  for j in range(1, 4):
    lines += [f"setp.eq.u32 p0, q, {j};",
              f"@p0 mov.b32 e, 0x{words[2 * j]:08x};"]
  lines += ["shl.b32 a, c, 2;", "add.u32 a, a, $1;",
            "@pt st.shared.b32 [a+1056], e;", "setp.eq.u32 p0, t, 0;"]
  lines += ["shl.b32 a, c, 2;", "add.u32 a, a, $1;",
            "@pt st.shared.f32 [a], g0;", "@pt st.shared.f32 [a+512], g1;",
            "@p0 st.shared.f32 [a+1024], g2;",
            "shl.b32 a, t, 2;", "add.u32 a, a, $3;",
            "@pw st.shared.u32 [a], 0;",
            "shl.b32 b, c, 2;", "add.u32 b, b, $2;"]
  lines += [f"@pt st.shared.f32 [b+{512 * j}], g{3 + j};"
            for j in range(loads)]
  if decode == "lds":
    lines += _lds_fill(code, dtype_name, x_bytes(m, kchunks))
  if early:
    lines += ["WT_BUILT:", f"@pw bar.sync 15, {128 * wgs};", "}"]
  else:
    lines += ["bar.sync 0;", "}"]
  return "\n".join(lines)


def _lds_fill(code, dtype_name: str, table: int) -> list[str]:
  """`build_ptx`'s lines writing the "lds" table at byte `table` of `$0`:
  thread t < 256 decodes byte value t with `lut_decode`'s permutes (its
  scale 1, so its pair is the code values themselves) and stores it 32
  times."""
  words = lut_decode.table_words(code, jnp.dtype(dtype_name))
  one = {"bfloat16": 0x3F803F80, "float16": 0x3C003C00}[dtype_name]
  names = {"w": "t", **{f"s{j}": "fo" for j in range(4)},
           **{f"t{i}": f"fw{i}" for i in range(8)},
           **{f"o{j}": f"fv{j}" for j in range(4)}}
  decl, body = lut_decode.render(code, dtype_name, names, prefix="f_")
  lines = ["{", decl, ".reg .b32 fo, fa, fq, fw<8>, fv<4>;", ".reg .pred pf;",
           "mov.u32 t, %tid.x;", "setp.lt.u32 pf, t, 256;",
           f"mov.b32 fo, 0x{one:08x};"]
  lines += [f"mov.b32 fw{i}, 0x{w:08x};" for i, w in enumerate(words)]
  lines += body
  lines += ["shl.b32 fa, t, 7;", "add.u32 fa, fa, $0;"]
  for i in range(8):
    lines += [f"add.u32 fq, t, {i};", "and.b32 fq, fq, 7;",
              "shl.b32 fq, fq, 4;", "add.u32 fq, fq, fa;",
              f"@pf st.shared.v4.b32 [fq+{table}], {{fv0, fv0, fv0, fv0}};"]
  return lines + ["}"]


@functools.lru_cache(maxsize=None)
def step_ptx(code: tuple[float, ...], dtype_name: str, m: int, n: int,
             k: int, steps: int, n_pad: int, group0: int = 0,
             row0: int = 0, wgs: int = WGS, kchunks: int = 1,
             decode: str = DECODE) -> str:
  """One pipeline step of one compute thread: its warp's 16 rows of the
  step's 128-row tile (warp `tid / 32`), all 256 columns of the chunk.

  Operands (no results): `$0` the weight tile's shared address
  (`[128, 128]` bytes), `$1` the codes tile's (`[128, 16]`), `$2` x's
  shared copy, `$3` the nested table's, `$4` the nested span's, `$5` the
  step counters'; `$6` the output (global, fp32 `[chunks / kchunks, m,
  n_pad]`). In a group of weights, this weight's row groups start at
  `group0` and its rows at output row `row0`.

  With `kchunks` > 1 a program's step `t` takes chunk `t % kchunks` of its
  own (x's copy of it, `x_rows(m)` rows further a chunk) for row tile
  `t / kchunks`: the first starts the accumulators at zero, the others
  load them from `$6` (shared, 16 bytes a thread for columns 0-7, then as
  many for 8-15), all but the last store them there, and the last stores
  the row tile's partial to the output, now `$7`.

  The decode is `lut_decode`'s permutes ("prmt"), or ("lds") for each
  byte: a permute to take it out of its word, a multiply-add for its
  entry's address in `build_ptx`'s table (the lane's own copy), the
  shared load of its pair of codes and the packed multiply by the
  block's absmax: the same values.
  """
  lk = kchunks.bit_length() - 1
  out = "$7" if kchunks > 1 else "$6"
  nkb = k // 64
  mma = _MMA[dtype_name]
  mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{mma}.{mma}.f32"
  cvt = "bf16x2" if dtype_name == "bfloat16" else "f16x2"
  words = lut_decode.table_words(code, jnp.dtype(dtype_name))
  table = {f"t{i}": f"tw{i}" for i in range(8)}
  decl = None
  lines = [
      "{",
      ".reg .b32 tid, l, wp, g, c, s, sx, cc, stp, r0, ro, a, b, lo, sa, xa, "
      "wa, cd, sc0, sc1, ac;",
      ".reg .b32 tw<8>, wA<8>, wB<8>, xv<32>, pa<4>, pb<4>;",
      ".reg .f32 d<4>, cv, nv, off, ab0, ab1;",
      ".reg .b64 po, dd;",
      ".reg .pred p0, p1, pf, pl;",
  ]
  if decode == "lds":  # tw0: the lane's copy in the table; tw1: -0, -0
    lines += ["mov.u32 tid, %tid.x;", "and.b32 l, tid, 31;",
              "shl.b32 a, l, 2;", "add.u32 a, a, $2;",
              f"add.u32 tw0, a, {x_bytes(m, kchunks)};",
              "mov.b32 tw1, 0x80008000;", "mov.b32 tw2, 0;"]
  else:
    # The even permute words from shared memory (`build_ptx`), the odd
    # ones immediates (ptxas folds them into the permutes). Each lane its
    # own copy: from one address for all, ptxas would hold them in
    # uniform registers again.
    lines += ["mov.u32 tid, %tid.x;", "and.b32 l, tid, 31;",
              "shl.b32 a, l, 4;", "add.u32 a, a, $3;",
              "ld.shared.v4.b32 {tw0, tw2, tw4, tw6}, [a+1056];"]
    lines += [f"mov.b32 tw{i}, 0x{w:08x};" for i, w in enumerate(words)
              if i % 2]
  lines += [
      "mov.u32 tid, %tid.x;", "and.b32 l, tid, 31;", "shr.u32 wp, tid, 5;",
      "shr.u32 g, l, 2;", "and.b32 c, l, 3;",
      "mul.lo.u32 ro, wp, 16;",  # the warp's first row in the tile
      "shl.b32 sa, tid, 2;", "add.u32 sa, sa, $5;",
      "ld.shared.u32 stp, [sa];",
  ]
  lut.span_start(lines, n, steps * STEP_ROWS * wgs, nkb, group0,
                 4 * kchunks)
  lines += [
      "mov.u32 lo, a;",
      # ctaid.y is the row group, ctaid.x the program's K chunks: the
      # step's row tile stp / kchunks, its chunk s.
      f"shr.u32 b, stp, {lk};", f"and.b32 cc, stp, {kchunks - 1};",
      "mov.u32 a, %ctaid.y;", f"sub.u32 a, a, {group0};",
      f"mad.lo.u32 a, a, {steps}, b;",
      f"mad.lo.u32 r0, a, {STEP_ROWS * wgs}, ro;",
      "mov.u32 sx, %ctaid.x;", f"mad.lo.u32 s, sx, {kchunks}, cc;",
      f"cvta.to.global.u64 po, {out};",
      "ld.shared.f32 off, [$3+1024];",
  ]
  # The absmax of rows g and g + 8, block 4 s + c: code2[code] * nested +
  # offset (product and sum rounded apart), rounded to x's dtype in both
  # halves of sc0 / sc1.
  for h in range(2):
    lines += [
        "add.u32 a, r0, g;", f"add.u32 a, a, {8 * h};",
        f"min.u32 a, a, {n - 1};", f"mul.lo.u32 a, a, {nkb};",
        "mad.lo.u32 a, s, 4, a;", "add.u32 a, a, c;",
        "shr.u32 a, a, 8;", "sub.u32 a, a, lo;", "shl.b32 a, a, 2;",
        "add.u32 a, a, $4;", "ld.shared.f32 nv, [a];",
        "add.u32 cd, ro, g;", f"add.u32 cd, cd, {8 * h};",
        f"mul.lo.u32 cd, cd, {_CODES};", "and.b32 a, s, 3;",
        "mad.lo.u32 cd, a, 4, cd;", "add.u32 cd, cd, c;",
        "add.u32 cd, cd, $1;", "ld.shared.u8 b, [cd];", "shl.b32 b, b, 2;",
        "add.u32 b, b, $3;", "ld.shared.f32 cv, [b];",
        "mul.rn.f32 cv, cv, nv;", f"add.rn.f32 ab{h}, cv, off;",
        f"cvt.rn.{cvt}.f32 sc{h}, ab{h}, ab{h};",
    ]
  # Weight words: block c of rows g and g + 8 of the warp's rows.
  lines += ["add.u32 a, ro, g;", "shl.b32 a, a, 7;", "mad.lo.u32 a, c, 32, a;",
            "add.u32 wa, a, $0;",
            "ld.shared.v4.b32 {wA0, wA1, wA2, wA3}, [wa];",
            "ld.shared.v4.b32 {wA4, wA5, wA6, wA7}, [wa+16];",
            "ld.shared.v4.b32 {wB0, wB1, wB2, wB3}, [wa+1024];",
            "ld.shared.v4.b32 {wB4, wB5, wB6, wB7}, [wa+1040];"]
  # x: row g % m, block c (of chunk cc's copy).
  lines += [f"rem.u32 a, g, {m};", f"mad.lo.u32 a, cc, {x_rows(m)}, a;",
            f"mul.lo.u32 a, a, {_XROW};",
            f"mad.lo.u32 a, c, {_XBLOCK}, a;", "add.u32 xa, a, $2;"]
  lines += [f"ld.shared.v4.b32 {{xv{4 * i}, xv{4 * i + 1}, xv{4 * i + 2}, "
            f"xv{4 * i + 3}}}, [xa+{16 * i}];" for i in range(8)]
  lines += [f"mov.f32 d{j}, 0f00000000;" for j in range(4)]
  if m > 8:  # columns 8-15: rows 8 + g % (m - 8) of x, accumulators e
    lines += [f"rem.u32 a, g, {m - 8};", "add.u32 a, a, 8;",
              f"mad.lo.u32 a, cc, {x_rows(m)}, a;",
              f"mul.lo.u32 a, a, {_XROW};", f"mad.lo.u32 a, c, {_XBLOCK}, a;",
              "add.u32 xa, a, $2;"]
    lines += [f"ld.shared.v4.b32 {{xu{4 * i}, xu{4 * i + 1}, xu{4 * i + 2}, "
              f"xu{4 * i + 3}}}, [xa+{16 * i}];" for i in range(8)]
    lines += [f"mov.f32 e{j}, 0f00000000;" for j in range(4)]
  accs = ("d", "e")[:1 + (m > 8)]
  if kchunks > 1:  # pf: not the row tile's first chunk; pl: its last
    lines += ["setp.ne.u32 pf, cc, 0;", f"setp.eq.u32 pl, cc, {kchunks - 1};",
              "shl.b32 ac, tid, 4;", "add.u32 ac, ac, $6;"]
    lines += [f"@pf ld.shared.v4.f32 {{{v}0, {v}1, {v}2, {v}3}}, "
              f"[ac+{2048 * wgs * h}];" for h, v in enumerate(accs)]
  for i in range(8):
    for tile, w, sc in (("pa", f"wA{i}", "sc0"), ("pb", f"wB{i}", "sc1")):
      if decode == "lds":
        lines += _lds_decode(w, sc, tile, cvt)
        continue
      names = dict(table, w=w, **{f"s{j}": sc for j in range(4)},
                   **{f"o{j}": f"{tile}{j}" for j in range(4)})
      dcl, body = lut_decode.render(code, dtype_name, names, prefix="u_")
      decl = decl or dcl
      lines += body
    for acc, xr in (("d", "xv"), ("e", "xu"))[:1 + (m > 8)]:
      lines += [
          f"{mma} {{{acc}0, {acc}1, {acc}2, {acc}3}}, {{pa0, pb0, pa1, pb1}}, "
          f"{{{xr}{4 * i}, {xr}{4 * i + 1}}}, "
          f"{{{acc}0, {acc}1, {acc}2, {acc}3}};",
          f"{mma} {{{acc}0, {acc}1, {acc}2, {acc}3}}, {{pa2, pb2, pa3, pb3}}, "
          f"{{{xr}{4 * i + 2}, {xr}{4 * i + 3}}}, "
          f"{{{acc}0, {acc}1, {acc}2, {acc}3}};",
      ]
  # d0, d1: row g, columns 2c, 2c + 1; d2, d3: row g + 8. Column n < m is
  # y[n]: at ((sx m + n) n_pad + row0 + r0 + g (+ 8)) floats, sx the
  # program's K chunks.
  if kchunks > 1:
    lines += [f"@!pl st.shared.v4.f32 [ac+{2048 * wgs * h}], "
              f"{{{v}0, {v}1, {v}2, {v}3}};" for h, v in enumerate(accs)]
  lines += ["shl.b32 a, c, 1;", f"setp.lt.u32 p0, a, {m};",
            f"setp.lt.u32 p1, a, {m - 1};"]
  if kchunks > 1:
    lines += ["and.pred p0, p0, pl;", "and.pred p1, p1, pl;"]
  lines += [f"mad.lo.u32 b, sx, {m}, a;", f"mul.lo.u32 b, b, {n_pad};",
            "add.u32 b, b, r0;", "add.u32 b, b, g;",
            f"add.u32 b, b, {row0};",
            "mul.wide.u32 dd, b, 4;", "add.u64 dd, dd, po;",
            "@p0 st.global.f32 [dd], d0;",
            "@p0 st.global.f32 [dd+32], d2;",
            f"@p1 st.global.f32 [dd+{4 * n_pad}], d1;",
            f"@p1 st.global.f32 [dd+{4 * n_pad + 32}], d3;"]
  if m > 8:  # e0, e1: row g, columns 8 + 2c, 9 + 2c; e2, e3: row g + 8
    lines += [f"setp.lt.u32 p0, a, {m - 8};", f"setp.lt.u32 p1, a, {m - 9};"]
    if kchunks > 1:
      lines += ["and.pred p0, p0, pl;", "and.pred p1, p1, pl;"]
    lines += [f"@p0 st.global.f32 [dd+{32 * n_pad}], e0;",
              f"@p0 st.global.f32 [dd+{32 * n_pad + 32}], e2;",
              f"@p1 st.global.f32 [dd+{36 * n_pad}], e1;",
              f"@p1 st.global.f32 [dd+{36 * n_pad + 32}], e3;"]
  lines += ["add.u32 stp, stp, 1;", "st.shared.u32 [sa], stp;", "}"]
  if decode == "lds":
    decl = ".reg .b32 kb<4>, ka<4>, kp<4>;"
  if m > 8:
    decl += "\n.reg .b32 xu<32>;\n.reg .f32 e<4>;"
  return "\n".join(lines[:1] + [decl] + lines[1:])


def _lds_decode(w: str, sc: str, out: str, cvt: str) -> list[str]:
  """The "lds" decode of word `w` into `out`0-3 (`step_ptx`): byte j's
  pair of codes from the lane's copy of the table (`tw0`; `tw2` is 0),
  times the scale `sc` in one rounding (plus -0 in `tw1`, as
  `lut_decode`)."""
  lines = []
  for j in range(4):
    lines += [f"prmt.b32 kb{j}, {w}, tw2, 0x{0x4440 + j:x};",
              f"mad.lo.u32 ka{j}, kb{j}, 128, tw0;",
              f"ld.shared.b32 kp{j}, [ka{j}];",
              f"fma.rn.{cvt} {out}{j}, kp{j}, {sc}, tw1;"]
  return lines


@lowering.lowered_once
def _compiled(x, weights, *, code, ns, k, rows, stages, wgs, kchunks,
              decode):
  """The Mosaic GPU kernel over one or several weights `(packed, codes,
  nested absmax, nested codes, offset `[1]`)`: `[m, n]` fp32 per weight."""
  m = x.shape[0]
  dtype = jnp.dtype(x.dtype)
  programs = k // CHUNK // kchunks
  tile_rows = STEP_ROWS * wgs
  plan, n_pad = lut.row_plan(ns, k, rows, tile_rows, 4 * kchunks)
  span = max(p[3] for p in plan)
  early = skips_build(m, ns, k)
  ptx = [(build_ptx(code, dtype.name, m, n, k, steps * tile_rows, span,
                    w[2].shape[0], group0, wgs, kchunks, decode, early),
          step_ptx(code, dtype.name, m, n, k, steps, n_pad, group0, row0,
                   wgs, kchunks, decode))
         for n, w, (_, steps, _, _, group0, row0) in zip(ns, weights, plan)]
  accs = ([plgpu.SMEM((1 + (m > 8), 512 * wgs), jnp.float32)]
          if kchunks > 1 else [])

  kernel = plgpu.kernel(
      lut.pipelines("jaxbnb_gemv_4bit_warp_tma", ns, plan, ptx, tile_rows,
                    stages, wgs, kchunks),
      out_type=jax.ShapeDtypeStruct((programs, m, n_pad), jnp.float32),
      grid=(sum(rows), programs), grid_names=("n", "s"),
      num_threads=wgs + 1, thread_name="wg",
      scratch_types=[plgpu.SMEM((own_rows(m, kchunks, decode), _XROW // 4),
                                jnp.float32),
                     plgpu.SMEM((4, 128), jnp.float32),
                     plgpu.SMEM((span // 128, 128), jnp.float32),
                     plgpu.SMEM((wgs, 128), jnp.uint32)] + accs)
  args = []
  for (packed, codes, nested_absmax, nested_code, offset), n in zip(weights,
                                                                   ns):
    args += [packed.reshape(n, k // 2), lut.codes_tiles(codes, n, k),
             nested_absmax, nested_code, offset]
  total = sum_splits(kernel(x, *args))
  return [total[:, p[5]:p[5] + n] for p, n in zip(plan, ns)]


def _twin(x, packed, codes, nested_absmax, nested_code, offset, *, code, n,
          k):
  """The kernel's values in jnp (`lut_decode.decode_scaled`'s twin: each
  weight the code rounded to x's dtype times the absmax rounded to it, the
  product rounded once); `x @ W.T` in fp32."""
  dtype = jnp.dtype(x.dtype)
  absmax = decode_absmax(codes, jnp.arange(codes.shape[0]), nested_absmax,
                         nested_code.astype(jnp.float32), offset, 256,
                         nested_absmax.shape[0], True).reshape(n, k // 64)
  scale = lut_decode.scale_words(jnp.repeat(absmax, 32, axis=1), dtype)
  hi, lo = lut_decode.decode_scaled(packed.reshape(n, k // 2), scale, code,
                                    dtype, True)
  w = jnp.stack([hi, lo], -1).reshape(n, k).astype(jnp.float32)
  return jnp.einsum("mk,nk->mn", x.astype(jnp.float32), w,
                    precision=lax.Precision.HIGHEST)


def gemv_group(x: jax.Array, weights, *, code: tuple[float, ...],
               ns: tuple[int, ...], k: int, rows=None, stages: int = 4,
               wgs: int = WGS, kchunks: int = 1, decode: str = DECODE,
               interpret: bool = False) -> tuple[jax.Array, ...]:
  """`x @ W_g.T` in fp32 for 2 to 16 rows of x and several double-quantized
  4-bit weights that read it (a layer's q/k/v, its gate/up), in one
  launch.

  Args:
    x: `[m, k]` bfloat16 or float16, 2 <= m <= 16.
    weights: `(packed, codes, nested_absmax, nested_code, offset)` per
      weight, as `gemv` takes them.
    code: the 16 code values (static), one code for all.
    ns: rows of each weight.
    k: columns, a multiple of 256 (`CHUNK`).
    rows: row groups of each weight; default `default_config`'s.
    stages: pipeline steps in flight.
    wgs: compute warpgroups beside the TMA one, 2 or 3, each taking 64
      rows of a step (4, emulated correctly, hung on the H200).
    kchunks: K chunks (256 columns) a program takes in turn for each of
      its row tiles, its accumulators kept between them: 1, 2 or 4 (a
      power of two dividing k / 256); the fp32 partials XLA sums are
      `k / 256 / kchunks` instead of `k / 256`.
    decode: "prmt" (byte permutes in registers) or "lds" (a 32 KiB table
      of each byte's pair of codes in shared memory, a copy a lane): the
      same values.
    interpret: the jnp twin (CPU).

  Returns:
    float32 `[m, n_g]` per weight.
  """
  ns = tuple(ns)
  if len(weights) == len(ns):
    for n in ns:
      check(x.shape[0], n, k, 64, x.dtype, True)
  if x.shape[1] != k:
    raise ValueError(f"x: needs {k} columns, got shape {x.shape}")
  if kchunks not in KCHUNKS or (k // CHUNK) % kchunks:
    raise ValueError(f"kchunks: must be one of {KCHUNKS} and divide "
                     f"k / {CHUNK} = {k // CHUNK}, got {kchunks}")
  if decode not in DECODES:
    raise ValueError(f"decode: must be one of {DECODES}, got {decode!r}")
  code, rows = lut.group_args(
      weights, code, ns, rows, stages,
      lambda: default_config(ns, k, kchunks=kchunks, decode=decode)["rows"])
  if wgs not in (2, 3):
    raise ValueError(f"wgs: must be 2 or 3, got {wgs}")
  need = smem_bytes(ns, k, rows, stages, x.shape[0], wgs, kchunks, decode)
  if need > _backend.HOPPER_SMEM:
    raise ValueError(
        f"rows/stages: row groups {rows} of {ns} rows with {stages} stages "
        f"and {kchunks} K chunks a program "
        f"need {need} bytes of shared memory, more than "
        f"{_backend.HOPPER_SMEM}; take more row groups or fewer stages")
  prepared = [(p, c, na.astype(jnp.float32), nc.astype(jnp.float32),
               jnp.asarray(off, jnp.float32))
              for p, c, na, nc, off in weights]
  if interpret:
    return tuple(_twin(x, *w, code=code, n=n, k=k)
                 for w, n in zip(prepared, ns))
  if not available():
    raise RuntimeError(
        "the TMA warp GEMV needs Mosaic GPU's inline_mgpu and emit_pipeline "
        f"(jax 0.11.2 has them); this JAX is {jax.__version__}")
  return tuple(_compiled(
      x, [(p, c, na, nc, off.reshape(1)) for p, c, na, nc, off in prepared],
      code=code, ns=ns, k=k, rows=rows, stages=stages, wgs=wgs,
      kchunks=kchunks, decode=decode))


def gemv(x: jax.Array, packed: jax.Array, codes: jax.Array,
         nested_absmax: jax.Array, nested_code: jax.Array,
         offset: jax.Array, *, code: tuple[float, ...], n: int, k: int,
         rows: int | None = None, stages: int = 4, wgs: int = WGS,
         kchunks: int = 1, decode: str = DECODE,
         interpret: bool = False) -> jax.Array:
  """`x @ W.T` in fp32 for 2 to 16 rows of x and a double-quantized 4-bit
  `W [n, k]` (blocksize 64, 256 codes a nested absmax).

  Args:
    x: `[m, k]` bfloat16 or float16, 2 <= m <= 16.
    packed: uint8 `[n * k / 2]`, bitsandbytes' order.
    codes: uint8 `[n * k / 64]`, the absmax codes.
    nested_absmax: float32 `[ceil(n * k / 64 / 256)]`.
    nested_code: float32 `[256]`, the nested map.
    offset: float32 scalar.
    code: the 16 code values (static).
    n, k: the weight's shape; k a multiple of 256 (`CHUNK`; past whole
      1024s the codes' rows are padded, `gemv_4bit_lut.codes_tiles`).
    rows: row groups (programs a K chunk); default `default_config`'s.
    stages: pipeline steps in flight.
    wgs: compute warpgroups, 2 or 3 (`gemv_group`).
    kchunks: K chunks a program (`gemv_group`).
    decode: "prmt" or "lds" (`gemv_group`).
    interpret: the jnp twin (CPU).

  Returns:
    float32 `[m, n]`.

  Example (the jnp twin, on any device): with the codes 0..15, a byte
  0x93 holds 9 and 3, and every absmax is its nested code 1.0 times the
  nested absmax 2.0 plus the offset 0.5, so x = 1 gives (9 + 3) * 2.5 for
  each of the 512 bytes of a row, in every row of x:

    >>> import jax.numpy as jnp
    >>> from pallas_kernels import gemv_4bit_warp_tma
    >>> n, k = 128, 1024
    >>> y = gemv_4bit_warp_tma.gemv(
    ...     jnp.ones((3, k), jnp.bfloat16),
    ...     jnp.full((n * k // 2,), 0x93, jnp.uint8),
    ...     jnp.zeros((n * k // 64,), jnp.uint8),
    ...     jnp.full((8,), 2.0, jnp.float32), jnp.ones((256,), jnp.float32),
    ...     0.5, code=tuple(range(16)), n=n, k=k, interpret=True)
    >>> y.shape, float(y[2, 5])
    ((3, 128), 15360.0)
  """
  return gemv_group(x, [(packed, codes, nested_absmax, nested_code, offset)],
                    code=code, ns=(n,), k=k,
                    rows=None if rows is None else (rows,), stages=stages,
                    wgs=wgs, kchunks=kchunks, decode=decode,
                    interpret=interpret)[0]
