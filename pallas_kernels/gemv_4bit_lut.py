"""The 4-bit GEMV at M = 1 by table lookup: x's products made once, looked up.

At M = 1 every weight byte meets the same two values of x, so each program
first makes, for its 256 columns of x, the table of every byte's products:
for byte position `p` (columns `2p`, `2p + 1`) and byte value `b`,
`T[p][b] = code[b >> 4] * x[2p] + code[b & 15] * x[2p + 1]` (fp32, each
product and the sum rounded once). The weight stream then costs, a byte, a
permute (the byte into its table offset), an add of the table's base, one
shared load and one add: no decode, no multiply.
The absmax scales the sum of a block's 32 bytes.

* Grid: `(row groups, K chunks)`. A program owns a chunk of 256 columns
  (128 bytes a row, four blocks of 64) and a group of rows, which a TMA
  pipeline brings in steps with their absmax codes (a `[rows, 16]` tile,
  the four of this chunk among them): `plgpu.emit_pipeline` with one
  compute warpgroup, or `emit_pipeline_warp_specialized` with two beside
  a TMA warpgroup (`wgs`), each taking its own rows of a step.
* The table (128 KiB) fills the program's shared memory before the
  pipeline starts. `T[4 l + i][b]`, the byte `i` of word `l` of a row,
  is at byte `65536 (l >> 4) + 256 b + 4 ((l + 16 i) % 64)`: a half of
  64 KiB for lanes 0-15 and one for lanes 16-31. The 32 lanes of a warp,
  each looking up byte `i` of its own word `l`, hit 32 distinct banks,
  and a lane's offset for byte value `b` is its offset for 0 with `b` as
  byte 1, so one `prmt` makes it from the weight word. The nested absmax
  the program's rows can touch (its "span") and the 256 nested codes are
  copied beside it.
* A warp takes 16 or 32 rows a step; lane `l` reads word `l` of each
  (bytes `4l .. 4l + 3`, all in block `l // 8`) and sums its four
  lookups. A reduce-scatter over the 8 lanes of a block leaves each lane
  2 or 4 (row, block) sums; they are scaled by the block's fp32 absmax
  (`code2[c] * nested + offset`, product and sum rounded apart, as
  bitsandbytes), summed over the four blocks by shuffles, and stored as
  the chunk's fp32 partial of the row. XLA sums the chunks. Each thread
  counts its steps in shared memory.

The per-thread work is inline PTX (`plgpu.inline_mgpu`). `interpret=True`
runs a jnp twin with the same products and scales (the sums in another
order); `pytest -m gpu` checks the PTX against it.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import struct

import jax
import jax.numpy as jnp
import numpy as np

from jax import lax

from pallas_kernels import _backend
from pallas_kernels import lowering
from pallas_kernels import rms_norm as rms_norm_lib
from pallas_kernels import split_sum
from pallas_kernels.dequantize_4bit import decode_absmax
from pallas_kernels.split_sum import sum_splits

try:  # pragma: no cover - depends on the installed JAX
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  import jax.experimental.mosaic.gpu as mgpu
  from jax.extend.mlir import ir
  from jax._src.lib.mlir.dialects import llvm
  _HAVE_MGPU = all(hasattr(plgpu, a) for a in (
      "inline_mgpu", "emit_pipeline", "emit_pipeline_warp_specialized",
      "kernel", "RefType"))
except ImportError:  # pragma: no cover
  _HAVE_MGPU = False

__all__ = ["ALLOC_FIRST", "CHUNK", "LOADS_FENCE", "LOADS_FIRST",
           "NormInput", "STEP_ROWS", "SwigluInput", "available",
           "build_ptx", "built_then_pipelined", "check", "codes_tiles",
           "default_config",
           "default_rows", "fit", "gemv", "gemv_group", "gemv_swiglu",
           "group_args", "group_config",
           "inline_ptx", "layout", "nested_span", "pipelines", "row_plan",
           "smem_bytes", "span_start", "step_ptx", "swiglu_reference"]

CHUNK = 256  # columns of x (and of W) a program: 128 bytes a row
STEP_ROWS = (64, 128)  # rows a pipeline step: 4 warps x 16 or x 32
# With two compute warpgroups: allocate the pipeline's buffers and
# barriers before the build (`get_allocations`, passed back as
# `allocations=`). The pipeline's own scoped allocation starts with a
# barrier of every thread (Mosaic GPU's `run_scoped` lowering), so the TMA
# warpgroup cannot issue its first copy until the build is done, whatever
# `early` and `tma_skips_build` say: a program's first tile came 1.5-1.75
# us after its build (fifty-third session, H100,
# docs/bench/gemv_timeline_probe.py). Allocated first, 4096x4096 at M = 1
# took 6.66 us against 7.49, and the 8B decode at batch 1 ran 386-388
# tok/s against 368 (fifty-fourth session, H100; batch 8 even).
ALLOC_FIRST = True
# The compute threads take their build's global loads back before they
# store the table (`build_ptx`'s `loads_first`). With the pipeline
# allocated first, a 14336x4096 program's build took 3 us against 1.5
# without, as if its loads were issued late, behind the first copies;
# the timeline probe's LOADSTAMP (these instructions with a timer store
# in the branch) took 13.89 us a launch against 14.56-14.75, and 6.40
# against 6.66 on 4096x4096 (fifty-fourth session, H100). On in builds
# of x as given, off in builds that make x (RMSNorm'd, `norm`, or
# `silu(gate) * up`, `swiglu`). Fifty-fifth session, H100: the launch
# alone faster (timeline probe 13.98 / 14.18 us against 14.62 on
# 14336x4096, 14.69 / 14.85 against 15.62 on 4096x14336; `jaxbnb bench
# matmul` 7.27 against 7.70 us on 4096x4096, 15.19-15.30 against
# 16.24-16.28 on 4096x14336); the 8B decode at batch 1 (3 reps, tokens/s)
# 392.3 / 393.3 with it in plain builds only against 390.6 / 392.0
# without, but 385.0 in the norm builds only and 388.7 in the swiglu
# builds only; in every build 382.3-384.7 against 386.1-388.8 (five
# pairs over two calls).
LOADS_FIRST = True
# How a build takes its loads back first: a fence (`fence.acq_rel.cta`)
# before the table's stores instead of the branch on the loads' sum.
# Assembled alone (fifty-fifth session, Triton's ptxas for CUDA 12.9,
# sm_90a, read with nvdisasm), the branch becomes a predicated store that
# ptxas schedules among the table's stores: after 4 of the plain build's
# 137 shared stores but after 81 of the RMSNorm build's 138, so there
# the loads are not back first at all; the fence (MEMBAR.ALL.CTA) comes
# before all of them in both, in as many instructions as the build
# without either. Measured on the 8B decode at batch 1 (fifty-seventh
# session, H100, with it and without, alternated): 380.9 and 385.6
# against 382.9 and 382.6 tokens/s, within the runs' spread; off.
LOADS_FENCE = False
# `gemv_swiglu`'s `residual` added with down's partials' sum in one
# Pallas kernel (`split_sum.add_splits`, columns spread over the GPU)
# instead of XLA's fusion of the two (one thread a value). Sixtieth
# session (H100, the 8B decode at batch 1): in 4-layer profiles the add
# took 1.70-1.82 us a layer against XLA's 2.34-2.56; end to end 393.3 /
# 393.9 tokens/s against 393.3 / 393.6, level. On: same bits, no slower.
RESIDUAL_KERNEL = True
_CODES = 16  # absmax codes a row in the codes tile (TMA's 16-byte minimum)
_ROW = 256  # bytes between a position's entries for byte values b, b + 1
_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class SwigluInput:
  """Where a GEMV's x comes from when it is `silu(gate) * up` of an
  earlier table GEMV's raw fp32 partials (a layer's down projection after
  its gate/up launch): `[chunks, n_pad]` partials, gate's columns at rows
  `0 .. n - 1`, up's from `up_row0`.

  Attributes:
    chunks: the gate/up launch's K chunks (its `k / 256`).
    n_pad: the partials' rows, both weights padded (`row_plan`'s total).
    up_row0: the first partial row of up (gate's padded rows).
  """
  chunks: int
  n_pad: int
  up_row0: int


@dataclasses.dataclass(frozen=True)
class NormInput:
  """A GEMV whose x is RMSNorm'd first, in the table build: each program
  reads the whole row for its sum of squares (the model's RMSNorm,
  `pallas_kernels.rms_norm.reference`, with the sum in another order),
  then normalizes its own columns and multiplies them by the norm's
  weight (an input of x's dtype).

  Attributes:
    eps: added to the mean square.
  """
  eps: float


def available() -> bool:
  """Whether this JAX has the Mosaic GPU pieces the kernel uses."""
  return _HAVE_MGPU


def _f32(v: float) -> str:
  """A PTX fp32 immediate, exactly."""
  return "0f%08X" % struct.unpack("<I", struct.pack("<f", np.float32(v)))[0]


def nested_span(rows_a_program: int, k: int, blocks: int = 4) -> int:
  """Nested absmax values a program's rows can touch in its `blocks`
  absmax blocks of each row (a K chunk's four; the program copies them to
  shared memory), padded to whole 128s."""
  span = ((rows_a_program - 1) * (k // 64) + blocks - 1) // 256 + 2
  return -(-span // 128) * 128


def layout(n: int, k: int, rows: int, step_rows: int, blocks: int = 4):
  """(steps a program, padded rows, nested span) of a config whose
  programs take `blocks` absmax blocks of each row."""
  steps = -(-(-(-n // step_rows)) // rows)
  return (steps, rows * steps * step_rows,
          nested_span(steps * step_rows, k, blocks))


def smem_bytes(n: int, k: int, rows: int, step_rows: int, stages: int,
               wgs: int = 1) -> int:
  """Shared memory of a config: the table, the nested table and span, the
  step counters and the pipeline's weight and codes tiles."""
  span = layout(n, k, rows, step_rows * wgs)[2]
  return (256 * CHUNK // 2 * 4 + 512 * 4 + span * 4 + wgs * 512
          + stages * wgs * step_rows * (CHUNK // 2 + _CODES))


def check(m: int, n: int, k: int, blocksize: int, dtype, nested: bool,
          nested_blocksize: int = 256) -> None:
  """Raises ValueError naming the argument this kernel cannot take."""
  dtype = jnp.dtype(dtype)
  if m != 1:
    raise ValueError(f"x: the table GEMV takes 1 row, got {m}")
  if not nested or nested_blocksize != 256:
    raise ValueError("absmax: the table GEMV needs double-quantized weights "
                     "with 256 codes per nested absmax, got "
                     + ("plain float32 absmax" if not nested else
                        f"nested_blocksize {nested_blocksize}"))
  if blocksize != 64:
    raise ValueError(f"blocksize: the table GEMV needs 64, got {blocksize}")
  if dtype.name not in _DTYPES:
    raise ValueError(f"x: the table GEMV needs bfloat16 or float16, got "
                     f"{dtype.name}")
  if k % CHUNK:
    raise ValueError(f"k: the table GEMV needs a multiple of {CHUNK} (its "
                     f"K chunks), got {k}")
  if n < 1:
    raise ValueError(f"n: must be >= 1, got {n}")


def codes_tiles(codes: jax.Array, n: int, k: int) -> jax.Array:
  """The absmax codes of a `[n, k]` weight as the kernels' TMA reads them:
  `[n, k / 64]`, each row padded with zero codes to whole 16 bytes
  (`_CODES`, TMA's least row stride) where k is not a multiple of 1024
  (Llama-2's 11008, Qwen2.5's 3584): an XLA pad of the `n k / 64` bytes,
  a small copy beside the weight's own `n k / 2`. The steps read a K
  chunk's four codes at column `4 (s % 4)` of tile `s // 4` either way,
  and the nested absmax by the unpadded index.

  Example: k = 1280 gives 20 codes a row, padded to 32:

    >>> import jax.numpy as jnp
    >>> from pallas_kernels import gemv_4bit_lut
    >>> tiles = gemv_4bit_lut.codes_tiles(jnp.ones((40,), jnp.uint8), 2, 1280)
    >>> tiles.shape, int(tiles[0, 19]), int(tiles[0, 20])
    ((2, 32), 1, 0)
  """
  rows = codes.reshape(n, k // 64)
  pad = -(k // 64) % _CODES
  return jnp.pad(rows, ((0, 0), (0, pad))) if pad else rows


def default_rows(n: int, k: int, num_sms: int | None = None) -> int:
  """Row groups: as many as keep one wave of programs (one an SM, the
  table fills most of its shared memory)."""
  if num_sms is None:
    num_sms = _backend.num_sms()
  chunks = k // CHUNK
  return max(1, min(num_sms // chunks, -(-n // STEP_ROWS[0])))


def default_config(n: int, k: int, num_sms: int | None = None) -> dict:
  """`gemv`'s keywords for a weight `[n, k]`: two compute warpgroups of 64
  rows a step beside an early-starting TMA warpgroup, four steps in
  flight, `default_rows` groups (fewer stages, then more groups, where
  the shared memory would not hold them). The best single setting of the
  twenty-fourth session's sweep (docs/benchmarks.md, run b: 24.1 us on
  28672x4096 against the package's 37.2, 17.3 on 14336x4096 against
  20.9). The TMA warpgroup branches past the table's build
  (`tma_skips_build`): timed per program in the fifty-third session
  (H100, docs/bench/gemv_timeline_probe.py), the build then ends sooner
  and the first tile comes about 0.25 us earlier (launches of 7.20 /
  7.39 us against 7.68 / 7.87 on 4096x4096, 15.07 / 15.14 against 15.52
  / 15.62 on 14336x4096; the 8B decode at batch 1 372.3 tokens/s against
  369.6-370.9)."""
  if num_sms is None:
    num_sms = _backend.num_sms()
  rows, stages = fit((n,), default_rows(n, k, num_sms), 4,
                      functools.partial(_group_smem, (n,), k, step_rows=64,
                                        wgs=2))
  return dict(rows=rows[0], step_rows=64, stages=stages, wgs=2, early=True,
              tma_skips_build=True)


def fit(ns: tuple[int, ...], total: int, stages: int,
        smem: Callable[..., int]) -> tuple[tuple[int, ...], int]:
  """(row groups of each weight, stages): `total` groups shared in
  proportion to the rows (one at least a weight), then fewer stages (down
  to 2) and twice the groups until `smem(rows=, stages=)`, the config's
  shared memory in bytes, fits the SM's."""
  while True:
    rows = tuple(max(1, round(total * n / sum(ns))) for n in ns)
    if smem(rows=rows, stages=stages) <= _backend.HOPPER_SMEM:
      return rows, stages
    if stages > 2:
      stages -= 1
    else:
      total *= 2


def _offset(reg: str, tmp: str) -> list[str]:
  """PTX: `reg` (holding `l + 16 i`) becomes the table offset of byte
  position `4 l + i` (lane `l`, byte `i` of its word) for byte value 0:
  `65536 (l >> 4) + 4 ((l + 16 i) % 64)`; `tmp` is clobbered."""
  return [f"and.b32 {reg}, {reg}, 63;", f"shl.b32 {reg}, {reg}, 2;",
          f"shr.u32 {tmp}, l, 4;", f"shl.b32 {tmp}, {tmp}, 16;",
          f"or.b32 {reg}, {reg}, {tmp};"]


def _split_sum_order(names: list[str]) -> list[tuple[str, str, str]]:
  """`(dst, a, b)` adds that sum `names` in `split_sum.sum_splits`'s order
  (a pairwise tree, odd rows set aside and added after it), each into
  its first operand; the total ends in `names[0]`."""
  adds, aside, level = [], [], list(names)
  while len(level) > 1:
    if len(level) % 2:
      aside.append(level.pop())
    adds += [(level[2 * i], level[2 * i], level[2 * i + 1])
             for i in range(len(level) // 2)]
    level = level[0::2]
  adds += [(level[0], level[0], r) for r in aside]
  return adds


_LOG2E_NEG = -1.4426950408889634  # -log2(e): exp(-v) = 2^(v * this)
# Up to this many gate/up chunks a thread loads gate's and up's partials
# at once (4 registers a chunk; 16 chunks: 80 registers in the build by
# ptxas -v); past it, gate's and then up's (32 chunks at once would take
# 162 of the 168 that 384 threads a program leave each).
_SWIGLU_LOADS_AHEAD = 16


def swiglu_lines(swiglu: SwigluInput, dtype_name: str
                 ) -> tuple[list[str], list[str]]:
  """PTX of `build_ptx`'s x from gate/up partials: (the loads, the math).

  The loads: with `a` the thread's first column (even) and `px` the
  partials' global address, columns `a` and `a + 1` of gate and of up in
  every chunk (`ld.global.nc.v2.f32`; past `_SWIGLU_LOADS_AHEAD` chunks,
  up's after gate's sum, in the math). The math, into `x0`/`x1`: each
  column's chunks summed as `sum_splits` sums them, rounded to the
  compute dtype (`dtype_name`); then `jax.nn.silu(g) * u` as its ops
  read in the compute dtype, each result rounded to it: `exp(-g)` (by
  `ex2.approx`), `1 + that`, its reciprocal (`rcp.rn`), `g` times it,
  times `u`. Clobbers `e`, `d`, `hx0`."""
  cvt = "bf16" if dtype_name == "bfloat16" else "f16"

  def rnd(reg):
    return [f"cvt.rn.{cvt}.f32 hx0, {reg};", f"cvt.f32.{cvt} {reg}, hx0;"]

  def fetch(prefix, row0):
    return [f"ld.global.nc.v2.f32 {{{prefix}{2 * c}, {prefix}{2 * c + 1}}}, "
            f"[px+{4 * (c * swiglu.n_pad + row0)}];"
            for c in range(swiglu.chunks)]

  def total(prefix):
    out = []
    for col in (0, 1):
      names = [f"{prefix}{2 * c + col}" for c in range(swiglu.chunks)]
      out += [f"add.rn.f32 {d}, {a}, {b};"
              for d, a, b in _split_sum_order(names)]
      out += rnd(names[0])
    return out

  loads = ["mul.wide.u32 d, a, 4;", "add.u64 px, px, d;"] + fetch("pg", 0)
  ups = fetch("pu", swiglu.up_row0)
  if swiglu.chunks <= _SWIGLU_LOADS_AHEAD:  # all the loads in flight
    loads += ups
    math = total("pg") + total("pu")
  else:  # gate's, then up's: half the registers (70B: 32 chunks)
    math = total("pg") + ups + total("pu")
  for col in (0, 1):
    g, u, x = f"pg{col}", f"pu{col}", f"x{col}"
    math += [f"mul.rn.f32 e, {g}, {_f32(_LOG2E_NEG)};",
             "ex2.approx.ftz.f32 e, e;"] + rnd("e")
    math += [f"add.rn.f32 e, e, {_f32(1.0)};"] + rnd("e")
    math += ["rcp.rn.f32 e, e;"] + rnd("e")
    math += [f"mul.rn.f32 e, {g}, e;"] + rnd("e")
    math += [f"mul.rn.f32 {x}, e, {u};"] + rnd(x)
  return loads, math


_NORM_SUMS = 1536  # bytes into the nested table's buffer: the warps' sums


def _halves_f32(word: str, dtype_name: str, lo: str, hi: str) -> list[str]:
  """PTX: the two 16-bit values of `word` as fp32 in `lo` and `hi`
  (clobbers `b`, `hx0`, `hx1`)."""
  if dtype_name == "bfloat16":
    return [f"shl.b32 b, {word}, 16;", f"mov.b32 {lo}, b;",
            f"and.b32 b, {word}, 0xffff0000;", f"mov.b32 {hi}, b;"]
  return [f"mov.b32 {{hx0, hx1}}, {word};", f"cvt.f32.f16 {lo}, hx0;",
          f"cvt.f32.f16 {hi}, hx1;"]


def norm_lines(norm: NormInput, dtype_name: str, k: int, wgs: int
               ) -> tuple[list[str], list[str], list[str]]:
  """PTX of `build_ptx`'s RMSNorm of x: (its registers, the loads, the
  math).

  The loads, after x's word at `px` (`d` its byte offset): the norm
  weight's word of the same columns (`$8`), and the row in 16-byte units,
  unit `t + 128 wgs j` to thread `t` (none past the row). The math, after
  `x0`/`x1` hold the thread's two values: the sum of its units' squares
  (`fma`), the warp's by butterfly shuffles, the warps' through shared
  memory (`_NORM_SUMS` bytes into `$1`) after named barrier 15 of the
  compute threads, added in warp order; `r = rsqrt(sum / k + eps)`
  (`div.rn`, `rsqrt.approx`); then `x0`/`x1` become
  `weight * round(x r)`, rounded, as the model's RMSNorm rounds."""
  threads = 128 * wgs
  units = k // 8
  loads_a = -(-units // threads)
  cvt = "bf16" if dtype_name == "bfloat16" else "f16"
  decls = [f".reg .b32 nw, nq<{4 * loads_a}>;",
           ".reg .f32 ss, sv, nr, nw0, nw1;", ".reg .b64 pn;",
           ".reg .pred pv;"]
  loads = ["cvta.to.global.u64 pn, $8;", "add.u64 pn, pn, d;",
           "ld.global.nc.b32 nw, [pn];",
           "cvta.to.global.u64 pn, $4;", "mul.wide.u32 d, t, 16;",
           "add.u64 pn, pn, d;"]
  for j in range(loads_a):
    regs = ", ".join(f"nq{4 * j + i}" for i in range(4))
    loads += [f"mov.b32 nq{4 * j + i}, 0;" for i in range(4)]
    loads += [f"setp.lt.u32 pv, t, {units - threads * j};",
              f"@pv ld.global.nc.v4.b32 {{{regs}}}, [pn+{16 * threads * j}];"]
  math = ["mov.f32 ss, 0f00000000;"]
  for q in range(4 * loads_a):
    math += _halves_f32(f"nq{q}", dtype_name, "sv", "nr")
    math += ["fma.rn.f32 ss, sv, sv, ss;", "fma.rn.f32 ss, nr, nr, ss;"]
  for m in (16, 8, 4, 2, 1):
    math += [f"shfl.sync.bfly.b32 sv, ss, {m}, 0x1f, 0xffffffff;",
             "add.rn.f32 ss, ss, sv;"]
  math += ["and.b32 b, t, 31;", "setp.eq.u32 pv, b, 0;",
           "shr.u32 b, t, 5;", "shl.b32 b, b, 2;", "add.u32 b, b, $1;",
           f"@pv st.shared.f32 [b+{_NORM_SUMS}], ss;",
           f"bar.sync 15, {threads};",
           f"ld.shared.f32 ss, [$1+{_NORM_SUMS}];"]
  for w in range(1, threads // 32):
    math += [f"ld.shared.f32 sv, [$1+{_NORM_SUMS + 4 * w}];",
             "add.rn.f32 ss, ss, sv;"]
  math += [f"div.rn.f32 ss, ss, {_f32(float(k))};",
           f"add.rn.f32 ss, ss, {_f32(norm.eps)};", "rsqrt.approx.f32 nr, ss;"]
  math += _halves_f32("nw", dtype_name, "nw0", "nw1")
  for x, wt in (("x0", "nw0"), ("x1", "nw1")):
    math += [f"mul.rn.f32 {x}, {x}, nr;", f"cvt.rn.{cvt}.f32 hx0, {x};",
             f"cvt.f32.{cvt} {x}, hx0;", f"mul.rn.f32 {x}, {x}, {wt};",
             f"cvt.rn.{cvt}.f32 hx0, {x};", f"cvt.f32.{cvt} {x}, hx0;"]
  return decls, loads, math


def swiglu_reference(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
  """What `swiglu_lines` computes from the summed fp32 gate and up, in
  numpy: `silu(g) * u` with the same formula and roundings (numpy's
  `exp2` for `ex2.approx`)."""
  def rnd(v):
    return np.asarray(jnp.asarray(v, jnp.float32).astype(dtype)
                      .astype(jnp.float32))

  g, u = rnd(gate), rnd(up)
  with np.errstate(over="ignore"):  # exp(-g) past the dtype's range: inf
    e = rnd(np.exp2(g * np.float32(_LOG2E_NEG)))
  s = rnd(np.float32(1) / rnd(e + np.float32(1)))
  return jnp.asarray(rnd(rnd(g * s) * u)).astype(dtype)


def span_start(lines, n, rows_a_program, nkb, group0=0, blocks=4):
  """PTX: `a` = the first nested index of this program's rows (clamped to
  the last row, as the steps clamp theirs) and its `blocks` absmax blocks
  of a row (`%ctaid.x` counts them); the weight's row groups start at
  `group0`."""
  lines += ["mov.u32 a, %ctaid.y;", f"sub.u32 a, a, {group0};",
            f"mul.lo.u32 a, a, {rows_a_program};",
            f"min.u32 a, a, {n - 1};", f"mul.lo.u32 a, a, {nkb};",
            "mov.u32 b, %ctaid.x;", f"mad.lo.u32 a, b, {blocks}, a;",
            "shr.u32 a, a, 8;"]


@functools.lru_cache(maxsize=None)
def build_ptx(code: tuple[float, ...], dtype_name: str, n: int, k: int,
              rows_a_program: int, span: int, n_nested: int,
              wgs: int = 1, early: bool = False, group0: int = 0,
              skip: bool = False,
              swiglu: SwigluInput | None = None,
              norm: NormInput | None = None,
              loads_first: bool = False, loads_fence: bool = False) -> str:
  """The table, the nested code table, the program's span of nested
  absmax and the step counters, made by the compute threads; then a
  barrier of every thread of the program.

  Operands: `$0` the table's shared address, `$1` the nested table's
  (`[256]` codes, then the offset), `$2` the span's, `$3` the step
  counters' (one a compute thread); `$4` x's global address, `$5` the
  nested codes' (256 floats), `$6` the nested absmax's, `$7` the
  offset's (one float). Every global load comes first, so that their
  latencies pass together and while the table is made. Thread `t` makes
  the entries of byte position `p = 4 l + i` (`l = t % 32`,
  `i = t % 128 // 32`) of the chunk `%ctaid.x`, all 256 byte values with
  one compute warpgroup (`wgs`), half of them with two. Threads past the
  compute warpgroups (the pipeline's memory warpgroup) store nothing;
  with `skip` they branch past the whole block to its barrier. With
  `early` (two compute warpgroups) they do not wait either: the compute
  threads meet at named barrier 15, and the memory warpgroup goes on to
  the pipeline meanwhile (whose own scoped allocation waits for every
  thread unless `ALLOC_FIRST`). In a group of weights, this weight's
  row groups start at `group0`.

  With `swiglu`, `$4` is instead an earlier launch's fp32 partials
  (`SwigluInput`) and a thread's two values of x are `silu(gate) * up`
  of its columns (`swiglu_lines`). With `norm` (`NormInput`; with two
  compute warpgroups only with `skip`; not with `swiglu`), `$8` is the
  norm's weight and x is RMSNorm'd first (`norm_lines`).

  With `loads_first`, a thread has every global load back (x made, the
  span loaded) before it stores the table: a branch on a sum of the loaded
  values past a store of that sum to the thread's own first entry
  (never taken for a finite sum short of the largest float, and
  overwritten by the table if it is), so that no later instruction is
  scheduled ahead of the loads. With `loads_fence` as well, a fence
  (`fence.acq_rel.cta`) there instead: memory accesses after it are not
  moved above it, where ptxas turns the branch into a predicated store
  and may schedule it among the table's stores.
  """
  if norm is not None and ((wgs > 1 and not skip) or swiglu is not None):
    raise ValueError("norm: needs skip with two compute warpgroups (the "
                     "memory warpgroup past the block: the compute threads "
                     "meet at a barrier in it) and no swiglu")
  loads = span // 128
  lines = [
      "{",
      ".reg .b32 t, c, l, i, a, b, w, q;",
      f".reg .f32 x0, x1, e, cc, h<16>, o<16>, g<{loads + 3}>;",
      ".reg .b64 px, pc, pf, d;",
      ".reg .b16 hx0, hx1;",
      ".reg .pred p0, pw, pt, lo;",
      "mov.u32 t, %tid.x;", f"setp.lt.u32 pw, t, {128 * wgs};",
  ]
  if swiglu is not None:
    lines.insert(2, f".reg .f32 pg<{2 * swiglu.chunks}>, "
                 f"pu<{2 * swiglu.chunks}>;")
  if norm is not None:
    norm_decls, norm_loads, norm_math = norm_lines(norm, dtype_name, k, wgs)
    lines[2:2] = norm_decls
  if skip:
    lines += ["@!pw bra LUT_BUILT;"]
  lines += [
      "and.b32 c, t, 127;", "and.b32 l, t, 31;", "shr.u32 i, c, 5;",
      "setp.lt.u32 pt, t, 128;", "setp.eq.u32 p0, t, 0;",
      # Mosaic GPU reverses the grid: ctaid.x is the K chunk.
      "mov.u32 a, %ctaid.x;", f"mul.lo.u32 a, a, {CHUNK};",
      "mad.lo.u32 a, l, 8, a;", "mad.lo.u32 a, i, 2, a;",
      "cvta.to.global.u64 px, $4;",
  ]
  if swiglu is None:
    lines += ["mul.wide.u32 d, a, 2;", "add.u64 px, px, d;",
              "ld.global.nc.b32 w, [px];"]
  else:
    lines += swiglu_lines(swiglu, dtype_name)[0]
  if norm is not None:
    lines += norm_loads
  lines += [
      # The nested codes (g0, g1), the offset (g2), the span (g3 on).
      "cvta.to.global.u64 pc, $5;", "mul.wide.u32 d, c, 4;",
      "add.u64 pc, pc, d;", "ld.global.nc.f32 g0, [pc];",
      "ld.global.nc.f32 g1, [pc+512];", "cvta.to.global.u64 pf, $7;",
      "@p0 ld.global.nc.f32 g2, [pf];",
  ]
  # The span: nested[start + c + 128 j] (clamped) to span word c + 128 j.
  span_start(lines, n, rows_a_program, k // 64, group0)
  lines += ["add.u32 a, a, c;", "cvta.to.global.u64 pc, $6;"]
  for j in range(loads):
    lines += [f"add.u32 q, a, {128 * j};", f"min.u32 q, q, {n_nested - 1};",
              "mul.wide.u32 d, q, 4;", "add.u64 d, d, pc;",
              f"ld.global.nc.f32 g{3 + j}, [d];"]
  if swiglu is not None:
    lines += swiglu_lines(swiglu, dtype_name)[1]
  elif dtype_name == "bfloat16":
    lines += ["shl.b32 a, w, 16;", "mov.b32 x0, a;",
              "and.b32 a, w, 0xffff0000;", "mov.b32 x1, a;"]
  else:
    lines += ["mov.b32 {hx0, hx1}, w;", "cvt.f32.f16 x0, hx0;",
              "cvt.f32.f16 x1, hx1;"]
  if norm is not None:
    lines += norm_math
  values = 256 // wgs  # byte values a thread
  his = values // 16
  # a: the table address of byte position 4 l + i for byte value 0.
  lines += ["shl.b32 a, i, 4;", "add.u32 a, a, l;"] + _offset("a", "b")
  lines += ["add.u32 a, a, $0;"]
  if wgs == 1:
    lines += [f"mul.rn.f32 h{c}, x0, {_f32(v)};" for c, v in enumerate(code)]
  else:  # warpgroup 1 takes byte values 128-255: high nibbles 8-15
    lines += ["shr.u32 b, t, 7;", "setp.eq.u32 lo, b, 0;"]
    for c in range(his):
      lines += [f"selp.f32 cc, {_f32(code[c])}, {_f32(code[c + his])}, lo;",
                f"mul.rn.f32 h{c}, x0, cc;"]
    lines += ["and.b32 b, b, 1;", f"mad.lo.u32 a, b, {_ROW * values}, a;"]
  lines += [f"mul.rn.f32 o{c}, x1, {_f32(v)};" for c, v in enumerate(code)]
  if loads_first and loads_fence:
    lines += ["fence.acq_rel.cta;"]
  elif loads_first:
    lines += ["{", ".reg .pred lf;", "add.f32 e, x0, x1;",
              "add.f32 e, e, g0;", "add.f32 e, e, g1;"]
    lines += [f"add.f32 e, e, g{3 + j};" for j in range(loads)]
    lines += ["@p0 add.f32 e, e, g2;", "setp.eq.f32 lf, e, 0f7F7FFFFF;",
              "and.pred lf, lf, pw;", "@!lf bra LUT_LOADED;",
              "st.shared.f32 [a], e;", "LUT_LOADED:", "}"]
  for b in range(values):
    lines += [f"add.rn.f32 e, h{b >> 4}, o{b & 15};",
              f"@pw st.shared.f32 [a+{_ROW * b}], e;"]
  lines += ["shl.b32 a, c, 2;", "add.u32 a, a, $1;",
            "@pt st.shared.f32 [a], g0;", "@pt st.shared.f32 [a+512], g1;",
            "@p0 st.shared.f32 [a+1024], g2;",
            "shl.b32 a, t, 2;", "add.u32 a, a, $3;",
            "@pw st.shared.u32 [a], 0;",
            "shl.b32 b, c, 2;", "add.u32 b, b, $2;"]
  lines += [f"@pt st.shared.f32 [b+{512 * j}], g{3 + j};"
            for j in range(loads)]
  if skip:
    lines += ["LUT_BUILT:"]
  lines += [f"@pw bar.sync 15, {128 * wgs};" if early else "bar.sync 0;",
            "}"]
  return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def step_ptx(n: int, k: int, steps: int, n_pad: int, step_rows: int,
             wgs: int = 1, group0: int = 0, row0: int = 0) -> str:
  """One pipeline step of one compute thread: `step_rows / 4` rows of its
  warp, in warpgroup `tid / 128`'s `step_rows` rows of the step's tile.

  Operands (no results): `$0` the weight tile's shared address
  (`[wgs step_rows, 128]` bytes), `$1` the codes tile's (`[wgs step_rows,
  16]`), `$2` the table's, `$3` the nested table's, `$4` the nested
  span's, `$5` the step counters'; `$6` the output (global, fp32
  `[chunks, n_pad]`). In a group of weights, this weight's row groups
  start at `group0` and its rows at output row `row0`.
  """
  nkb = k // 64
  wr = step_rows // 4  # rows a warp
  per = wr // 8  # (row, block) sums a lane after the 8-lane reduce-scatter
  lines = [
      "{",
      ".reg .b32 tid, l, wp, j, g, s, stp, r0, a, b, c, tb<4>, wa, ca, lo, "
      "ro, sa;",
      f".reg .b32 w<{wr}>;",
      f".reg .f32 v<{wr}>, t<4>, sd, kp, cv<{per}>, nv<{per}>, off;",
      ".reg .b64 po, d;",
      ".reg .pred p;",
      "mov.u32 tid, %tid.x;", "and.b32 l, tid, 31;", "shr.u32 wp, tid, 5;",
      "shr.u32 g, l, 3;", "and.b32 j, l, 7;",
      # Row of this warp's first row in the step's tile: warpgroup, warp.
      f"mul.lo.u32 ro, wp, {wr};",
      "shl.b32 sa, tid, 2;", "add.u32 sa, sa, $5;",
      "ld.shared.u32 stp, [sa];",
  ]
  span_start(lines, n, steps * step_rows * wgs, nkb, group0)
  lines += [
      "mov.u32 lo, a;",
      # ctaid.y is the row group, ctaid.x the K chunk.
      "mov.u32 a, %ctaid.y;", f"sub.u32 a, a, {group0};",
      f"mad.lo.u32 a, a, {steps}, stp;",
      f"mad.lo.u32 r0, a, {step_rows * wgs}, ro;",
      "mov.u32 s, %ctaid.x;", "cvta.to.global.u64 po, $6;",
  ]
  # This lane's rows after the reduce-scatter: per j + q, block 4 s + g.
  # Their nested absmax from the span, their codes from the tile (row
  # ro + per j + q, column 4 (s % 4) + g).
  for q in range(per):
    lines += [f"mad.lo.u32 a, j, {per}, r0;", f"add.u32 a, a, {q};",
              f"min.u32 a, a, {n - 1};", f"mul.lo.u32 a, a, {nkb};",
              "mad.lo.u32 a, s, 4, a;", "add.u32 a, a, g;",
              "shr.u32 a, a, 8;", "sub.u32 a, a, lo;", "shl.b32 a, a, 2;",
              "add.u32 a, a, $4;", f"ld.shared.f32 nv{q}, [a];"]
  lines += [f"mad.lo.u32 ca, j, {per}, ro;",
            f"mul.lo.u32 ca, ca, {_CODES};", "and.b32 a, s, 3;",
            "mad.lo.u32 ca, a, 4, ca;", "add.u32 ca, ca, g;",
            "add.u32 ca, ca, $1;"]
  for q in range(per):
    lines += [f"ld.shared.u8 c, [ca+{q * _CODES}];", "shl.b32 c, c, 2;",
              "add.u32 c, c, $3;", f"ld.shared.f32 cv{q}, [c];"]
  lines += ["ld.shared.f32 off, [$3+1024];"]
  # The lane's table offsets (`_offset`) of its bytes 0-3; the warp's
  # rows of the weight tile.
  for i in range(4):
    lines += [f"add.u32 tb{i}, l, {16 * i};"] + _offset(f"tb{i}", "a")
  lines += ["shl.b32 a, l, 2;", "mad.lo.u32 wa, ro, 128, a;",
            "add.u32 wa, wa, $0;"]
  lines += [f"ld.shared.u32 w{r}, [wa+{128 * r}];" for r in range(wr)]
  for r in range(wr):
    for i in range(4):  # the offset with byte i of the word as byte 1
      lines += [f"prmt.b32 b, w{r}, tb{i}, {0x7604 + 16 * i};",
                "add.u32 b, b, $2;", f"ld.shared.f32 t{i}, [b];"]
    lines += ["add.f32 t0, t0, t1;", "add.f32 t2, t2, t3;",
              f"add.f32 v{r}, t0, t2;"]

  def halve(count, mask):
    """Reduce-scatter over lanes `l ^ mask`: keep half of `count` values."""
    out = [f"and.b32 a, l, {mask};", "setp.ne.u32 p, a, 0;"]
    for q in range(count // 2):
      lo_, hi = f"v{q}", f"v{q + count // 2}"
      out += [f"selp.f32 sd, {lo_}, {hi}, p;",
              f"selp.f32 kp, {hi}, {lo_}, p;",
              f"shfl.sync.bfly.b32 sd, sd, {mask}, 0x1f, 0xffffffff;",
              f"add.f32 {lo_}, kp, sd;"]
    return out

  # wr rows over the 8 lanes of a block: lane j keeps rows per j + q.
  lines += halve(wr, 4) + halve(wr // 2, 2) + halve(wr // 4, 1)
  for q in range(per):
    lines += [f"mul.rn.f32 cv{q}, cv{q}, nv{q};",
              f"add.rn.f32 cv{q}, cv{q}, off;",
              f"mul.f32 v{q}, v{q}, cv{q};"]
  # The four blocks: lanes l ^ 16 split the rows, then l ^ 8.
  lines += halve(per, 16)
  if per == 2:  # 16 rows a warp: lanes l and l ^ 8 share a row
    lines += ["shfl.sync.bfly.b32 sd, v0, 8, 0x1f, 0xffffffff;",
              "add.f32 v0, v0, sd;",
              "and.b32 a, l, 8;", "setp.eq.u32 p, a, 0;",
              "shr.u32 a, l, 4;"]
  else:  # 32: row per j + 2 (l >> 4) + (l >> 3 & 1), one a lane
    lines += halve(2, 8)
    lines += ["setp.eq.u32 p, j, j;", "shr.u32 a, l, 4;", "shl.b32 a, a, 1;",
              "shr.u32 b, l, 3;", "and.b32 b, b, 1;", "add.u32 a, a, b;"]
  lines += [f"mad.lo.u32 a, j, {per}, a;", "add.u32 a, a, r0;",
            f"add.u32 a, a, {row0};", f"mad.lo.u32 a, s, {n_pad}, a;",
            "mul.wide.u32 d, a, 4;", "add.u64 d, d, po;",
            "@p st.global.f32 [d], v0;",
            "add.u32 stp, stp, 1;", "st.shared.u32 [sa], stp;",
            "}"]
  return "\n".join(lines)


def _address(ref, bits):
  return llvm.ptrtoint(ir.IntegerType.get_signless(bits),
                       mgpu.utils.memref_ptr(ref))


def row_plan(ns, k, rows, tile_rows, blocks=4):
  """Per weight: (row groups, steps, padded rows, span, first group,
  first output row); and the total padded rows. A program takes `blocks`
  absmax blocks of each of its rows."""
  plan, group0, row0 = [], 0, 0
  for n, r in zip(ns, rows):
    steps, n_pad, span = layout(n, k, r, tile_rows, blocks)
    plan.append((r, steps, n_pad, span, group0, row0))
    group0 += r
    row0 += n_pad
  return plan, row0


def inline_ptx(text: str, refs, shared: int,
               written: int | None = None) -> None:
  """Runs the PTX block `text` (no results) with the addresses of `refs` as
  its operands: the first `shared` as 32-bit shared-memory addresses, the
  rest as 64-bit global ones. The PTX writes the first `written` refs
  (all by default) and only reads the rest (the kernel's inputs)."""
  written = len(refs) if written is None else written
  @plgpu.inline_mgpu(arg_types=tuple(_backend.ref_type(write=j < written)
                                     for j in range(len(refs))))
  def call(ctx, *refs):
    del ctx
    llvm.inline_asm(ir.Type.parse("!llvm.void"),
                    [_address(r, 32) for r in refs[:shared]]
                    + [_address(r, 64) for r in refs[shared:]],
                    text, ",".join(["r"] * shared
                                   + ["l"] * (len(refs) - shared))
                    + ",~{memory}", has_side_effects=True)
  call(*refs)


def pipelines(name: str, ns, plan, ptx, tile_rows: int, stages: int,
              wgs: int, kchunks: int = 1, norm_weight: bool = False):
  """The kernel body of a program over the weights' row groups (`row_plan`),
  named `name`: for the weight that owns row group `n`, its build PTX
  (`ptx[g][0]`), then a TMA pipeline of its `[tile_rows, 128]` weight and
  `[tile_rows, 16]` codes tiles of K chunk `s`, each step running its step
  PTX (`ptx[g][1]`) on `wgs` compute warpgroups (beside a TMA one when
  2). With `kchunks` > 1 a program takes the K chunks `kchunks s` to
  `kchunks (s + 1) - 1`, in turn for each row tile, and a fifth scratch
  buffer (the step PTX's accumulators between steps) follows the step
  counters. Refs: x, five inputs a weight, the output, then the scratch
  buffers: the kernel's own (a table, x's copy), the nested table, the
  span, the step counters (and the accumulators). The build PTX gets the
  four first scratch addresses, x and the weight's nested codes, nested
  absmax and offset (and, with `norm_weight`, the ref after x: an
  RMSNorm's weight, `NormInput`); the step PTX the two tiles, the scratch
  buffers and the output."""
  def kernel(x_gmem, *refs):
    norm_gmem = (refs[0],) if norm_weight else ()
    refs = refs[len(norm_gmem):]
    ins = refs[:5 * len(ns)]
    o_gmem, own_smem, c2_smem, sp_smem, cnt_smem = refs[5 * len(ns):][:5]
    extra = refs[5 * len(ns) + 5:]
    i = lax.axis_index("n")
    s = lax.axis_index("s")
    for g, (n, (r, steps, _, _, group0, _)) in enumerate(zip(ns, plan)):
      w_gmem, c_gmem, ns_gmem, nc_gmem, off_gmem = ins[5 * g:5 * g + 5]
      bptx, sptx = ptx[g]
      last = -(-n // tile_rows) - 1

      @pl.when((i >= group0) & (i < group0 + r))
      def _(w_gmem=w_gmem, c_gmem=c_gmem, ns_gmem=ns_gmem, nc_gmem=nc_gmem,
            off_gmem=off_gmem, bptx=bptx, sptx=sptx, steps=steps,
            group0=group0, last=last):
        def build():
          inline_ptx(bptx, (own_smem, c2_smem, sp_smem, cnt_smem, x_gmem,
                            nc_gmem, ns_gmem, off_gmem, *norm_gmem), 4,
                     written=4)

        def body(_, w_smem, c_smem):
          inline_ptx(sptx, (w_smem, c_smem, own_smem, c2_smem, sp_smem,
                            cnt_smem, *extra, o_gmem), 6 + len(extra))

        # Steps past the last row tile re-read it; their rows are padding.
        def tile(t):
          return jnp.minimum((i - group0) * steps + t, last)

        if kchunks == 1:
          specs = [pl.BlockSpec((tile_rows, CHUNK // 2),
                                lambda t: (tile(t), s)),
                   pl.BlockSpec((tile_rows, _CODES),
                                lambda t: (tile(t), s // 4))]
        else:  # step t: row tile t // kchunks, chunk t % kchunks of s's
          specs = [pl.BlockSpec(
                       (tile_rows, CHUNK // 2),
                       lambda t: (tile(t // kchunks),
                                  s * kchunks + t % kchunks)),
                   pl.BlockSpec(
                       (tile_rows, _CODES),
                       lambda t: (tile(t // kchunks),
                                  (s * kchunks + t % kchunks) // 4))]
        if wgs == 1:
          build()
          plgpu.emit_pipeline(body, grid=(steps * kchunks,), in_specs=specs,
                              max_concurrent_steps=stages)(w_gmem, c_gmem)
          return
        pipe = plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps * kchunks,), memory_registers=40,
            in_specs=specs, wg_axis="wg", num_compute_wgs=wgs,
            max_concurrent_steps=stages)
        built_then_pipelined(build, pipe, w_gmem, c_gmem)

  kernel.__name__ = kernel.__qualname__ = name
  return kernel


def built_then_pipelined(build, pipe, *gmem,
                         alloc_first: bool | None = None) -> None:
  """`build()`, then the warp-specialized pipeline `pipe` over the global
  refs `gmem`. With `alloc_first` (default `ALLOC_FIRST`), the pipeline's
  buffers and barriers are allocated before the build, in a scope of the
  "wg" threads, and handed to it (`allocations=`): its own scope would
  start with a barrier of every thread, after the build."""
  alloc_first = ALLOC_FIRST if alloc_first is None else alloc_first

  def run(**allocations):
    build()
    # None: the pipeline allocates its buffers itself.
    pipe(*gmem, allocations=allocations or None)
  if alloc_first:
    pl.run_scoped(run, **pipe.get_allocations(*gmem), collective_axes="wg")
  else:
    run()


@lowering.lowered_once
def _compiled(x, weights, *, code, ns, k, rows, step_rows, stages, wgs,
              early, tma_skips_build, swiglu=None, dtype=None, raw=False,
              norm=None):
  """The Mosaic GPU kernel over one or several weights `(packed, codes,
  nested absmax, nested codes, offset `[1]`)`, its fp32 partials
  `[chunks, sum n_pad]` summed over the chunks: `[1, n]` per weight; with
  `raw`, the partials themselves and `row_plan`'s plan. With `swiglu`,
  `x` is an earlier launch's partials (`SwigluInput`) and `dtype` the
  compute dtype; with `norm`, `(NormInput, weight)`, x is RMSNorm'd in
  the build (the weight in x's dtype)."""
  dtype = jnp.dtype(x.dtype if swiglu is None else dtype)
  chunks = k // CHUNK
  tile_rows = step_rows * wgs
  plan, n_pad = row_plan(ns, k, rows, tile_rows)
  span = max(p[3] for p in plan)
  ptx = [(build_ptx(code, dtype.name, n, k, steps * tile_rows, span,
                    w[2].shape[0], wgs, early, group0, tma_skips_build,
                    swiglu, None if norm is None else norm[0],
                    LOADS_FIRST and swiglu is None and norm is None,
                    LOADS_FENCE),
          step_ptx(n, k, steps, n_pad, step_rows, wgs, group0, row0))
         for n, w, (_, steps, _, _, group0, row0) in zip(ns, weights, plan)]

  threads = {} if wgs == 1 else dict(num_threads=wgs + 1, thread_name="wg")
  kernel = plgpu.kernel(
      pipelines("jaxbnb_gemv_4bit_lut", ns, plan, ptx, tile_rows, stages,
                wgs, norm_weight=norm is not None),
      out_type=jax.ShapeDtypeStruct((chunks, n_pad), jnp.float32),
      grid=(sum(rows), chunks), grid_names=("n", "s"), **threads,
      scratch_types=[plgpu.SMEM((256, CHUNK // 2), jnp.float32),
                     plgpu.SMEM((4, 128), jnp.float32),
                     plgpu.SMEM((span // 128, 128), jnp.float32),
                     plgpu.SMEM((wgs, 128), jnp.uint32)])
  args = []
  for (packed, codes, nested_absmax, nested_code, offset), n in zip(weights,
                                                                   ns):
    args += [packed.reshape(n, k // 2), codes_tiles(codes, n, k),
             nested_absmax, nested_code, offset]
  part = kernel(x.reshape(-1), *(() if norm is None else (norm[1],)), *args)
  if raw:
    return part, plan
  # The chunks summed over every weight's rows as adds (`sum_splits`: XLA
  # fuses them into the consumer), then each weight's rows.
  total = sum_splits(part)
  return [total[None, p[5]:p[5] + n] for p, n in zip(plan, ns)]


def _twin(x, packed, codes, nested_absmax, nested_code, offset, *, code, n,
          k):
  """The kernel's values in jnp: the byte tables (products and their sum
  rounded once in fp32), a block's 32 lookups summed, times the fp32
  absmax; partials per K chunk, `[chunks, n]`."""
  chunks = k // CHUNK
  xf = x.reshape(k // 2, 2).astype(jnp.float32)
  c = jnp.asarray(code, jnp.float32)
  b = packed.reshape(n, k // 2).astype(jnp.int32)
  hi = c[b >> 4] * xf[None, :, 0]
  lo = c[b & 15] * xf[None, :, 1]
  blocks = (hi + lo).reshape(n, k // 64, 32).sum(-1)
  absmax = decode_absmax(codes, jnp.arange(codes.shape[0]), nested_absmax,
                         nested_code.astype(jnp.float32), offset, 256,
                         nested_absmax.shape[0], True).reshape(n, k // 64)
  return (blocks * absmax).reshape(n, chunks, 4).sum(-1).T


def group_config(ns: tuple[int, ...], k: int,
                 num_sms: int | None = None) -> dict:
  """`gemv_group`'s keywords for weights `[n_g, k]`: `default_config` of
  all their rows, its row groups shared in proportion to the rows (one at
  least a weight), fewer stages or more groups where the shared memory
  would not hold them."""
  if num_sms is None:
    num_sms = _backend.num_sms()
  cfg = default_config(sum(ns), k, num_sms)
  cfg["rows"], cfg["stages"] = fit(
      ns, cfg["rows"], cfg["stages"],
      functools.partial(_group_smem, ns, k, step_rows=64, wgs=2))
  return cfg


def _group_smem(ns, k, rows, step_rows, stages, wgs):
  return max(smem_bytes(n, k, r, step_rows, stages, wgs)
             for n, r in zip(ns, rows))


def group_args(weights, code, ns, rows, stages, default):
  """The checked `(code, rows)` of a group call: one weight an entry of
  `ns`, 16 code values, one row-group count >= 1 a weight (`rows` None:
  `default()`; an int for one weight) and `stages` >= 1.

  Raises:
    ValueError: naming the argument.
  """
  if len(weights) != len(ns) or not ns:
    raise ValueError(f"weights: one per entry of ns ({len(ns)}), got "
                     f"{len(weights)}")
  code = tuple(float(c) for c in code)
  if len(code) != 16:
    raise ValueError(f"code: needs 16 values, got {len(code)}")
  if rows is None:
    rows = default()
  rows = tuple(int(r) for r in (rows if isinstance(rows, (tuple, list))
                                else (rows,)))
  if len(rows) != len(ns) or min(rows) < 1:
    raise ValueError(f"rows: one count >= 1 per weight ({len(ns)}), got "
                     f"{rows if len(rows) > 1 else rows[0]}")
  if stages < 1:
    raise ValueError(f"stages: must be >= 1, got {stages}")
  return code, rows


def _prepared(weights):
  """Each weight's `(packed, codes, nested_absmax, nested_code, offset)`
  as the kernel reads them: fp32 nested absmax and codes, offset `[1]`
  (a separate input: no XLA kernel to join it to the codes)."""
  return [(p, c, na.astype(jnp.float32),
           nc.astype(jnp.float32), jnp.asarray(off, jnp.float32).reshape(1))
          for p, c, na, nc, off in weights]


def _norm_arg(rms_norm, k: int, dtype):
  """`(NormInput, weight in dtype)` of an `rms_norm=(weight [k], eps)`
  argument, or None.

  Raises:
    ValueError: naming `rms_norm` when the weight is not `[k]`.
  """
  if rms_norm is None:
    return None
  weight, eps = rms_norm
  if tuple(weight.shape) != (k,):
    raise ValueError(f"rms_norm: needs a weight of shape ({k},), got "
                     f"{tuple(weight.shape)}")
  return NormInput(float(eps)), weight.astype(dtype)


def gemv_group(x: jax.Array, weights, *, code: tuple[float, ...],
               ns: tuple[int, ...], k: int, rows=None, step_rows: int = 64,
               stages: int = 4, wgs: int = 1, early: bool = False,
               tma_skips_build: bool = False, rms_norm=None,
               interpret: bool = False) -> tuple[jax.Array, ...]:
  """`gemv` of several weights that read the same x, in one launch (a
  layer's gate and up projections): the programs' row groups are shared
  among the weights, each program making its weight's table.

  Args:
    x: `[1, k]` bfloat16 or float16.
    weights: `(packed, codes, nested_absmax, nested_code, offset)` per
      weight, as `gemv` takes them.
    code: the 16 code values (static), one code for all.
    ns: rows of each weight.
    k: columns, a multiple of 256 (`CHUNK`).
    rows: row groups of each weight; default `group_config`'s.
    step_rows, stages, wgs, early, tma_skips_build, interpret: as `gemv`.
    rms_norm: `(weight [k], eps)`: multiply `rms_norm.reference(x, weight,
      eps)` instead of x, the norm made in each program's table build
      (`NormInput`; with two compute warpgroups, only with
      `tma_skips_build`). The twin normalizes by the reference.

  Returns:
    float32 `[1, n_g]` per weight (the twin sums its K chunks in
    `sum_splits`' order, as the compiled path sums the kernel's).
  """
  ns = tuple(ns)
  norm = _norm_arg(rms_norm, k, x.dtype)
  if norm is not None:
    if wgs > 1 and not tma_skips_build:
      raise ValueError("rms_norm: with two compute warpgroups needs "
                       "tma_skips_build=True (the compute threads meet at a "
                       "barrier the memory warpgroup must skip)")
  if len(weights) == len(ns):
    for n in ns:
      check(x.shape[0], n, k, 64, x.dtype, True)
  code, rows = group_args(
      weights, code, ns, rows, stages,
      lambda: group_config(ns, k)["rows"] if len(ns) > 1 else (
          default_rows(ns[0], k),))
  if step_rows not in STEP_ROWS:
    raise ValueError(f"step_rows: must be 64 or 128, got {step_rows}")
  if wgs not in (1, 2):
    raise ValueError(f"wgs: must be 1 or 2, got {wgs}")
  if early and wgs != 2:
    raise ValueError("early: needs two compute warpgroups (wgs=2), got "
                     f"wgs={wgs}")
  if tma_skips_build and wgs != 2:
    raise ValueError("tma_skips_build: needs two compute warpgroups (wgs=2; "
                     f"one beside them for the TMA), got wgs={wgs}")
  need = _group_smem(ns, k, rows, step_rows, stages, wgs)
  if need > _backend.HOPPER_SMEM:
    what = (f"{rows[0]} row groups of {ns[0]} rows" if len(ns) == 1 else
            f"row groups {rows} of {ns} rows")
    raise ValueError(
        f"rows/stages: {what} with {stages} stages of {wgs} x {step_rows} "
        f"rows need {need} bytes of shared memory, more than "
        f"{_backend.HOPPER_SMEM}; take more row groups or fewer stages")
  prepared = _prepared(weights)
  if interpret:
    if norm is not None:
      x = rms_norm_lib.reference(x, norm[1], norm[0].eps)
    return tuple(sum_splits(_twin(x, p, c, na, nc, off, code=code, n=n,
                                  k=k))[None]
                 for (p, c, na, nc, off), n in zip(prepared, ns))
  if not available():
    raise RuntimeError(
        "the table GEMV needs Mosaic GPU's inline_mgpu and emit_pipeline "
        f"(jax 0.11.2 has them); this JAX is {jax.__version__}")
  return tuple(_compiled(
      x, prepared, code=code, ns=ns, k=k, rows=rows, step_rows=step_rows,
      stages=stages, wgs=wgs, early=early, tma_skips_build=tma_skips_build,
      norm=norm))


def gemv_swiglu(x: jax.Array, gate, up, down, *, code: tuple[float, ...],
                n: int, k: int, n_out: int, rms_norm=None,
                residual: jax.Array | None = None,
                interpret: bool = False) -> jax.Array:
  """`down(silu(x @ gate.T) * (x @ up.T))` for one row of x (a SwiGLU
  MLP at decode time) in two launches: gate and up in one (`gemv_group`'s
  default config), which leaves its fp32 partials unsummed, and down,
  whose programs make their columns of x from those partials while they
  build their tables (`SwigluInput`, `swiglu_lines`): the partials' sum
  and `silu(gate) * up`, a kernel of their own otherwise, are gone.

  The values are the unfused path's (`gemv_group` for gate and up,
  rounded to x's dtype, `jax.nn.silu(gate) * up`, `gemv`): the chunks
  summed in `sum_splits`'s order, the sigmoid by `ex2.approx` and an fp32
  reciprocal (XLA's own formula may differ by a unit in the last place
  of the 16-bit value). `interpret=True` runs exactly that composition
  of the jnp twins. The model reaches it through `F.matmul_4bit_swiglu`
  where `gemv_4bit.SWIGLU_FUSED` is on (the default since the H200
  measured it, thirty-fourth session).

  Args:
    x: `[1, k]` bfloat16 or float16.
    gate, up: `(packed, codes, nested_absmax, nested_code, offset)` of
      the `[n, k]` weights, as `gemv` takes them.
    down: the same of the `[n_out, n]` weight.
    code: the 16 code values (static), one code for all three.
    n: rows of gate and up (down's k), a multiple of 256.
    k: columns of gate and up, a multiple of 256.
    n_out: rows of down.
    rms_norm: `(weight [k], eps)`: x RMSNorm'd first, in gate/up's table
      builds (`gemv_group`'s `rms_norm`).
    residual: `[1, n_out]` in x's dtype, or None: the result is then
      `residual + y` with y rounded to x's dtype first (a decoder layer's
      `x + mlp(x)`), made from down's partials in one more launch
      (`split_sum.add_splits`, where `RESIDUAL_KERNEL` is on and it
      takes `n_out`) instead of XLA's sum and add.
    interpret: the jnp twins (CPU); with `residual`, `add_splits` in
      Pallas' interpreter on down's twin partials.

  Returns:
    float32 `[1, n_out]`, or with `residual` `[1, n_out]` in x's dtype.

  Example (the jnp twins, on any device):

    >>> import jax.numpy as jnp
    >>> from pallas_kernels import gemv_4bit_lut
    >>> def weight(rows, cols, byte):
    ...   return (jnp.full((rows * cols // 2,), byte, jnp.uint8),
    ...           jnp.zeros((rows * cols // 64,), jnp.uint8),
    ...           jnp.full((-(-rows * cols // 64 // 256),), 1.0, jnp.float32),
    ...           jnp.ones((256,), jnp.float32), 0.0)
    >>> y = gemv_4bit_lut.gemv_swiglu(
    ...     jnp.full((1, 1024), 0.001, jnp.bfloat16), weight(1024, 1024, 0x11),
    ...     weight(1024, 1024, 0x22), weight(64, 1024, 0x11),
    ...     code=tuple(range(16)), n=1024, k=1024, n_out=64, interpret=True)
    >>> y.shape, y.dtype
    ((1, 64), dtype('float32'))
  """
  dtype = jnp.dtype(x.dtype)
  for n_, k_ in ((n, k), (n, k), (n_out, n)):
    check(x.shape[0], n_, k_, 64, dtype, True)
  for name, w in (("gate", gate), ("up", up), ("down", down)):
    if len(w) != 5:
      raise ValueError(f"{name}: needs (packed, codes, nested_absmax, "
                       f"nested_code, offset), got {len(w)} entries")
  code = tuple(float(c) for c in code)
  if len(code) != 16:
    raise ValueError(f"code: needs 16 values, got {len(code)}")
  norm = _norm_arg(rms_norm, k, dtype)
  if residual is not None and (residual.shape != (1, n_out)
                               or residual.dtype != dtype):
    raise ValueError(f"residual: needs {dtype} {(1, n_out)}, got "
                     f"{residual.dtype} {residual.shape}")
  add_kernel = (residual is not None and RESIDUAL_KERNEL
                and split_sum.can_add(n_out))
  gate, up, down = _prepared((gate, up, down))
  if interpret:
    g, u = gemv_group(x, [gate, up], code=code, ns=(n, n), k=k,
                      rms_norm=rms_norm, interpret=True)
    h = jax.nn.silu(g.astype(dtype)) * u.astype(dtype)
    if add_kernel:
      return split_sum.add_splits(_twin(h, *down, code=code, n=n_out, k=n),
                                  residual, interpret=True)
    y = gemv(h, *down, code=code, n=n_out, k=n, interpret=True)
    return y if residual is None else residual + y.astype(dtype)
  if not available():
    raise RuntimeError(
        "the table GEMV needs Mosaic GPU's inline_mgpu and emit_pipeline "
        f"(jax 0.11.2 has them); this JAX is {jax.__version__}")
  first = group_config((n, n), k)
  part, plan = _compiled(x, [gate, up], code=code, ns=(n, n), k=k,
                         rows=first["rows"], step_rows=first["step_rows"],
                         stages=first["stages"], wgs=first["wgs"],
                         early=first["early"],
                         tma_skips_build=first["tma_skips_build"], raw=True,
                         norm=norm)
  second = group_config((n_out,), n)
  out = _compiled(part, [down], code=code, ns=(n_out,), k=n,
                  rows=second["rows"], step_rows=second["step_rows"],
                  stages=second["stages"], wgs=second["wgs"],
                  early=second["early"],
                  tma_skips_build=second["tma_skips_build"],
                  swiglu=SwigluInput(k // CHUNK, part.shape[1], plan[1][5]),
                  dtype=dtype, raw=add_kernel)
  if add_kernel:
    down_part, down_plan = out
    return split_sum.add_splits(down_part, residual, row0=down_plan[0][5])
  y = out[0]
  return y if residual is None else residual + y.astype(dtype)


def gemv(x: jax.Array, packed: jax.Array, codes: jax.Array,
         nested_absmax: jax.Array, nested_code: jax.Array,
         offset: jax.Array, *, code: tuple[float, ...], n: int, k: int,
         rows: int | None = None, step_rows: int = 64, stages: int = 4,
         wgs: int = 1, early: bool = False, tma_skips_build: bool = False,
         interpret: bool = False) -> jax.Array:
  """`x @ W.T` in fp32 for one row of x and a double-quantized 4-bit
  `W [n, k]` (blocksize 64, 256 codes a nested absmax).

  Args:
    x: `[1, k]` bfloat16 or float16.
    packed: uint8 `[n * k / 2]`, bitsandbytes' order.
    codes: uint8 `[n * k / 64]`, the absmax codes.
    nested_absmax: float32 `[ceil(n * k / 64 / 256)]`.
    nested_code: float32 `[256]`, the nested map.
    offset: float32 scalar.
    code: the 16 code values (static).
    n, k: the weight's shape; k a multiple of 256 (`CHUNK`; past whole
      1024s the codes' rows are padded, `codes_tiles`).
    rows: row groups (programs a K chunk); default `default_rows`.
    step_rows: rows a compute warpgroup takes a pipeline step, 64 or 128
      (16 or 32 a warp).
    stages: pipeline steps in flight.
    wgs: compute warpgroups: 1, or 2 beside a TMA warpgroup
      (`emit_pipeline_warp_specialized`), each taking `step_rows` rows of
      a step.
    early: with two compute warpgroups, the memory warpgroup does not wait
      for the table (`build_ptx`).
    tma_skips_build: with two compute warpgroups, the memory warpgroup
      branches past the table's whole block (`build_ptx`'s `skip`) instead
      of running it with its stores off. Same bits on the GPU. The
      twenty-sixth session's sweep (docs/bench/gemv_lut_sweep.py run e)
      saw no steady difference; the fifty-third session's per-program
      timeline saw its first tile come sooner, and `default_config`
      turns it on (this call's own defaults have one compute warpgroup,
      so it is off here).
    interpret: the jnp twin (CPU).

  Returns:
    float32 `[1, n]`.

  Example (the jnp twin, on any device): with the codes 0..15, a byte
  0x93 holds 9 and 3, and every absmax is its nested code 1.0 times the
  nested absmax 2.0 plus the offset 0.5, so a row of x = 1 gives
  (9 + 3) * 2.5 for each of the 512 bytes of a row:

    >>> import jax.numpy as jnp
    >>> from pallas_kernels import gemv_4bit_lut
    >>> n, k = 128, 1024
    >>> y = gemv_4bit_lut.gemv(
    ...     jnp.ones((1, k), jnp.bfloat16),
    ...     jnp.full((n * k // 2,), 0x93, jnp.uint8),
    ...     jnp.zeros((n * k // 64,), jnp.uint8),
    ...     jnp.full((8,), 2.0, jnp.float32), jnp.ones((256,), jnp.float32),
    ...     0.5, code=tuple(range(16)), n=n, k=k, interpret=True)
    >>> y.shape, float(y[0, 5])
    ((1, 128), 15360.0)
  """
  return gemv_group(x, [(packed, codes, nested_absmax, nested_code, offset)],
                    code=code, ns=(n,), k=k,
                    rows=None if rows is None else (rows,),
                    step_rows=step_rows, stages=stages, wgs=wgs, early=early,
                    tma_skips_build=tma_skips_build, interpret=interpret)[0]
