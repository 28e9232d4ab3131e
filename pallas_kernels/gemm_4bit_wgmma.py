"""4-bit GEMM on Hopper tensor cores (wgmma), the weights decoded in registers.

`y = x @ W.T` for a 4-bit `W [n, k]` (bitsandbytes' packing, blocksize 64)
at M = 64-256, where the GEMV kernels run out of steam and dequantize +
dot pays for a bf16 copy of W. A Mosaic GPU kernel computes the product
transposed, `y.T = W @ x.T`, so the decoded weight is wgmma's A operand,
which may live in registers:

* A pipeline (`plgpu.emit_pipeline`, `stages` steps in flight) copies each
  step's packed bytes `[tile_w, tile_k / 2]`, the blocks' scales and x's
  tile `[tile_x, tile_k]` (swizzled) into shared memory by TMA.
* Each compute warpgroup decodes its bytes straight into wgmma's A
  register layout
  (Mosaic GPU's `WGMMA_LAYOUT`: lane `4 g + c` of warp `w` holds rows
  `16 w + g` and `+ 8`, columns `8 j + 2 c, + 1`, i.e. byte `4 j + c` of
  each row). It reads a row's 32-byte block with two 16-byte shared loads,
  gathers byte `c` of every word with three byte permutes per four words,
  and decodes four bytes at a time with `lut_decode`'s permutes, scaled by
  the block's absmax in the compute dtype (as the GEMV kernels). There is
  one compute warpgroup ("plain"), or two behind a TMA warpgroup: on
  `tile_w` rows each, sharing x's tile ("ws"), or on the same rows and
  alternate K steps, their sums added at the end ("ks"). With `cluster`
  2 or 4, programs along the weight rows share one load of x's tile (TMA
  multicast).
* `wgmma` multiplies them with x's tile (B, transposed in shared memory)
  into an fp32 accumulator `[tile_w, tile_x]`.
* Options measured in the fifteenth session: the weight tile swizzled by
  TMA (`swizzle`: no bank conflicts in the decode's loads), the decode's
  register table words loaded from memory (`load_table`: ptxas otherwise
  re-creates them before every permute), and each step decoded in parts
  of 64 columns overlapping the previous part's wgmma (`overlap`). The
  defaults at M <= 128 use the first two.
* The absmax arrives as bf16 scale words made by XLA (`scale_words_t`, a
  TMA tile a step), or, given the double-quantized statistics, is decoded
  by the decode itself (`wgmma_decode.decode_ptx`'s `nested`): each step,
  every lane loads its rows' codes and nested values and the nested code
  values from global memory and rounds `code * nested` and `+ offset`
  apart, as bitsandbytes does, so no XLA pass runs before the kernel
  (sixteenth session; `kernels.gemm_decodes_nested` says where the
  package uses it). With `prefetch` each step makes the next step's
  scale words first (`wgmma_decode.scales_ptx`) and the pipeline carries
  them in registers: the default at M = 129-256 (seventeenth session; no
  gain measured at M <= 128).
* Weights of fewer than SPLIT_BELOW_N rows fill the SMs with K splits
  (`default_config`'s `n`): each program sums a part of K in float32 and
  XLA adds the parts. K splits as many of SPLIT_WAYS' ways as fit one
  wave: powers of two, and 3, 6, 9 or 12 where K takes them. With
  `tail_rows`, a weight's last rows run in a second launch split that
  way (a thin last wave of programs made into a full wave of short ones;
  `tail_rows_for`: by default where the last wave fills less than half
  of the SMs, for programs of at least TAIL_MIN_PROGRAM_SIZE weight
  elements).
* The decode's PTX text is built in `wgmma_decode`.
* The bf16 result is stored transposed into shared memory and goes out by
  TMA as `y[tile_x, tile_w]`. A float32 result (a bias, or K splits to
  sum) goes out as `y.T`, which XLA transposes: Mosaic GPU stores only
  16-bit values through a transposed view.

`interpret=True` runs a jnp twin with the same values (no PTX); the tests
run the decode PTX itself through an emulator on the CPU. Measured on the
H200 in docs/benchmarks.md ("4-bit GEMM on wgmma"); jaxbnb routes M =
64-256 on large weights here on Hopper, M = 64-128 (64-256 up to 8192
rows) on weights of 1024 rows or more and K of 1536 or more with K split,
and M up to 1024 on double-quantized weights of 4096 rows or more where
its programs fill the SMs' waves (`kernels.gemm_serves`,
`kernels.gemm_large_m`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax import lax

from pallas_kernels import _backend
from pallas_kernels import lowering
from pallas_kernels import lut_decode
from pallas_kernels import wgmma_decode
from pallas_kernels.dequantize_4bit import decode_absmax
from pallas_kernels.split_sum import sum_splits

try:  # pragma: no cover - depends on the installed JAX
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.extend.mlir import ir
  from jax._src.lib.mlir.dialects import llvm
  _HAVE_MGPU = all(hasattr(plgpu, a) for a in ("inline_mgpu", "emit_pipeline",
                                                 "kernel", "ACC", "wgmma"))
except ImportError:  # pragma: no cover
  _HAVE_MGPU = False

__all__ = ["available", "can_use", "check_config", "default_config", "gemm",
           "on_hopper", "scale_words_t"]


def available() -> bool:
  """Whether this JAX has the Mosaic GPU pieces the kernel uses."""
  return _HAVE_MGPU


on_hopper = _backend.on_hopper


# Shared memory a block may use on Hopper, less room for the pipeline's
# barriers.
SMEM_LIMIT = _backend.HOPPER_SMEM - 1024


def smem_bytes(tile_w: int, tile_x: int, tile_k: int, stages: int,
               variant: str, out_f32: bool) -> int:
  """Shared memory of a config: `stages` copies of a step's bytes, scales
  and x tile, and the output tile(s) (float32 with a bias or a K split)."""
  wgs = 2 if variant == "ws" else 1
  step = (wgs * tile_w * tile_k // 2 + tile_k // 64 * wgs * tile_w * 4
          + tile_x * tile_k * 2)
  if variant == "ks":  # two half-steps, and the second warpgroup's sums
    # (in the output tile itself when that is float32)
    return (stages * 2 * step + tile_w * tile_x * 4
            + (0 if out_f32 else tile_w * tile_x * 2))
  return stages * step + wgs * tile_w * tile_x * (4 if out_f32 else 2)


# Weights of fewer rows than this fill the H200's 132 SMs only with K
# splits: up to SPLIT_MAX_M rows of x (`default_config`'s `n`; sweep run
# m, seventeenth session), and up to 256 rows of x on weights of at most
# SPLIT_WIDE_MAX_N rows (sweep runs o and p, twenty-second session; run
# q, twenty-third session, for 6144 and 8192 rows, which take no split).
# Between SPLIT_WIDE_MAX_N and SPLIT_BELOW_N rows at M > SPLIT_MAX_M the
# package keeps dequantize + dot (run r: "ws" unsplit 52.5 us on 9216x4096
# against its 55.8, within the sweep's spread).
SPLIT_BELOW_N = 10240
SPLIT_MAX_M = 128
SPLIT_WIDE_MAX_N = 8192


# The ways K may split (`_split_config`). With powers of two only, a K of
# 2304 (Gemma-2-2B, 9 x 256) split at most 2 ways in "ks" and a 2304-row
# weight at M = 64 stopped at 72 programs of 132. Fifty-first session,
# sweep run ac (H100, NF4 + DQ, the sweep timer, us): 1024x2304 at M =
# 64 / 128 / 256 split 6 / 12 / 6 took 6.8 / 9.3 / 11.6 against the powers
# of two's split 2 / 4 / 2, 10.2 / 11.7 / 15.8; 2304x2304 split 3 / 6 / 3
# 9.0 / 11.3 / 14.9 against 10.8 / 12.1 / 16.5; 2048x2304 at M = 64 / 256
# split 3 8.8 / 14.2 against 10.8 / 14.8. `jaxbnb bench matmul`, both in
# one call: faster on all 13 cases whose split changed (1024x2304 at M =
# 64 / 128 / 256 6.6 / 8.7 / 10.8 against 10.0 / 11.0 / 14.8, XLA bf16
# 7.2 / 8.7 / 10.9; 2304x9216 16.9 / 20.8 / 31.5 against 20.6 / 25.6 /
# 42.5; 5120x13824 at M = 128 48.2 against 67.0).
SPLIT_WAYS = (1, 2, 3, 4, 6, 8, 9, 12, 16)


def _split_config(m: int, n: int, k: int | None) -> dict:
  """The K-split tiles for `n < SPLIT_BELOW_N` rows: "ks" with 256-column steps
  at M <= 64, "ws" with 128 at 65-128; at 129-256, x's 256-row tile in "plain"
  with 128-column steps and the scale words made ahead where the split is 1 or
  2 (more than 16 rows an SM: 2112 on 132 SMs), else "ks" with 64-column
  steps. K is split as many ways of SPLIT_WAYS (at most 8, 16 at M = 65-128)
  as keep the programs within one wave of the GPU's SMs (`_backend.num_sms`:
  132 on an H100 or H200 SXM; sweep run s, twenty-third session: on 6144x4096
  at M = 64 "ks" unsplit 19.2 us against split 2's 24.1, at M = 128 "ws"
  split 2 27.4 against split 4's 30.0; on 3072x4096 at M = 64 split 2 13.8
  against split 4's 17.5; XLA bf16 20.6, 23.4 and 17.0) and that K takes:
  the most ways first, each with the widest steps (halved from the
  variant's) that give every warpgroup two steps or more, else 64-column
  steps if K takes them. The stages double with each halving of the steps
  (at most 4, at most the steps).

  Sweep runs o and p (twenty-second session, the sweep timer, NF4 + DQ,
  us): 4096x14336 at M = 256 "plain" split 2 66.6 / 65.0 against the
  path before's 86.3 / 87.0 and XLA bf16's 49.0 / 46.7; 4096x4096 23.8 /
  26.1 against 32.1 / 29.6 and 19.1 / 17.9; 1024x4096 "ks" split 8 12.2
  against 15.1 and 12.7 at M = 256, "ws" split 16 9.5 against 14.2 and
  9.8 at M = 128, "ks" split 8 7.3 / 7.5 against 10.8 / 9.2 and 6.9 / 5.0
  at M = 64. Run q (twenty-third session): "plain" unsplit at M = 256
  37.9 us on 6144x4096 and 39.2 on 8192x4096 against dequantize + dot's
  46.0 and 51.3 and XLA's 25.1 and 27.3; split 2 45.7 and 49.4."""
  if m <= 64:
    cfg = dict(tile_w=64, tile_x=64, tile_k=256, stages=2, variant="ks",
               swizzle=True, load_table=True)
    rows, most = 64, 8
  elif m <= 128:
    cfg = dict(tile_w=64, tile_x=128, tile_k=128, stages=3, variant="ws",
               load_table=True)
    rows, most = 128, 16
  else:
    cfg = dict(tile_w=64, tile_x=256, tile_k=128, stages=2, variant="plain",
               prefetch=True)
    rows, most = 64, 8
  tiles = n // rows
  # As many ways as keep the programs within one wave of the SMs; a way
  # that is not a power of two only where K takes it in 64-column steps.
  sms = _backend.num_sms()
  # Past 2 ways "plain" becomes "ks" (below), so it counts as "ks" here.
  way_halves = 1 if cfg["variant"] == "ws" else 2
  ways = [s for s in SPLIT_WAYS if s == 1 or (
      s <= most and tiles * s <= sms
      and (not s & (s - 1)
           or k is not None and k % (64 * s * way_halves) == 0))]
  if cfg["variant"] == "plain" and ways[-1] > 2:
    cfg = dict(tile_w=64, tile_x=256, tile_k=64, stages=2, variant="ks",
               load_table=True)
  if k is None:
    return dict(cfg, split=ways[-1])
  halves = 2 if cfg["variant"] == "ks" else 1
  widths = [cfg["tile_k"] >> i for i in range(3) if cfg["tile_k"] >> i >= 64]

  def steps(tile_k, split):
    per = tile_k * split * halves
    return 0 if k % per else k // per

  split, tile_k = 1, 64
  for s in reversed(ways):
    if steps(64, s):
      split = s
      tile_k = next((w for w in widths if steps(w, s) >= 2), 64)
      break
  cfg["stages"] = max(1, min(4, cfg["stages"] * (cfg["tile_k"] // tile_k),
                             steps(tile_k, split)))
  cfg["tile_k"] = tile_k
  return dict(cfg, split=split)


def default_config(m: int, out_f32: bool = False,
                   k: int | None = None, nested: bool = False,
                   n: int | None = None) -> dict:
  """The tiles for M rows of x (and K, where given), the best of the H200
  sweeps (docs/benchmarks.md, "4-bit GEMM on wgmma" and the fifteenth
  session's runs g and h): one warpgroup with x's 64 rows at M <= 64,
  steps of 256 columns (128 where K is not a multiple of 256), the
  weight tile swizzled and the table words from memory; two compute
  warpgroups of 64 weight rows each, x's rows in one tile of 128 or 256,
  above (the table words from memory at M <= 128). With a float32
  output (a bias) the 256-row tile keeps two steps in flight, not four
  (shared memory). With `nested` (the kernel decodes the double
  quantization, a few loads a step) x's 128-row tile steps 256 columns,
  two in flight, where K allows and there is no float32 output: half the
  steps, so half the loads' latency (sixteenth session); x's 256-row
  tile steps 128 columns (two in flight; 64, four, where K is not a
  multiple of 128) and makes each step's scale words a step ahead
  (`prefetch`; without a float32 output; seventeenth session). Given
  `n` below SPLIT_BELOW_N at M <= SPLIT_MAX_M, or at most
  SPLIT_WIDE_MAX_N at M <= 256, K splits fill the SMs where they help
  (`_split_config`; seventeenth session's sweep run m: on 4096x14336 and
  4096x4096 at M = 64 "ks" split 2 took 38.2 and 20.2 us, "plain" split
  2 48.2 and 22.8, unsplit 80.2 and 30.2, and the package's path before
  51.5 and 29.8). Past M = 256 no weight splits K: x's 256-row tiles
  multiply the programs (forty-sixth session's sweep run t: unsplit
  "ws" took 53.3 us on 4096x4096 at M = 1024, where dequantize + dot
  took 59.6)."""
  if n is not None and n < SPLIT_BELOW_N and m <= 256 and (
      m <= SPLIT_MAX_M or n <= SPLIT_WIDE_MAX_N):
    return _split_config(m, n, k)
  if m <= 64:
    if k is not None and k % 256:
      return dict(tile_w=64, tile_x=64, tile_k=128, split=1, stages=4,
                  variant="plain", swizzle=True, load_table=True)
    return dict(tile_w=64, tile_x=64, tile_k=256, split=1, stages=2,
                variant="plain", swizzle=True, load_table=True)
  if m <= 128:
    if nested and not out_f32 and (k is None or k % 256 == 0):
      return dict(tile_w=64, tile_x=128, tile_k=256, split=1, stages=2,
                  variant="ws", load_table=True)
    return dict(tile_w=64, tile_x=128, tile_k=128, split=1, stages=3,
                variant="ws", load_table=True)
  if nested and not out_f32:
    wide = k is None or k % 128 == 0
    return dict(tile_w=64, tile_x=256, tile_k=128 if wide else 64, split=1,
                stages=2 if wide else 4, variant="ws", prefetch=True)
  return dict(tile_w=64, tile_x=256, tile_k=64, split=1,
              stages=2 if out_f32 else 4, variant="ws")


# A last wave of programs that fills less than this share of the SMs
# runs as a tail launch with K split (`gemm`'s `tail_rows`,
# `tail_rows_for`); 0 turns it off. Forty-ninth session (H100, NF4 + DQ,
# docs/benchmarks.md "A thin last wave as a tail launch"), sweep run w,
# us, one launch against the tail: 18944x3584 at M = 256 (148 programs,
# a second wave of 16) 94.8 against 68.1, at M = 128 60.9 against 53.0,
# at M = 64 46.6 against 42.9; 20480x7168 at 256 178.4 against 134.7;
# 36864x4608 at 256 179.4 against 154.5. `jaxbnb bench matmul` with the
# tail off and at 0.5: 18944x3584 at M = 128 / 256 60.4 / 91.4 against
# 51.1 / 70.1; 20480x7168 at 64 / 128 / 256 86.5 / 117.0 / 178.9 against
# 77.1 / 88.7 / 138.8; 28672x8192 (a last wave of 92 programs: 70%, no
# tail) within 3%. A program's wave must be long enough to pay for the
# second launch: programs of fewer than TAIL_MIN_PROGRAM_SIZE weight
# elements (rows times K) keep one launch. Same session, the package at M
# = 64 (64-row programs), tail off against on: 11008x4096 31.1 against
# 35.4 us and 28672x4096 60.9 against 64.9 (64 x 4096 elements a
# program), but 10240x8192 60.3 against 55.0, 20480x7168 86.5 against
# 77.1 and 28672x8192 121.2 against 116.7 (64 x 7168 and more).
TAIL_BELOW_FILL = 0.5
TAIL_MIN_PROGRAM_SIZE = 128 * 3584


def tail_rows_for(m: int, n: int, k: int, cfg: dict,
                  below: float | None = None,
                  min_size: int | None = None) -> int:
  """The weight rows `gemm` runs as a tail launch for `cfg` (a
  `default_config`) at M = m: where x is one tile, K is not split, and
  the programs take more than one wave of the GPU's SMs
  (`_backend.num_sms`) with a last wave below `below` (default
  TAIL_BELOW_FILL) of them, and each program's weight tile holds
  `min_size` (default TAIL_MIN_PROGRAM_SIZE) elements or more, that
  wave's rows, if `_split_config` splits K for so few rows; else 0.

  Example:
    >>> from pallas_kernels import gemm_4bit_wgmma as gw
    >>> cfg = gw.default_config(256, k=3584, nested=True, n=18944)
    >>> gw.tail_rows_for(256, 18944, 3584, cfg)  # 148 programs of 128 rows
    2048
    >>> cfg = gw.default_config(64, k=3584, nested=True, n=18944)
    >>> gw.tail_rows_for(64, 18944, 3584, cfg)  # 64 x 3584: too short
    0
  """
  below = TAIL_BELOW_FILL if below is None else below
  min_size = TAIL_MIN_PROGRAM_SIZE if min_size is None else min_size
  rows = cfg["tile_w"] * (2 if cfg["variant"] == "ws" else 1)
  programs, sms = n // rows, _backend.num_sms()
  last = programs % sms
  if (m > cfg["tile_x"] or cfg["split"] != 1 or programs <= sms
      or rows * k < min_size
      or not 0 < last < below * sms):
    return 0
  try:
    tail = _tail_config(m, n, k, last * rows, cfg["tile_w"], cfg["variant"],
                        1, 1, False)
  except ValueError:
    return 0
  return last * rows if tail["split"] > 1 else 0


def can_use(m: int, n: int, k: int, blocksize: int, dtype,
            out_f32: bool = False) -> bool:
  """Whether `gemm` with `default_config(m, out_f32, k, n=n)` takes these
  operands."""
  if m < 1 or blocksize != 64:
    return False
  cfg = default_config(m, out_f32, k, n=n)
  try:
    check_config(m, n, k, dtype, cfg["tile_w"], cfg["tile_x"],
                 cfg["tile_k"], cfg["split"], cfg["stages"], cfg["variant"],
                 out_f32)
  except ValueError:
    return False
  return True


def check_config(m: int, n: int, k: int, dtype, tile_w: int, tile_x: int,
                 tile_k: int, split: int, stages: int,
                 variant: str = "plain", out_f32: bool = False,
                 cluster: int = 1) -> None:
  """Raises ValueError naming the argument the kernel cannot take."""
  if jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"x: the wgmma kernel takes bfloat16, got "
                     f"{jnp.dtype(dtype).name}")
  if tile_w not in (64, 128):
    raise ValueError(f"tile_w: expected 64 or 128, got {tile_w}")
  if tile_x not in (16, 32, 64, 128, 192, 256):
    raise ValueError(f"tile_x: expected 16, 32, 64, 128, 192 or 256, got "
                     f"{tile_x}")
  if tile_k not in (64, 128, 256):
    raise ValueError(f"tile_k: expected 64, 128 or 256, got {tile_k}")
  if variant not in ("plain", "ws", "ks"):
    raise ValueError(f"variant: expected 'plain', 'ws' or 'ks', got "
                     f"{variant!r}")
  if cluster not in (1, 2, 4) or (cluster > 1 and variant == "plain"):
    raise ValueError(f"cluster: expected 1, or 2 or 4 with variant 'ws' or "
                     f"'ks', got {cluster} (variant {variant!r})")
  rows = tile_w * (2 if variant == "ws" else 1) * cluster
  if n % rows:
    raise ValueError(f"n: expected a multiple of {rows} (tile_w {tile_w}, "
                     f"variant {variant!r}, cluster {cluster}), got {n}")
  halves = 2 if variant == "ks" else 1
  if split < 1 or k % (tile_k * split * halves):
    raise ValueError(f"k: expected a multiple of tile_k x split"
                     f"{' x 2 (variant ks)' if halves == 2 else ''} "
                     f"({tile_k} x {split}), got {k}")
  if stages < 1:
    raise ValueError(f"stages: expected >= 1, got {stages}")
  need = smem_bytes(tile_w, tile_x, tile_k, stages, variant,
                    out_f32 or split > 1)
  if need > SMEM_LIMIT:
    raise ValueError(
        f"stages: {stages} steps of tiles ({tile_w}, {tile_x}, {tile_k}), "
        f"variant {variant!r}, need {need} bytes of shared memory, more than "
        f"the {SMEM_LIMIT} a block has; expected fewer stages or smaller "
        "tiles")
  del m


def scale_words_t(absmax: jax.Array, n: int, k: int) -> jax.Array:
  """uint32 `[k / 64, n]`: each block's absmax in bf16, in both halves,
  transposed so a step's scales are one TMA tile."""
  return lut_decode.scale_words(absmax.reshape(n, k // 64),
                                jnp.bfloat16).T


def _address(ref, bits):
  return llvm.ptrtoint(ir.IntegerType.get_signless(bits),
                       mgpu.utils.memref_ptr(ref))


def _fragments(regs, shape):
  """i32 registers (bf16 pairs) in `WGMMA_LAYOUT`'s order as a
  FragmentedArray of `shape`."""
  vec = ir.VectorType.get((2,), ir.BF16Type.get())
  layout_shape = fa.WGMMA_LAYOUT.registers_shape(shape)
  arr = np.empty(layout_shape, dtype=object)
  for idx, reg in zip(np.ndindex(layout_shape), regs):
    arr[idx] = llvm.bitcast(vec, reg)
  return mgpu.FragmentedArray(_registers=arr, _layout=fa.WGMMA_LAYOUT,
                              _is_signed=None)


@lowering.lowered_once
def _compiled(x, packed, scales, *, code, n, k, tile_w, tile_x, tile_k,
              split, stages, variant="plain", out_f32=False, out_t=None,
              cluster=1, swizzle=False, load_table=False, overlap=False,
              nested_blocksize=None, prefetch=False, n_rows=None,
              row_offset=0, out_n=None):
  """The Mosaic GPU kernel: `[split, m, n]` (`out_t`, y itself) or `[split,
  n, m]` (y.T) partials, m a multiple of tile_x; bf16 when split is 1 (and
  not `out_f32`), else float32 (`out_t` needs bf16: Mosaic GPU stores only
  16-bit values through a transposed shared-memory view; by default
  `out_t` is whether the output is bf16).

  `scales` is the scale words `[k / 64, n]` (`scale_words_t`), loaded a
  step at a time by TMA; or, with `nested_blocksize`, the double-quantized
  statistics `(codes [n, k / 64] uint8, nested_absmax, nested_code [256],
  offset [1])`, read and decoded by the decode itself
  (`wgmma_decode.decode_ptx`'s `nested`), so no XLA pass runs before the
  kernel. With `prefetch` ("plain" and "ws"), each step makes the next
  step's scale words (`wgmma_decode.scales_ptx`) before its own decode,
  and the pipeline carries them in registers: their loads' latency hides
  behind a whole step.

  variant:
    "plain": one warpgroup: decode, wgmma, wait.
    "ws": a warp-specialized pipeline, one TMA warpgroup and two compute
      warpgroups of tile_w rows each, sharing x's tile; one decodes while
      the other's products run.
    "ks": the same pipeline, the two compute warpgroups on the same tile_w
      rows and alternate tile_k steps (K split inside the program, the
      second's sums added through shared memory at the end, in the output
      tile itself when that is float32): twice the
      programs of "ws" for weights of few rows.
  `n_rows` weight rows from `row_offset` on (default all `n` from 0)
  are multiplied, into an output of `out_n` rows (default `n_rows`) at
  their local index: `gemm`'s tail launch reads the weight's last rows,
  and its first launch leaves them unwritten in `y`.
  `swizzle` and `load_table`: see `wgmma_decode.decode_ptx` (the weight
  tile then arrives swizzled; the table words are one more input).
  Each waits for its wgmma before the next step's decode: with the wait
  deferred a step (the decode of step t + 1 during step t's products) the
  H200 returned wrong products whenever the wgmma ran long enough
  (docs/benchmarks.md), A's registers being rewritten in flight. With
  `overlap` the step is split into 64-column parts whose decodes overlap
  the previous part's wgmma, each A operand fenced after its wait.
  """
  m = x.shape[0]
  n_rows = n if n_rows is None else n_rows
  out_n = n_rows if out_n is None else out_n
  steps = k // tile_k // split
  kb = tile_k // 64
  nested = (k // 64, nested_blocksize) if nested_blocksize else None
  n_s = 4 if nested else 1  # scale inputs
  if prefetch and (not nested or variant == "ks"):
    raise ValueError(f"prefetch: needs the double-quantized statistics and "
                     f"variant 'plain' or 'ws', got nested {bool(nested)}, "
                     f"variant {variant!r}")
  per, wide = wgmma_decode.scale_slots(tile_w, tile_k)
  s_shape = (tile_w, 2 * per)  # wgmma's f32 layout: groups * per a lane
  wgs = 2 if variant == "ws" else 1
  steps //= 2 if variant == "ks" else 1
  out_dtype = jnp.bfloat16 if split == 1 and not out_f32 else jnp.float32
  if out_t is None:
    out_t = out_dtype == jnp.bfloat16
  elif out_t and out_dtype != jnp.bfloat16:
    raise ValueError("out_t: expected False with a float32 output (a bias "
                     f"or split {split}), got True")

  row_bytes = tile_k // 2
  w_tr = ((plgpu.TilingTransform((8, row_bytes)),
           plgpu.SwizzleTransform(row_bytes)) if swizzle else ())

  def decoder(part):
    """The decode of the step's tile (`part` None) or of its 64 columns
    `64 part ..`, as a Pallas function of the weight, scale (and table)
    refs."""
    cols = tile_k if part is None else 64
    nreg = tile_w // 64 * cols // 8 * 2
    ptx = wgmma_decode.decode_ptx(code, tile_w, tile_k, wgs * tile_w,
                                  swizzle, load_table, part,
                                  None if prefetch else nested,
                                  scales=prefetch)
    n_refs = (0 if prefetch else 5 if nested else 1) + (1 if load_table
                                                         else 0)
    s_types = (plgpu.Layout.WGMMA,) if prefetch else ()

    @plgpu.inline_mgpu(
        arg_types=((_backend.ref_type(w_tr, write=False),) + s_types
                   + (_backend.ref_type(write=False),) * n_refs),
        return_type=plgpu.ShapeDtypeStruct((tile_w, cols), jnp.bfloat16,
                                           layout=plgpu.Layout.WGMMA))
    def decode(ctx, w_ref, *refs):
      del ctx
      i32 = ir.IntegerType.get_signless(32)
      i64 = ir.IntegerType.get_signless(64)
      # Shared refs as 32-bit addresses, global ones (nested statistics,
      # table words) as 64-bit; scale words made a step ahead as 64-bit
      # pairs.
      operands = [_address(w_ref, 32)]
      if prefetch:
        operands += [llvm.bitcast(i64, r) for r in refs[0].registers.flat]
        refs = refs[1:]
      n_shared = 1 if not nested else 0
      operands += [_address(r, 32) for r in refs[:n_shared]]
      operands += [_address(r, 64) for r in refs[n_shared:]]
      res = llvm.inline_asm(
          llvm.StructType.get_literal([i32] * nreg), operands, ptx,
          ",".join(["=r"] * nreg + ["r"] * (1 + n_shared)
                   + ["l"] * (len(operands) - 1 - n_shared)),
          has_side_effects=True)
      regs = [llvm.extractvalue(i32, res, [i]) for i in range(nreg)]
      return _fragments(regs, (tile_w, cols))

    return decode

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA,),
      return_type=plgpu.ShapeDtypeStruct((tile_w, 64), jnp.bfloat16,
                                         layout=plgpu.Layout.WGMMA))
  def fence(ctx, a):
    """Keeps `a`'s registers alive (and unwritten) up to here, as CUTLASS'
    `warpgroup_fence_operand`: an empty asm that reads and writes them."""
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    regs = [llvm.bitcast(i32, r) for r in a.registers.flat]
    res = llvm.inline_asm(
        llvm.StructType.get_literal([i32] * len(regs)), regs, "",
        ",".join(["=r"] * len(regs) + [str(i) for i in range(len(regs))]),
        has_side_effects=True)
    return _fragments([llvm.extractvalue(i32, res, [i])
                       for i in range(len(regs))], (tile_w, 64))

  x_swizzle = 128
  x_tr = (plgpu.TilingTransform((8, x_swizzle // 2)),
          plgpu.SwizzleTransform(x_swizzle))
  o_bits = jnp.dtype(out_dtype).itemsize * 8
  o_swizzle = plgpu.find_swizzle((tile_w if out_t else tile_x) * o_bits)
  o_tr = (plgpu.TilingTransform((8, o_swizzle * 8 // o_bits)),
          plgpu.SwizzleTransform(o_swizzle))

  r_swizzle = plgpu.find_swizzle(tile_x * 32)
  r_tr = (plgpu.TilingTransform((8, r_swizzle // 4)),
          plgpu.SwizzleTransform(r_swizzle))

  cta_w = tile_w if variant == "ks" else wgs * tile_w
  if (row_offset % (cta_w * cluster) or n_rows % (cta_w * cluster)
      or row_offset + n_rows > n or n_rows > out_n):
    raise ValueError(
        f"row_offset, n_rows: expected multiples of {cta_w * cluster} rows "
        f"within the weight's {n} and n_rows at most out_n {out_n}, got "
        f"{row_offset} and {n_rows}")
  off = row_offset // cta_w  # the first weight row's program, read side

  # With a cluster of CTAs along the weight rows, x's tile (the same for
  # all of them) is loaded once and multicast.
  x_collective = ("c",) if cluster > 1 else ()

  def w_index():
    if cluster > 1:
      return lax.axis_index("w") * cluster + lax.axis_index("c")
    return lax.axis_index("w")

  def specs(iw, ix, isp):
    s_spec = [] if nested else [
        plgpu.BlockSpec((tile_k // 64, cta_w),
                        lambda t: (isp * steps + t, iw + off))]
    return [
        plgpu.BlockSpec((cta_w, tile_k // 2),
                        lambda t: (iw + off, isp * steps + t),
                        transforms=w_tr),
        *s_spec,
        plgpu.BlockSpec((tile_x, tile_k), lambda t: (ix, isp * steps + t),
                        transforms=x_tr, collective_axes=x_collective),
    ]

  @plgpu.inline_mgpu(
      arg_types=(_backend.ref_type(write=False),) * 5,
      return_type=plgpu.ShapeDtypeStruct(s_shape, jnp.float32,
                                         layout=plgpu.Layout.WGMMA))
  def make_scales(ctx, *refs):
    """A step's scale words (`wgmma_decode.scales_ptx`) as a `[tile_w, 2
    per]` float32 array in wgmma's layout (two words a 64-bit register)."""
    del ctx
    i64 = ir.IntegerType.get_signless(64)
    res = llvm.inline_asm(
        llvm.StructType.get_literal([i64] * wide),
        [_address(r, 64) for r in refs],
        wgmma_decode.scales_ptx(tile_w, tile_k, nested),
        ",".join(["=l"] * wide + ["l"] * 5), has_side_effects=True)
    vec = ir.VectorType.get((2,), ir.F32Type.get())
    layout_shape = fa.WGMMA_LAYOUT.registers_shape(s_shape)
    arr = np.empty(layout_shape, dtype=object)
    for j, idx in enumerate(np.ndindex(layout_shape)):
      arr[idx] = llvm.bitcast(vec, llvm.extractvalue(i64, res, [j]))
    return mgpu.FragmentedArray(_registers=arr, _layout=fa.WGMMA_LAYOUT,
                                _is_signed=None)

  def step_scales(s_in, s_smem, row0, step):
    """The decode's scale operands for global step `step` of the tile_w
    rows from `row0`: the step's scale words in shared memory, or the
    nested statistics in global memory (the codes from that row and
    step)."""
    if not nested:
      return (s_smem,)
    c_gmem = s_in[0]
    return (c_gmem.at[pl.ds(row0, tile_w), pl.ds(step * kb, kb)],
            *s_in)

  decode = decoder(None)
  decode_part = [decoder(q) for q in range(tile_k // 64)] if overlap else []

  def multiply(acc_ref, w_smem, s_args, x_smem, t_gmem):
    """One step: decode the weight tile into registers, wgmma, wait. With
    `overlap`, 64 columns at a time, each decoded while the previous
    columns' wgmma runs; a fence keeps each A operand's registers until
    its wgmma is known done. `s_args`: from `step_scales`."""
    t = [t_gmem] if load_table else []
    if not overlap:
      plgpu.wgmma(acc_ref, decode(w_smem, *s_args, *t),
                  x_smem.transpose((1, 0)))
      plgpu.wgmma_wait(0)
      return
    prev = None
    for q, dec in enumerate(decode_part):
      a = dec(w_smem, *s_args, *t)
      plgpu.wgmma(acc_ref, a,
                  x_smem.at[:, pl.ds(64 * q, 64)].transpose((1, 0)))
      if prev is not None:
        plgpu.wgmma_wait(1)
        fence(prev)
      prev = a
    plgpu.wgmma_wait(0)
    fence(prev)

  def specialized(step, in_specs, context):
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=(steps,), memory_registers=40, in_specs=in_specs,
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages,
        compute_context=context)

  def store(acc, o_smem, o_gmem, iw, ix, isp, wg):
    rows = pl.ds(iw * cta_w + wg * tile_w, tile_w)
    cols = pl.ds(ix * tile_x, tile_x)
    if out_t:
      o_smem.transpose((1, 0))[...] = acc.astype(out_dtype)
    else:
      o_smem[...] = acc.astype(out_dtype)
    plgpu.commit_smem()
    dst = o_gmem.at[isp, cols, rows] if out_t else o_gmem.at[isp, rows, cols]
    plgpu.copy_smem_to_gmem(o_smem, dst)
    plgpu.wait_smem_to_gmem(0)

  def ahead(s_in, row0, isp, t, by):
    """The scale words of local step `t + by` (at most the last) of the
    tile_w rows from `row0`, made now (`make_scales`)."""
    step = isp * steps + jnp.minimum(t + by, steps - 1)
    return make_scales(*step_scales(s_in, None, row0, step))

  def streamed(w_gmem, s_in, x_gmem):
    """The inputs the pipeline streams: the weight, the scale words (unless
    nested) and x."""
    return (w_gmem, x_gmem) if nested else (w_gmem, *s_in, x_gmem)

  def unpack(refs):
    """(weight, scale words or None, x) of a step's shared refs."""
    return (refs[0], None, refs[1]) if nested else refs

  def jaxbnb_gemm_4bit_wgmma(w_gmem, x_gmem, t_gmem, *refs):
    s_in, (o_gmem, o_smem) = refs[:n_s], refs[n_s:]
    iw = lax.axis_index("w")
    ix = lax.axis_index("x")
    isp = lax.axis_index("s")
    row0 = iw * cta_w + row_offset

    @functools.partial(pl.run_scoped,
                       acc_ref=plgpu.ACC((tile_w, tile_x), jnp.float32))
    def _(acc_ref):
      def step(idx, *smem):
        w_smem, s_smem, x_smem = unpack(smem)
        multiply(acc_ref, w_smem,
                 step_scales(s_in, s_smem, row0, isp * steps + idx[0]),
                 x_smem, t_gmem)

      def step_ahead(idx, *smem_carry):
        *smem, scales = smem_carry
        w_smem, _, x_smem = unpack(smem)
        nxt = ahead(s_in, row0, isp, idx[0], 1)
        multiply(acc_ref, w_smem, (scales,), x_smem, t_gmem)
        return nxt

      carry = ({"init_carry": ahead(s_in, row0, isp, 0, 0)}
               if prefetch else {})
      plgpu.emit_pipeline(step_ahead if prefetch else step, grid=(steps,),
                          in_specs=specs(iw, ix, isp),
                          max_concurrent_steps=stages, **carry)(
                              *streamed(w_gmem, s_in, x_gmem))
      store(acc_ref[...], o_smem, o_gmem, iw, ix, isp, 0)

  def jaxbnb_gemm_4bit_wgmma_ws(w_gmem, x_gmem, t_gmem, *refs):
    s_in, (o_gmem, o_smem) = refs[:n_s], refs[n_s:]
    iw = w_index()
    ix = lax.axis_index("x")
    isp = lax.axis_index("s")
    wg = lax.axis_index("wg")
    rows = pl.ds(wg * tile_w, tile_w)

    row0 = iw * cta_w + wg * tile_w + row_offset

    def context(eval_pipeline):
      @functools.partial(pl.run_scoped,
                         acc_ref=plgpu.ACC((tile_w, tile_x), jnp.float32))
      def _(acc_ref):
        if prefetch:
          eval_pipeline((acc_ref, ahead(s_in, row0, isp, 0, 0)))
        else:
          eval_pipeline(acc_ref)
        store(acc_ref[...], o_smem.at[wg], o_gmem, iw, ix, isp, wg)

    def step(idx, *smem_acc):
      *smem, carry = smem_acc
      w_smem, s_smem, x_smem = unpack(smem)
      if prefetch:
        acc_ref, scales = carry
        nxt = ahead(s_in, row0, isp, idx[0], 1)
        multiply(acc_ref, w_smem.at[rows], (scales,), x_smem, t_gmem)
        return acc_ref, nxt
      s_args = step_scales(s_in, None if nested else s_smem.at[:, rows],
                           row0, isp * steps + idx[0])
      multiply(carry, w_smem.at[rows], s_args, x_smem, t_gmem)
      return carry

    specialized(step, specs(iw, ix, isp), context)(
        *streamed(w_gmem, s_in, x_gmem))

  def ks_specs(iw, ix, isp):
    def at(h):
      return lambda t: 2 * (isp * steps + t) + h
    return [spec for h in (0, 1) for spec in (
        plgpu.BlockSpec((tile_w, tile_k // 2),
                        lambda t, f=at(h): (iw + off, f(t)), transforms=w_tr),
        *([] if nested else [plgpu.BlockSpec((tile_k // 64, tile_w),
                                             lambda t, f=at(h): (f(t),
                                                                 iw + off))]),
        plgpu.BlockSpec((tile_x, tile_k), lambda t, f=at(h): (ix, f(t)),
                        transforms=x_tr, collective_axes=x_collective))]

  def jaxbnb_gemm_4bit_wgmma_ks(w_gmem, x_gmem, t_gmem, *refs):
    s_in = refs[:n_s]
    if out_dtype == jnp.float32:  # the sums meet in the output tile
      o_gmem, o_smem, red_bar = refs[n_s:]
      red_smem = o_smem
    else:
      o_gmem, o_smem, red_smem, red_bar = refs[n_s:]
    iw = w_index()
    ix = lax.axis_index("x")
    isp = lax.axis_index("s")
    wg = lax.axis_index("wg")

    def context(eval_pipeline):
      @functools.partial(pl.run_scoped,
                         acc_ref=plgpu.ACC((tile_w, tile_x), jnp.float32))
      def _(acc_ref):
        eval_pipeline(acc_ref)

        @pl.when(wg == 1)
        def _():
          red_smem[...] = acc_ref[...]
          plgpu.barrier_arrive(red_bar)

        @pl.when(wg == 0)
        def _():
          plgpu.barrier_wait(red_bar)
          total = acc_ref[...] + plgpu.load(red_smem,
                                            layout=plgpu.Layout.WGMMA)
          store(total, o_smem, o_gmem, iw, ix, isp, 0)

    def step(idx, *smem_acc):
      *smem, acc_ref = smem_acc
      half = len(smem) // 2
      for h in (0, 1):
        w_smem, s_smem, x_smem = unpack(smem[h * half:(h + 1) * half])
        s_args = step_scales(s_in, s_smem, iw * tile_w + row_offset,
                             2 * (isp * steps + idx[0]) + h)
        pl.when(wg == h)(functools.partial(multiply, acc_ref, w_smem,
                                           s_args, x_smem, t_gmem))
      return acc_ref

    streams = streamed(w_gmem, s_in, x_gmem)
    specialized(step, ks_specs(iw, ix, isp), context)(*streams, *streams)

  cluster_kw = (dict(cluster=(cluster,), cluster_names=("c",))
                if cluster > 1 else {})
  out_shape = (split, m, out_n) if out_t else (split, out_n, m)
  o_tile = (tile_x, tile_w) if out_t else (tile_w, tile_x)
  s_inputs = tuple(scales) if nested else (scales,)
  out_type = _backend.out_struct(out_shape, out_dtype, x, packed, *s_inputs)
  if variant == "ks":
    kernel = plgpu.kernel(
        jaxbnb_gemm_4bit_wgmma_ks, out_type=out_type,
        grid=(n_rows // cta_w // cluster, m // tile_x, split),
        grid_names=("w", "x", "s"), **cluster_kw,
        num_threads=3, thread_name="wg",
        scratch_types=[
            plgpu.SMEM(o_tile, out_dtype, transforms=o_tr),
            *([] if out_dtype == jnp.float32 else
              [plgpu.SMEM((tile_w, tile_x), jnp.float32, transforms=r_tr)]),
            plgpu.Barrier(num_arrivals=1)])
  elif variant == "ws":
    kernel = plgpu.kernel(
        jaxbnb_gemm_4bit_wgmma_ws, out_type=out_type,
        grid=(n_rows // cta_w // cluster, m // tile_x, split),
        grid_names=("w", "x", "s"), **cluster_kw,
        num_threads=3, thread_name="wg",
        scratch_types=[plgpu.SMEM((2, *o_tile), out_dtype, transforms=o_tr)])
  else:
    kernel = plgpu.kernel(
        jaxbnb_gemm_4bit_wgmma, out_type=out_type,
        grid=(n_rows // cta_w, m // tile_x, split),
        grid_names=("w", "x", "s"),
        scratch_types=[plgpu.SMEM(o_tile, out_dtype, transforms=o_tr)])
  args = _backend.same_vma(packed.reshape(n, k // 2), x,
                           jnp.asarray(wgmma_decode.table_operands(code)),
                           *s_inputs)
  return kernel(*args)


def _tail_config(m: int, n: int, k: int, tail_rows: int, tile_w: int,
                 variant: str, split: int, cluster: int,
                 bias: bool) -> dict | None:
  """The config of `gemm`'s launch for the last `tail_rows` rows
  (`_split_config` for a weight of that many rows), or None for none;
  raises ValueError naming what the tail cannot take."""
  if not tail_rows:
    return None
  rows = tile_w * (2 if variant == "ws" else 1) * cluster
  if split != 1 or bias or not 0 < tail_rows < n or tail_rows % rows:
    raise ValueError(
        f"tail_rows: expected a multiple of {rows} rows below n = {n}, with "
        f"split 1 and no bias, got {tail_rows} (split {split}, bias {bias})")
  tail = _split_config(m, tail_rows, k)
  try:
    check_config(m, tail_rows, k, jnp.bfloat16, tail["tile_w"],
                 tail["tile_x"], tail["tile_k"], tail["split"],
                 tail["stages"], tail["variant"])
  except ValueError as e:
    raise ValueError(f"tail_rows: {tail_rows} rows take no K split at M = "
                     f"{m}, K = {k}: {e}") from e
  return tail


def _twin(x, packed, scales, *, code, n, k, split):
  """The kernel's values in jnp: weights decoded and scaled in bf16 (one
  rounding), products summed in fp32; `[split, n, m]` float32."""
  m = x.shape[0]
  nkb = k // 64
  sc = jnp.broadcast_to(scales.T.reshape(n, nkb, 1), (n, nkb, 32))
  w = packed.reshape(n, nkb, 32)
  hi, lo = lut_decode.decode_scaled(w, sc, code, jnp.bfloat16, True)
  wv = jnp.stack([hi, lo], -1).reshape(n, split, k // split)
  xv = x.reshape(m, split, k // split)
  return jnp.einsum("nsk,msk->snm", wv.astype(jnp.float32),
                    xv.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def gemm(x: jax.Array, packed: jax.Array, absmax: jax.Array, *,
         code: tuple[float, ...], n: int, k: int, tile_w: int = 64,
         tile_x: int | None = None, tile_k: int = 64, split: int = 1,
         stages: int = 3, variant: str = "plain", cluster: int = 1,
         swizzle: bool = False, load_table: bool = False,
         overlap: bool = False, nested_blocksize: int = 256,
         prefetch: bool = False,
         bias: jax.Array | None = None,
         tail_rows: int = 0,
         interpret: bool = False) -> jax.Array:
  """`x @ W.T + bias` for a 4-bit `W [n, k]` (blocksize 64), bf16.

  Args:
    x: `[m, k]` bfloat16.
    packed: uint8 `[n * k / 2]`, bitsandbytes' order.
    absmax: float32 `[n * k / 64]` (double quantization already decoded),
      or the double-quantized statistics `(codes, nested_absmax,
      nested_code, offset)` (uint8 `[n * k / 64]`, float32 `[ceil(n * k /
      64 / nested_blocksize)]`, float32 `[256]`, float32 scalar), which
      the kernel decodes as bitsandbytes does (each block's
      `nested_code[code] * nested_absmax[block // nested_blocksize]`, then
      `+ offset`, rounded apart), with no XLA pass before it.
    code: the 16 code values (static).
    n, k: the weight's shape.
    tile_w: weight rows a program (64 or 128).
    tile_x: x rows a program (16, 32, 64, 128, 192 or 256; x is padded to a
      multiple); by default m rounded up to 64, at most 256.
    tile_k: k a pipeline step (64, 128 or 256).
    split: K splits (programs per output tile, summed by XLA).
    stages: steps in flight.
    variant: "plain", "ws" or "ks" (see `_compiled`).
    cluster: programs along the weight rows that share one load of x's
      tile (TMA multicast; 1, or 2 or 4 with "ws" or "ks").
    swizzle: the weight tile swizzled by TMA (no shared-memory bank
      conflicts in the decode's loads; see `wgmma_decode.decode_ptx`).
    load_table: the decode's table words loaded from memory (see
      `wgmma_decode.decode_ptx`).
    overlap: each step in parts of 64 columns, each part's decode
      overlapping the previous part's wgmma (see `_compiled`).
    nested_blocksize: absmax codes a nested value covers (with the
      double-quantized `absmax`). Decoded in the kernel when a power of
      two and a multiple of `tile_k / 64`; else by XLA first.
    prefetch: with the statistics decoded in the kernel, each step makes
      the next step's scale words before its own decode, carried in
      registers ("plain" and "ws"; see `_compiled`). No effect where XLA
      decodes the absmax (float32 `absmax`, or a nested blocksize the
      kernel cannot index).
    bias: optional `[n]`, added to the float32 sums before the one
      rounding to bf16.
    tail_rows: the weight's last `tail_rows` rows in a launch of their
      own, with K split as `_split_config` splits a weight of that many
      rows, so that a last wave of few programs becomes one of many short
      ones (`tail_rows_for`); the first launch stores the other rows'
      `y` in place and the tail's sums are written into it. With split 1
      and no bias; 0: one launch.
    interpret: the jnp twin (CPU).

  Returns:
    bfloat16 `[m, n]`.

  Example (the jnp twin, on any device; every weight is code 7 = 7.0):

    >>> import jax.numpy as jnp
    >>> from pallas_kernels import gemm_4bit_wgmma
    >>> n, k = 64, 256
    >>> y = gemm_4bit_wgmma.gemm(
    ...     jnp.ones((8, k), jnp.bfloat16),
    ...     jnp.full((n * k // 2,), 0x77, jnp.uint8),
    ...     jnp.ones((n * k // 64,), jnp.float32),
    ...     code=tuple(range(16)), n=n, k=k, interpret=True)
    >>> y.shape, float(y[0, 0])
    ((8, 64), 1792.0)
  """
  m = x.shape[0]
  if tile_x is None:
    tile_x = min(256, -(-m // 64) * 64)
  check_config(m, n, k, x.dtype, tile_w, tile_x, tile_k, split, stages,
               variant, bias is not None, cluster)
  tail = _tail_config(m, n, k, tail_rows, tile_w, variant, split, cluster,
                      bias is not None)
  if prefetch and variant == "ks":
    raise ValueError("prefetch: expected variant 'plain' or 'ws', got 'ks'")
  code = tuple(float(c) for c in code)
  nested = None
  if isinstance(absmax, (tuple, list)):
    codes, nested_absmax, nested_code, offset = absmax
    if codes.size != n * k // 64 or nested_code.size != 256:
      raise ValueError(
          f"absmax: expected {n * k // 64} codes and 256 nested_code values, "
          f"got shapes {codes.shape} and {nested_code.shape}")
    codes, nested_absmax = codes.reshape(-1), nested_absmax.reshape(-1)
    nested_code = nested_code.reshape(-1)
    nbs = nested_blocksize
    if interpret or nbs & (nbs - 1) or nbs % (tile_k // 64):
      absmax = decode_absmax(
          codes, jnp.arange(codes.shape[0], dtype=jnp.int32),
          nested_absmax.astype(jnp.float32), nested_code.astype(jnp.float32),
          jnp.asarray(offset, jnp.float32), nbs, nested_absmax.shape[0], True)
    else:
      nested = (codes.reshape(n, k // 64), nested_absmax.astype(jnp.float32),
                nested_code.astype(jnp.float32),
                jnp.asarray(offset, jnp.float32).reshape(1))
  if nested is None:
    scales = scale_words_t(absmax.astype(jnp.float32), n, k)
  if interpret and tail:
    head_n = n - tail_rows
    head = _twin(x, packed[:head_n * k // 2], scales[:, :head_n], code=code,
                 n=head_n, k=k, split=1)[0]
    rest = sum_splits(_twin(x, packed[head_n * k // 2:], scales[:, head_n:],
                            code=code, n=tail_rows, k=k,
                            split=tail["split"]))
    return jnp.concatenate([head, rest]).T.astype(x.dtype)
  if interpret:
    part = _twin(x, packed, scales, code=code, n=n, k=k, split=split)
  else:
    if not available():
      raise RuntimeError("the wgmma kernel needs Mosaic GPU's inline_mgpu, "
                         f"emit_pipeline and wgmma; this JAX is "
                         f"{jax.__version__}")
    def pad(tx):
      mp = -(-m // tx) * tx
      return jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x

    nbs = nested_blocksize if nested else None
    part = _compiled(pad(tile_x), packed, nested or scales, code=code, n=n,
                     k=k, tile_w=tile_w, tile_x=tile_x, tile_k=tile_k,
                     split=split, stages=stages, variant=variant,
                     out_f32=bias is not None, cluster=cluster,
                     swizzle=swizzle, load_table=load_table,
                     overlap=overlap, nested_blocksize=nbs,
                     prefetch=prefetch and nested is not None,
                     n_rows=n - tail_rows, out_n=n)
    if tail:  # the last rows' sums into y's columns left unwritten
      rest = _compiled(pad(tail["tile_x"]), packed, nested or scales,
                       code=code, n=n, k=k, nested_blocksize=nbs,
                       **dict(tail, prefetch=tail.get("prefetch", False)
                              and nested is not None),
                       n_rows=tail_rows, row_offset=n - tail_rows)
      rest = rest[0, :m] if rest.dtype == jnp.bfloat16 else sum_splits(
          rest[:, :, :m].astype(jnp.float32)).T.astype(x.dtype)
      return lax.dynamic_update_slice(part[0, :m], rest, (0, n - tail_rows))
    if part.dtype == jnp.bfloat16:  # y itself, [1, mp, n]
      return part[0, :m]
    part = part[:, :, :m]
  out = part[0] if split == 1 else sum_splits(part.astype(jnp.float32))
  if bias is not None:
    out = out.astype(jnp.float32) + bias.astype(jnp.float32)[:, None]
  return out.T.astype(x.dtype)
