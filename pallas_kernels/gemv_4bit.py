"""Fused 4-bit dequantize-and-multiply for decoding: `y = x @ W.T`, M small.

`W` is a bitsandbytes 4-bit weight `[N, K]` (flattened row-major, blocks of
`blocksize` along K, even element in the high nibble), `x` is `[M, K]`.
Each program owns `block_n` rows of `W` and walks its share of K, loading
each packed byte once (streamed, evict-first). A byte is decoded with one
gather from a 256-entry table holding both of its values ("pair"), or two
gathers from the 16-entry table ("nibble"; always for float32 inputs); a
double-quantized absmax is decoded in place. Six variants:

* ``"reduce"`` (M = 1 with `code`, or 2 when K is not a multiple of 128;
  1..4 without): multiply by the
  even/odd halves of `x` in fp32, scale by the absmax per block and
  accumulate elementwise; one reduction at the end. With table "prmt"
  (the default for 16-bit x and `code`) the bytes are decoded in registers
  and scaled in the compute dtype as in "mma", then widened to fp32; each
  thread's run of bytes is folded in quarters into one FMA chain (a
  quarter of the accumulators), and the permutes' table words are loaded,
  not constants (the compiler kept re-creating the constants). With
  `prefetch`, step t + 1's bytes are loaded before step t's are decoded.
* ``"dot"`` (larger M without `code`, or fp32): per quantization block,
  the decoded `[block_n, blocksize/2]` halves go through the tensor cores
  against `x`'s halves
  (swap-AB: the weight rows are the MMA's M dimension), and the fp32 result
  is scaled by that block's absmax.
* ``"mma"`` (16-bit x, M = 9..64 by default, from 3 when K is not a
  multiple of 128): each step's bytes are decoded
  in registers with byte permutes (`lut_decode`, no memory gather), scaled
  by the absmax in the compute dtype (bitsandbytes' GEMV weight), and go
  through the tensor cores against `x`'s halves, one product per nibble
  half and step; `prefetch` keeps that many steps' bytes in flight.
* ``"warp"`` (16-bit x, M = 2..8 by default where "warp_tma" does not
  serve; K a multiple of 128): the
  same decode, and the values go to the tensor cores from the registers
  they were decoded in (`warp_mma`: one `mma.sync` per word pair, x as
  the other operand), with no shared-memory round trip; 64 bytes a row
  per step, two row tiles of `block_n / 2`. `prefetch` issues every
  step's loads before the first product (programs of up to 8 steps,
  which are unrolled; longer ones loop).

* ``"tma"`` (opt-in by config; `gemv_4bit_tma`, Mosaic GPU, Hopper): the
  weight tiles and x stream into shared memory by TMA, several steps in
  flight; the same decode and warp-wide products as "warp", the double
  quantization decoded in the kernel a step ahead. One launch per weight.
* ``"lut"`` (the default at M = 1 for NF4/FP4 + DQ weights of at least
  `LUT_MIN_N` rows, and groups of at least `LUT_GROUP_MIN_N` a weight,
  `LUT_MIN_N` in all, on Hopper, `lut_serves`; `gemv_4bit_lut`, Mosaic
  GPU): no decode at all: each program makes the table of x's products
  for every byte value of its 256 columns in shared memory and looks each
  weight byte up there. A group of such weights goes in one launch.
* ``"warp_tma"`` (the default at M = 2..16 where `warp_tma_serves`, on
  Hopper; `gemv_4bit_warp_tma`, Mosaic GPU): "warp"'s products on the
  table GEMV's TMA pipeline, each byte's pair of codes read from a table
  in shared memory (a copy a lane; the permutes by config).

With `split_k > 1` the programs of one row tile split K and write fp32
partial sums that the caller adds (deterministic, no atomics).

"reduce" reads `x` as it is and splits its even and odd columns (the
inputs of the high and low nibbles) in registers; "mma"/"dot" get them as
one padded array (one small XLA pass) and store their swap-AB tiles
transposed, so no pass follows the kernel.
`gemv_4bit_group` multiplies `x` by several weights in one launch (a
layer's q/k/v): their row tiles share the grid, each in its own branch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _backend
from pallas_kernels._backend import pl
from pallas_kernels._backend import pltriton
from pallas_kernels import lut_decode
from pallas_kernels import gemv_4bit_lut
from pallas_kernels import gemv_4bit_tma
from pallas_kernels import gemv_4bit_warp_tma
from pallas_kernels import warp_mma
from pallas_kernels.dequantize_4bit import decode_absmax
from pallas_kernels.split_sum import sum_splits

__all__ = ["can_use", "gemv_4bit", "gemv_4bit_group", "default_config",
           "pair_table", "scales_in_compute_dtype", "swiglu_serves",
           "norm_serves", "NORM_FUSED", "SWIGLU_FUSED"]

_HI = np.uint32(0xFFFF0000)


def can_use(m: int, n: int, k: int, blocksize: int, dtype) -> bool:
  """Whether the fused kernel serves `[m, k] @ [n, k].T` (else dequant+dot)."""
  return (_backend.available() and m >= 1 and n >= 1
          and k % blocksize == 0 and 32 <= blocksize <= 4096
          and blocksize & (blocksize - 1) == 0
          and jnp.dtype(dtype) in (jnp.float32, jnp.float16, jnp.bfloat16))


def scales_in_compute_dtype(config: tuple) -> bool:
  """Whether `config` multiplies code and absmax in the compute dtype (as
  bitsandbytes' GEMV does): the "mma" variant and the "prmt" table."""
  return config[0] in ("mma", "warp_tma") or (len(config) > 6
                                              and config[6] == "prmt")


def pair_table(lut: jax.Array) -> jax.Array:
  """uint32 [256]: byte b -> bf16 bits of (code[b >> 4] << 16 | code[b & 15]).

  The codes are rounded to bfloat16 (as bitsandbytes' own GEMV does when it
  casts its table to the compute dtype).
  """
  bits = jax.lax.bitcast_convert_type(
      lut.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
  b = jnp.arange(256, dtype=jnp.uint32)
  return (bits[b >> 4] << 16) | bits[b & 15]


def _pow2_floor(v: int) -> int:
  return 1 << (max(1, v).bit_length() - 1)


def _pow2_ceil(v: int) -> int:
  return 1 << (max(1, v) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def default_config(m: int, n: int, k: int, blocksize: int, dtype: str,
                   num_sms: int | None = None, mma: bool = False) -> tuple:
  """(variant, block_n, block_kb, split_k, num_warps, num_stages, table,
  prefetch).

  `table` is "pair" (one gather per byte from a 256-entry table of both
  values) or "nibble" (two gathers per byte from the 16-entry table);
  `prefetch` loads the next step's bytes before decoding the
  current ones.

  Chosen from two sweeps on the H200 (docs/benchmarks.md, 4-bit GEMV
  tuning; NF4 + DQ, bf16, on 14336x4096, 4096x14336, 4096x4096, 1024x4096):
  at M = 1 no tile shape, table or prefetch setting moved the 14336x4096
  time outside 36-40 us, so M = 1 keeps its earlier tiles; at M = 2..4,
  8-row tiles with 8 warps (78 against 92 us); at M > 4, 128-row "dot"
  tiles (97.7 against 103.6 us on 14336x4096, 25.1 against 37.4 on
  4096x4096 at M = 16); these defaults pass `pytest -m gpu` on the H200
  (2026-11-30, M = 1 to 64). `prefetch` and the "nibble" table stay
  opt-in: they did not beat the defaults, and their compiled output is
  checked by the GPU tests only from this version on.
  """
  if num_sms is None:
    num_sms = _backend.num_sms()
  half = blocksize // 2
  nkb = k // blocksize
  f32 = jnp.dtype(dtype) == jnp.float32
  if mma and 2 <= m <= 8 and not f32 and k % (2 * warp_mma.BYTES_PER_STEP) == 0:
    # Tensor-core products straight from registers ("warp", `warp_mma`):
    # docs/benchmarks.md, "GEMV: the warp's MMA from registers" (H200, the
    # sweep timer, NF4 + DQ): M = 2 on 14336x4096 27.8-28.7 us (the
    # "reduce" default 31.5), on 28672x4096 46.0 (57.2), on 6144x4096
    # 15.1 (19.7); M = 8 on 14336x4096 32.1 ("mma" 33.2), on 28672x4096
    # 54.3 (57.6). Four steps of 64 bytes a row per program, fewer when
    # that leaves under two waves; M = 1 stays with "reduce" (level).
    block_n = 64 if n >= 12288 else 128
    total = k // (2 * warp_mma.BYTES_PER_STEP)
    per = min(4, total)
    while per > 1 and -(-n // block_n) * -(-total // per) < 2 * num_sms:
      per //= 2
    return ("warp", block_n, 1, -(-total // per), block_n // 16, 1, "prmt",
            0)
  if mma and m > 2 and not f32:
    # The byte-permute decode with tensor-core products (`mma=True` when
    # the caller passes `code`): docs/benchmarks.md, "mma" sweeps on the
    # H200, 14336x4096: M = 4 42.7 us (was 75.9), M = 16 41.6 (was 95.2),
    # M = 64 48.5 (was 108.4); 4096x4096, M = 16: 16.5 (was 25.1).
    # Short programs, one or two steps each, many of them in flight:
    # docs/benchmarks.md, "GEMV: short programs" (H200, `jaxbnb bench
    # matmul`, 14336x4096: M = 8 28.6 us, was 37.3 with the looping tiles
    # below; M = 16 30.8, was 37.7). The fp32 partials grow with M and the
    # split, so M > 8 splits half as far, and keeps the looping tiles when
    # that leaves under two waves of programs (1024x4096, M = 16: 8.3 us
    # short, 7.1 looping).
    block_kb = max(1, min(_pow2_floor(max(1, 128 // half)), _pow2_floor(nkb)))
    steps = -(-nkb // block_kb)
    split_k = min(steps, 16 if m <= 8 else 8)
    if m <= 8 or (m <= 16 and -(-n // 64) * split_k >= 2 * num_sms):
      return ("mma", 64, block_kb, split_k, 4, 1, "prmt", 0)
    # M = 65..128: 64-row tiles with prefetch (docs/benchmarks.md, "the
    # fused kernel at M = 64-256": 14336x4096 at M = 128 67.3 us against
    # 78.6 for 128-row tiles, 4096x14336 65.8 against 78.6).
    narrow = m <= 16 or m > 64
    block_n = 64 if narrow else 128
    block_kb = max(1, min(_pow2_floor(max(1, 64 // half)), _pow2_floor(nkb)))
    tiles = -(-n // block_n)
    steps = -(-nkb // block_kb)
    split_k = 1
    while tiles * split_k < 2 * num_sms and split_k * 2 <= steps:
      split_k *= 2
    return ("mma", block_n, block_kb, split_k, 4, 3, "prmt",
            1 if narrow else 0)
  if mma and m <= 2 and not f32:  # M = 1 (and M = 2 when K % 128 != 0)
    # The byte-permute decode without tensor cores, one step per program:
    # thousands of short programs keep more bytes in flight than a loop.
    # docs/benchmarks.md, "4-bit GEMV at M = 1 and 2" (H200, `jaxbnb bench
    # matmul`): 14336x4096 M = 1 25.2 us (was 34.9 with the gathering
    # kernel), M = 2 33.1 (was 37-40 with "mma"). Under ncu it issues
    # from ~60% of its SM's slots and reads DRAM at under 30%: its
    # instruction count (~14.6 per byte), not memory, limits it. With the
    # FMA chains and loaded table words ("GEMV: short programs"): 23.1 us.
    block_kb = max(1, min(_pow2_floor(max(1, 256 // half)), _pow2_floor(nkb)))
    steps = -(-nkb // block_kb)
    # Blocks of 512 bytes or more (blocksize >= 1024) take fewer rows, so a
    # program's bytes stay near 8 KB (measured only for blocksize 64).
    block_n = max(8, min(32, _pow2_floor(max(1, 8192 // (block_kb * half)))))
    return ("reduce", block_n, block_kb, steps, 4, 1, "prmt", 0)
  if m == 1 or f32:
    variant, block_n, warps, stages = "reduce", 16, 4, 3
    block_kb = max(1, min(_pow2_floor(max(1, 256 // half)),
                          _pow2_floor(nkb)))
  elif m <= 4:
    variant, block_n, warps, stages = "reduce", 8, 8, 2
    block_kb = max(1, min(_pow2_floor(max(1, 128 // half)),
                          _pow2_floor(nkb)))
  else:
    variant, block_n, warps, stages = "dot", 128, 4, 3
    block_kb = max(1, min(4 if m <= 16 else 2, _pow2_floor(nkb)))
  tiles = -(-n // block_n)
  steps = -(-nkb // block_kb)
  split_k = 1
  while tiles * split_k < 2 * num_sms and split_k * 2 <= steps:
    split_k *= 2
  return (variant, block_n, block_kb, split_k, warps, stages, "pair", False)


# "reduce" with in-register decode: each thread's run of bytes along a
# block is folded in halves this many times, and the halves' products go
# into one FMA chain; the accumulator is then 2**_FOLDS times smaller than
# the tile (fewer registers, fewer additions at the end).
_FOLDS = 2


def _fold(v, times):
  """`[..., L]` -> `2**times` arrays `[..., L / 2**times]` (part p holds
  the elements `j * 2**times + p`): in-register splits of each thread's
  contiguous elements, no data movement."""
  parts = [v]
  for _ in range(times):
    parts = [q for p in parts
             for q in jax.lax.unstack(
                 p.reshape(*p.shape[:-1], p.shape[-1] // 2, 2), axis=-1)]
  return parts


def _decode(w, lut_ref, pair):
  """fp32 values of the high and low nibbles of int32 bytes `w`."""
  if pair:
    u = lut_ref[w]
    hi = jax.lax.bitcast_convert_type(u & _HI, jnp.float32)
    lo = jax.lax.bitcast_convert_type(u << np.uint32(16), jnp.float32)
    return hi, lo
  return lut_ref[w >> 4], lut_ref[w & 15]


def _store_lanes(acc, out_ref, bias_ref, *, row0, out0, row_ok, s, m,
                 has_bias, split_k):
  """Writes a `[block_n, m_pad]` swap-AB tile transposed, into the
  `[m_pad, n]` output (so no transpose follows the kernel): the first `m`
  lanes of the rows inside N, with the bias when K is not split (else
  fp32 partials)."""
  block_n, m_pad = acc.shape
  m_ok = jnp.arange(m_pad, dtype=jnp.int32) < m
  if split_k == 1 and has_bias:
    b = pltriton.load(bias_ref.at[pl.ds(row0, block_n)], mask=row_ok,
                      other=0).astype(jnp.float32)
    acc = acc + b[:, None]
  omask = jnp.broadcast_to(m_ok[:, None] & row_ok[None, :], (m_pad, block_n))
  cols = pl.ds(out0 + row0, block_n)
  if split_k == 1:
    pltriton.store(out_ref.at[:, cols], acc.T.astype(out_ref.dtype),
                   mask=omask)
  else:
    pltriton.store(out_ref.at[s, :, cols], acc.T, mask=omask)


def _mma(xs_ref, lut_ref, bias_ref, out_ref, *, load, absmax_of, block_mask,
         row0, out0, row_ok, s, m, block_kb, half, block_n, steps,
         has_bias, split_k, compute_dtype, prefetch, code, interpret):
  """The "mma" variant: per step, `block_kb` quantization blocks of
  `block_n` rows decoded and scaled by their absmax in the compute dtype
  (in registers with byte permutes when `code` is given, `lut_decode`),
  then one tensor-core product per nibble half against `x`'s halves
  (swap-AB; `xs` holds `x`'s even and odd columns, padded to 16 or more
  lanes and to whole steps)."""
  m_pad = xs_ref.shape[1]
  width = block_kb * half
  dims = (((1,), (1,)), ((), ()))

  def step(t, w, am, acc):
    kb0, kbs, ok2 = block_mask(t)
    am = absmax_of(am, kbs, ok2)
    shape = (block_n, block_kb, half)
    if code is not None:
      scale = jnp.broadcast_to(
          lut_decode.scale_words(am, compute_dtype)[:, :, None], shape)
      hi, lo = lut_decode.decode_scaled(
          w, scale, code, compute_dtype, interpret,
          table=lut_ref[...] if interpret else None)
    else:  # gathers from the 16-entry table, the same values
      hi, lo = _decode(w.astype(jnp.int32), lut_ref, False)
      am = am.astype(compute_dtype).astype(jnp.float32)[:, :, None]
      hi = (hi * am).astype(compute_dtype)
      lo = (lo * am).astype(compute_dtype)
    # x is zero beyond K (padded), so masked-off weight bytes add nothing.
    x0 = pl.multiple_of(kb0 * half, half)
    xe = xs_ref[_backend.zero_index(), :, pl.ds(x0, width)]
    xo = xs_ref[_backend.one_index(), :, pl.ds(x0, width)]
    acc = acc + jax.lax.dot_general(hi.reshape(block_n, width), xe, dims,
                                    preferred_element_type=jnp.float32)
    return acc + jax.lax.dot_general(lo.reshape(block_n, width), xo, dims,
                                     preferred_element_type=jnp.float32)

  init = jnp.zeros((block_n, m_pad), jnp.float32)
  if prefetch:
    # Software pipelining in registers, `prefetch` steps deep: step t + d's
    # bytes are requested before step t's are decoded (Triton pipelines
    # only loads that feed a dot; these feed the decode).
    # Beyond the last step the last tile is loaded again (no mask).
    d = int(prefetch)
    def body(t, carry):
      acc, queue = carry[0], carry[1:]
      nxt = load(jnp.minimum(t + d, steps - 1))
      return (step(t, *queue[0], acc),) + queue[1:] + (nxt,)
    first = tuple(load(jnp.int32(min(j, steps - 1))) for j in range(d))
    acc = jax.lax.fori_loop(0, steps, body, (init,) + first)[0]
  else:
    acc = jax.lax.fori_loop(0, steps,
                            lambda t, acc: step(t, *load(t), acc), init)
  _store_lanes(acc, out_ref, bias_ref, row0=row0, out0=out0, row_ok=row_ok,
               s=s, m=m, has_bias=has_bias, split_k=split_k)


def _warp(xs_ref, w_ref, out_ref, bias_ref, words_ref, lut_ref, *, absmax_at,
          row0, out0, s, m, n, blocksize, block_n, steps, split_k, has_bias,
          compute_dtype, code, prefetch, interpret):
  """The "warp" variant (`warp_mma`): row tiles a = rows `[row0, row0 + R)`
  and b = the next R, 64 bytes of each row a step, decoded in registers
  and multiplied by `x` in one warp-wide tensor-core product per word.
  `xs_ref` holds x's pairs of values, uint32 `[m, k / 2 / p, p]`."""
  half_rows = block_n // 2
  nb, p = warp_mma.tile_shape(blocksize)
  parts = max(1, blocksize // 2 // p)  # tile blocks per quantization block
  total = xs_ref.shape[1] // nb        # steps along the whole of K
  shape = (half_rows, nb, p)
  r = jnp.arange(half_rows, dtype=jnp.int32)
  starts = (row0, row0 + half_rows)
  rows = tuple(a + r for a in starts)
  oks = tuple(v < n for v in rows)
  # x row (r % 8) % m feeds the MMA's column r % 8: columns >= m repeat
  # the first ones (read back from columns < m only), so no load is masked.
  xrow = (r % 8) % m
  masked = n % block_n != 0
  # Table words 0, 2, 4, 6 (the permutes' register operands), loaded once
  # per tile block and broadcast: as scalars they sit in uniform registers
  # and are copied into ordinary ones before every permute (48 copies a
  # step in the SASS); loaded per byte, each call has its own copy.
  words = None if interpret else [
      jnp.broadcast_to(pltriton.load(words_ref.at[jnp.int32(j)])[None, :, None],
                       shape)
      for j in range(4)]

  def load(t):
    """Step `t`'s bytes, scale words and x pairs."""
    g = s * steps + t
    live = g < total if split_k * steps != total else None
    sb0 = g * nb
    ws, scales = [], []
    for a, ok in zip(starts, oks):
      ok = ok if live is None else ok & live
      w_at = w_ref.at[pl.ds(a, half_rows), pl.ds(sb0, nb), :]
      if masked or live is not None:
        ws.append(pltriton.load(
            w_at, mask=jnp.broadcast_to(ok[:, None, None], shape), other=0,
            eviction_policy="evict_first"))
      else:
        ws.append(pltriton.load(w_at, eviction_policy="evict_first"))
      # nb > 1 only when a tile block is a whole quantization block
      am = absmax_at(a, half_rows, sb0 // parts, nb,
                     jnp.broadcast_to(ok[:, None], (half_rows, nb)))
      scales.append(lut_decode.scale_words(am, compute_dtype)[:, :, None])
    if m == 1:  # one row for all: a broadcast
      x_at = xs_ref.at[_backend.zero_index(), pl.ds(sb0, nb), :]
    else:
      x_at = xs_ref.at[xrow[:, None, None],
                       (sb0 + jnp.arange(nb, dtype=jnp.int32))[None, :, None],
                       jnp.arange(p, dtype=jnp.int32)[None, None, :]]
    if live is None:
      xp = pltriton.load(x_at)
    else:
      xp = pltriton.load(x_at, mask=live, other=0)
    return ws, scales, jnp.broadcast_to(xp, shape)

  def compute(loaded, acc):
    (wa, wb), (sa, sb), xp = loaded
    return warp_mma.product(
        wa, wb, sa, sb, xp, acc, code, compute_dtype, interpret,
        table=lut_ref[...] if interpret else None, words=words)

  acc = jnp.zeros(shape, jnp.float32)
  if steps <= 8:  # unrolled: addresses at constant offsets
    if prefetch:  # every step's loads first
      loaded = [load(t) for t in range(steps)]
      for t in range(steps):
        acc = compute(loaded[t], acc)
    else:
      for t in range(steps):
        acc = compute(load(t), acc)
  else:
    acc = jax.lax.fori_loop(0, steps, lambda t, acc: compute(load(t), acc),
                            acc)
  ya, yb = warp_mma.row_sums(acc, m)
  for a, ok, ys in zip(starts, oks, (ya, yb)):
    for i, y in enumerate(ys):
      cols = pl.ds(out0 + a, half_rows)
      if split_k == 1:
        if has_bias:
          y = y + pltriton.load(bias_ref.at[pl.ds(a, half_rows)], mask=ok,
                                other=0).astype(jnp.float32)
        pltriton.store(out_ref.at[jnp.int32(i), cols],
                       y.astype(out_ref.dtype), mask=ok)
      else:
        pltriton.store(out_ref.at[s, jnp.int32(i), cols], y, mask=ok)


# The variants that take the permutes' table words as an input (with the
# "prmt" table): `_gemv` adds it, `_kernel` reads it.
_WORDS_INPUT = ("reduce", "warp")


def _kernel(*refs, ns, nested_lens, dq, has_bias, block_n, **kw):
  """One weight (`len(ns) == 1`) or several sharing `x` ("grouped"): the
  row tiles of weight g follow those of weights 0..g-1 along the grid's
  first axis, and its outputs follow theirs along N."""
  refs = list(refs)
  xs_ref = refs.pop(0)
  per = 5 if dq else 2
  weights = [refs[g * per:(g + 1) * per] for g in range(len(ns))]
  refs = refs[len(ns) * per:]
  lut_ref = refs.pop(0)
  words_ref = (refs.pop(0) if kw["code"] is not None
               and kw["variant"] in _WORDS_INPUT else None)
  bias_ref = refs.pop(0) if has_bias else None
  out_ref = refs.pop(0)
  # (read here: interpret mode cannot read them inside a `pl.when`)
  i, s = pl.program_id(0), pl.program_id(1)
  if len(ns) == 1:
    _tile(xs_ref, *weights[0], lut_ref, bias_ref, out_ref, tile=i, s=s,
          out0=0, words_ref=words_ref,
          n=ns[0], nested_len=nested_lens[0], dq=dq, has_bias=has_bias,
          block_n=block_n, **kw)
    return
  first, out0 = 0, 0
  for g, n in enumerate(ns):
    tiles = -(-n // block_n)
    def run(g=g, n=n, first=first, out0=out0):
      _tile(xs_ref, *weights[g], lut_ref, bias_ref, out_ref, tile=i - first,
            s=s, out0=out0, words_ref=words_ref, n=n,
            nested_len=nested_lens[g], dq=dq, has_bias=has_bias,
            block_n=block_n, **kw)
    pl.when((i >= first) & (i < first + tiles))(run)
    first, out0 = first + tiles, out0 + n


def _tile(xs_ref, w_ref, am_ref, *refs, tile, s, out0, words_ref, m, n, nkb,
          block_kb, half, block_n, steps, dq, nested_blocksize, nested_len,
          variant, has_bias, split_k, compute_dtype, pair, prefetch, code,
          interpret):
  """Row tile `tile` of one weight and K split `s`, written at output
  column `out0` on."""
  refs = list(refs)
  if dq:
    nested_ref, code2_ref, off_ref = refs[:3]
    refs = refs[3:]
  lut_ref, bias_ref, out_ref = refs

  row0 = tile * block_n
  rows = row0 + jnp.arange(block_n, dtype=jnp.int32)
  row_ok = rows < n
  need_kmask = split_k * steps * block_kb != nkb
  off = off_ref[0] if dq else None

  def absmax_of(am, kbs, ok, rows=rows):
    """fp32 absmax of `rows` x blocks `kbs` from the loaded `am`."""
    if not dq:
      return am
    flat = (jnp.minimum(rows, n - 1)[:, None] * nkb
            + jnp.minimum(kbs, nkb - 1)[None, :])
    am = decode_absmax(am, flat, nested_ref, code2_ref, off,
                       nested_blocksize, nested_len, interpret)
    return jnp.where(ok, am, 0.0)

  def block_mask(t, live=None):
    """Step `t`'s first quantization block, its `block_kb` block indices
    and their `[block_n, block_kb]` mask (rows, K; off unless `live`)."""
    kb0 = (s * steps + t) * block_kb
    kbs = kb0 + jnp.arange(block_kb, dtype=jnp.int32)
    ok = row_ok[:, None]
    if need_kmask:
      ok = ok & (kbs < nkb)[None, :]
    if live is not None:
      ok = ok & live
    return kb0, kbs, jnp.broadcast_to(ok, (block_n, block_kb))

  unmasked = not (need_kmask or w_ref.shape[0] % block_n)

  def load(t, live=None):
    """Step `t`'s packed bytes and raw absmax (masked off unless `live`)."""
    kb0, _, ok2 = block_mask(t, live)
    w_at = w_ref.at[pl.ds(row0, block_n), pl.ds(kb0, block_kb), :]
    am_at = am_ref.at[pl.ds(row0, block_n), pl.ds(kb0, block_kb)]
    if unmasked and live is None:  # vectorized byte loads
      return (pltriton.load(w_at, eviction_policy="evict_first"),
              pltriton.load(am_at))
    ok3 = jnp.broadcast_to(ok2[:, :, None], (block_n, block_kb, half))
    w = pltriton.load(w_at, mask=ok3, other=0, eviction_policy="evict_first")
    am = pltriton.load(am_at, mask=ok2, other=0)
    return w, am

  if variant == "warp":
    def absmax_at(a, count, kb0, nb, ok):
      """fp32 absmax of rows `[a, a + count)`, blocks `[kb0, kb0 + nb)`."""
      am = pltriton.load(am_ref.at[pl.ds(a, count), pl.ds(kb0, nb)],
                         mask=ok, other=0)
      return absmax_of(am, kb0 + jnp.arange(nb, dtype=jnp.int32), ok,
                       rows=a + jnp.arange(count, dtype=jnp.int32))
    _warp(xs_ref, w_ref, out_ref, bias_ref, words_ref, lut_ref,
          absmax_at=absmax_at, row0=row0, out0=out0, s=s, m=m, n=n,
          blocksize=2 * half, block_n=block_n, steps=steps, split_k=split_k,
          has_bias=has_bias, compute_dtype=compute_dtype, code=code,
          prefetch=prefetch, interpret=interpret)
    return

  if variant == "mma":
    _mma(xs_ref, lut_ref, bias_ref, out_ref, load=load,
         absmax_of=absmax_of, block_mask=block_mask, row0=row0, out0=out0,
         row_ok=row_ok, s=s, m=m, block_kb=block_kb, half=half,
         block_n=block_n, steps=steps,
         has_bias=has_bias, split_k=split_k, compute_dtype=compute_dtype,
         prefetch=prefetch, code=code, interpret=interpret)
    return

  if variant == "reduce":
    folds = _FOLDS if code is not None else 0

    def step(t, w, am, accs):
      kb0, kbs, ok2 = block_mask(t)
      am = absmax_of(am, kbs, ok2)
      if code is not None:  # in registers, scaled in the compute dtype
        scale = jnp.broadcast_to(
            lut_decode.scale_words(am, compute_dtype)[:, :, None],
            (block_n, block_kb, half))
        # The permutes' register operands loaded, not constants: as
        # constants the compiler re-creates one before nearly every
        # permute here (about 1.6 instructions a byte, seen in the SASS).
        words = (None if interpret
                 else [words_ref[j] for j in (0, 2, 4, 6)])
        hi, lo = lut_decode.decode_scaled_f32(
            w, scale, code, compute_dtype, interpret,
            table=lut_ref[...] if interpret else None, words=words)
        am = None
      else:
        am = am[:, :, None]
        hi, lo = _decode(w.astype(jnp.int32), lut_ref, pair)
      xmask = None
      if need_kmask:
        xmask = jnp.broadcast_to((kbs < nkb)[:, None, None],
                                 (block_kb, half, 2))
      new = []
      for r in range(m):
        # x as it is ([m, nkb, half, 2], no pass before the kernel): the
        # even and odd columns are split in registers.
        x_r = xs_ref.at[jnp.int32(r), pl.ds(kb0, block_kb), :, :]
        if xmask is None:
          xr = pltriton.load(x_r)
        else:
          xr = pltriton.load(x_r, mask=xmask, other=0)
        xe, xo = (v.astype(jnp.float32) for v in jax.lax.unstack(xr, axis=2))
        if am is None:  # two FMAs a byte (Triton would not fuse them)
          acc = accs[r]
          for h, xh, l, xl in zip(_fold(hi, folds), _fold(xe, folds),
                                  _fold(lo, folds), _fold(xo, folds)):
            acc = _backend.fma_rn(h, xh[None], acc, interpret)
            acc = _backend.fma_rn(l, xl[None], acc, interpret)
          new.append(acc)
        else:
          new.append(accs[r] + (hi * xe[None] + lo * xo[None]) * am)
      return tuple(new)

    if prefetch:
      # Software pipelining: step t + 1's bytes are requested before step
      # t's are decoded, so their memory latency overlaps the arithmetic.
      def body(t, carry):
        accs, w, am = carry
        nxt = load(t + 1, t + 1 < steps)
        return (step(t, w, am, accs),) + nxt
    else:
      def body(t, accs):
        return step(t, *load(t), accs)

    shape = (block_n, block_kb, half >> folds)
    init = tuple(jnp.zeros(shape, jnp.float32) for _ in range(m))
    if prefetch:
      accs = jax.lax.fori_loop(0, steps, body, (init,) + load(0))[0]
    else:
      accs = jax.lax.fori_loop(0, steps, body, init)
    for r in range(m):
      y = jnp.sum(jnp.sum(accs[r], axis=2), axis=1)
      if split_k == 1:
        if has_bias:
          y = y + pltriton.load(bias_ref.at[pl.ds(row0, block_n)],
                                mask=row_ok, other=0).astype(jnp.float32)
        pltriton.store(out_ref.at[jnp.int32(r), pl.ds(out0 + row0, block_n)],
                       y.astype(out_ref.dtype), mask=row_ok)
      else:
        pltriton.store(
            out_ref.at[s, jnp.int32(r), pl.ds(out0 + row0, block_n)], y,
            mask=row_ok)
    return

  # "dot": xs_ref is [2, m_pad, nkb, half] in the compute dtype.
  m_pad = xs_ref.shape[1]
  m_ok = jnp.arange(m_pad, dtype=jnp.int32) < m
  precision = (jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32
               else None)
  dims = (((1,), (1,)), ((), ()))

  def body(t, acc):
    for j in range(block_kb):
      kb = (s * steps + t) * block_kb + j
      ok_r = row_ok
      if need_kmask:
        ok_r = ok_r & (kb < nkb)
      ok_w = jnp.broadcast_to(ok_r[:, None], (block_n, half))
      w = pltriton.load(w_ref.at[pl.ds(row0, block_n), kb, :], mask=ok_w,
                        other=0, eviction_policy="evict_first")
      am = pltriton.load(am_ref.at[pl.ds(row0, block_n), kb], mask=ok_r,
                         other=0)
      am = absmax_of(am[:, None], jnp.full((1,), kb, jnp.int32),
                     ok_r[:, None])
      hi, lo = _decode(w.astype(jnp.int32), lut_ref, pair)
      ok_x = m_ok[:, None]
      if need_kmask:
        ok_x = ok_x & (kb < nkb)
      ok_x = jnp.broadcast_to(ok_x, (m_pad, half))
      xe = pltriton.load(xs_ref.at[_backend.zero_index(), :, kb, :],
                         mask=ok_x, other=0)
      xo = pltriton.load(xs_ref.at[_backend.one_index(), :, kb, :],
                         mask=ok_x, other=0)
      p = jax.lax.dot_general(hi.astype(compute_dtype), xe, dims,
                              precision=precision,
                              preferred_element_type=jnp.float32)
      p = p + jax.lax.dot_general(lo.astype(compute_dtype), xo, dims,
                                  precision=precision,
                                  preferred_element_type=jnp.float32)
      acc = acc + p * am
    return acc

  acc = jax.lax.fori_loop(0, steps, body,
                          jnp.zeros((block_n, m_pad), jnp.float32))
  _store_lanes(acc, out_ref, bias_ref, row0=row0, out0=out0, row_ok=row_ok,
               s=s, m=m, has_bias=has_bias, split_k=split_k)


@functools.partial(
    jax.jit,
    static_argnames=("n", "k", "blocksize", "nested_blocksize", "config",
                     "code", "interpret"))
def gemv_4bit(
    x: jax.Array,
    packed: jax.Array,
    absmax: jax.Array,
    lut: jax.Array,
    *,
    n: int,
    k: int,
    blocksize: int,
    nested: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    nested_blocksize: int = 256,
    bias: jax.Array | None = None,
    config: tuple | None = None,
    code: tuple[float, ...] | None = None,
    interpret: bool = False,
) -> jax.Array:
  """`x @ W.T (+ bias)` for a packed 4-bit `W` of shape `[n, k]`.

  Args:
    x: `[m, k]` float32/float16/bfloat16; also the compute and output dtype.
    packed: uint8 `[n * k / 2]` (bitsandbytes order).
    absmax: float32 `[n * k / blocksize]`, or uint8 codes when `nested`.
    lut: float32 `[16]` code table.
    n: rows of `W` (output features).
    k: columns of `W` (input features), a multiple of `blocksize`.
    blocksize: quantization block size.
    nested: (nested_absmax, nested code [256], offset) for double quant.
    nested_blocksize: absmax codes per nested absmax.
    bias: optional `[n]`.
    config: (variant, block_n, block_kb, split_k, num_warps, num_stages[,
      table[, prefetch]]); default from `default_config`. Table "prmt"
      ("reduce" or "mma") decodes in registers and needs `code`. Variant
      "tma" (`gemv_4bit_tma`, never the default) reads `block_kb` as bytes
      of a row per step.
    code: the 16 code values of `lut` as floats (static), for "prmt".
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    `[m, n]` in `x.dtype`, accumulated in fp32.
  """
  return _gemv(x, ((packed, absmax, nested),), lut, ns=(n,), k=k,
               blocksize=blocksize, nested_blocksize=nested_blocksize,
               bias=bias, config=config, code=code, interpret=interpret)[0]


@functools.partial(
    jax.jit,
    static_argnames=("ns", "k", "blocksize", "nested_blocksize", "config",
                     "code", "interpret"))
def gemv_4bit_group(
    x: jax.Array,
    weights: tuple,
    lut: jax.Array,
    *,
    ns: tuple[int, ...],
    k: int,
    blocksize: int,
    nested_blocksize: int = 256,
    config: tuple | None = None,
    code: tuple[float, ...] | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
  """`x @ W_g.T` for several 4-bit weights `[n_g, k]` in one kernel launch.

  For the projections that read one input (a layer's q/k/v, gate/up): one
  program grid walks the row tiles of every weight, so at decode time the
  small ones (k/v) do not each pay a launch, a split-K reduction and a
  partly idle GPU. Each output equals `gemv_4bit` of its weight with the
  same `config` (default: `default_config` for `sum(ns)` rows).

  Args:
    x: `[m, k]` float32/float16/bfloat16.
    weights: `(packed, absmax, nested)` per weight, as `gemv_4bit` takes
      them; all double-quantized or none.
    lut: float32 `[16]` code table (one code for all).
    ns: rows of each weight.
    k, blocksize, nested_blocksize, config, code, interpret: as
      `gemv_4bit`.

  Returns:
    The `[m, n_g]` outputs, in `x.dtype`.
  """
  return _gemv(x, tuple(weights), lut, ns=tuple(ns), k=k,
               blocksize=blocksize, nested_blocksize=nested_blocksize,
               bias=None, config=config, code=code, interpret=interpret)


def _check_warp(m, k, block_n, num_warps, table):
  """The "warp" variant's limits (see `warp_mma`)."""
  if table != "prmt":
    raise ValueError(f"config: variant 'warp' needs table 'prmt', got "
                     f"{table!r}")
  if not 1 <= m <= 8:
    raise ValueError(f"x: variant 'warp' takes 1 to 8 rows, got {m}")
  if k % (2 * warp_mma.BYTES_PER_STEP):
    raise ValueError(f"k: variant 'warp' needs a multiple of "
                     f"{2 * warp_mma.BYTES_PER_STEP}, got {k}")
  if block_n % (16 * num_warps):
    raise ValueError(
        "config: variant 'warp' needs block_n a multiple of 16 x num_warps "
        f"(8 rows a warp in each of its two row tiles), got block_n "
        f"{block_n} with {num_warps} warps")


def _gemv_tma(x, weights, *, ns, k, blocksize, nested_blocksize, bias,
              config, code, interpret):
  """The "tma" variant (`gemv_4bit_tma`), one launch per weight: config
  ("tma", 64, bytes a row per step, split, 4, stages[, "prmt", 0])."""
  _, block_n, bk, split, num_warps, stages = config[:6]
  dtype = jnp.dtype(x.dtype)
  if block_n != gemv_4bit_tma.BLOCK_N or num_warps != 4:
    raise ValueError(
        f"config: variant 'tma' runs {gemv_4bit_tma.BLOCK_N} rows with 4 "
        f"warps, got block_n {block_n} with {num_warps} warps")
  if code is None:
    raise ValueError("code: variant 'tma' decodes in registers and needs "
                     "the 16 code values, got None")
  if nested_blocksize != 256:
    raise ValueError(f"nested_blocksize: variant 'tma' needs 256, got "
                     f"{nested_blocksize}")
  ys = []
  for (packed, absmax, nested), n in zip(weights, ns):
    gemv_4bit_tma.check_config(x.shape[0], k, blocksize, dtype,
                               nested is not None, bk, split, stages)
    ys.append(gemv_4bit_tma.gemv(x, packed, absmax, *nested, code=code, n=n,
                                 k=k, bk=bk, split=split, stages=stages,
                                 interpret=interpret))
  return _with_bias(ys, bias, dtype)


def _with_bias(ys, bias, dtype) -> tuple:
  """The fp32 outputs of a Mosaic GPU variant, plus `bias` (fp32), in
  `dtype`."""
  if bias is not None:
    ys = [y + bias.astype(jnp.float32) for y in ys]
  return tuple(y.astype(dtype) for y in ys)


# k a multiple of this for the Mosaic GPU GEMVs: their K chunks of 256
# columns. Up to the forty-first session it was 1024 (TMA's 16-byte rows of
# absmax codes); since then the codes' rows are padded where k is not a
# multiple of 1024 (`gemv_4bit_lut.codes_tiles`: Llama-2's down projection
# at k = 11008, Qwen2.5's 3584 and 18944), measured in docs/benchmarks.md.
MOSAIC_K_MULTIPLE = gemv_4bit_lut.CHUNK
# Both Mosaic GPU GEMVs run a program an SM, a K chunk of 256 columns and
# as many row groups as keep one wave (`gemv_4bit_lut.default_rows`). Past
# 66 chunks (k > 16896 on 132 SMs) that is one row group, k / 256 programs:
# 3584x18944 (Qwen2.5-7B's down, 74 of 132 SMs) ran slower than the Triton
# kernels at M = 1 (26.8 us against 23.3), 4 and 16 (33.3 against 31.1,
# 40.4 against 35.3; H100, forty-first session), where 5120x13824's 108
# programs (82%) ran faster. So they serve only where the K chunks times the
# row groups fill this share of the SMs: on 132 SMs not 45-46 chunks (90
# and 92 programs) nor 67-92 (k = 17152-23552, one row group).
MOSAIC_MIN_FILL = 0.7


def mosaic_fills_sms(k: int, num_sms: int | None = None) -> bool:
  """Whether k's K chunks (`k / 256`) times the row groups that keep them
  in one wave fill `MOSAIC_MIN_FILL` of the SMs."""
  if num_sms is None:
    num_sms = _backend.num_sms()
  chunks = max(1, k // gemv_4bit_lut.CHUNK)
  return chunks * max(1, num_sms // chunks) >= MOSAIC_MIN_FILL * num_sms


def _mosaic_dq64(k, blocksize, dtype, nested, nested_blocksize, code,
                 interpret) -> bool:
  """What both Mosaic GPU GEMVs need of their arguments: the 16 code values,
  NF4/FP4 double-quantized in blocks of 64 (256 codes a nested absmax),
  16-bit x, k a multiple of `MOSAIC_K_MULTIPLE` whose chunks fill the SMs
  (`mosaic_fills_sms`); compiled (`interpret` False), a Hopper GPU and a
  JAX with Mosaic GPU (both kernels' `available`)."""
  return (code is not None and nested and blocksize == 64
          and nested_blocksize == 256
          and jnp.dtype(dtype).name in ("bfloat16", "float16")
          and k % MOSAIC_K_MULTIPLE == 0 and mosaic_fills_sms(k)
          and (interpret or (gemv_4bit_lut.available()
                             and _backend.on_hopper())))


LUT_MIN_N = 4096  # the table GEMV's default from this many rows a weight
LUT_GROUP_MIN_N = 1024  # or a group's weight, LUT_MIN_N in all
# and k at least this: 8960x1536 (Qwen2.5-1.5B's gate/up, 6 K chunks)
# took 8.5 us on the table against 7.1 for "reduce" (H100, forty-first
# session); k = 2048 (Llama-3.2-1B) was served before and stays.
LUT_MIN_K = 2048


def lut_serves(m: int, ns: tuple[int, ...], k: int, blocksize: int, dtype,
               nested: bool, nested_blocksize: int, code,
               interpret: bool = True) -> bool:
  """Whether the default at these arguments is the table GEMV
  (`gemv_4bit_lut`, all the weights in one launch): one row of 16-bit x,
  NF4/FP4 double-quantized in blocks of 64 (256 codes a nested absmax), k
  a multiple of `MOSAIC_K_MULTIPLE` and at least `LUT_MIN_K`, and every
  weight at least `LUT_MIN_N` rows, or, for a group of weights (q/k/v),
  every weight at least `LUT_GROUP_MIN_N` rows and `LUT_MIN_N` in all;
  compiled (`interpret` False), a Hopper GPU and a JAX with Mosaic GPU.

  Measured on the H200 (docs/benchmarks.md, twenty-fourth session, sweep
  run b): faster than the "reduce" default on every Llama decode shape
  from 4096x4096 up; on 1024x4096 alone slower (7.9 us against 4.4 in run
  a). q/k/v groups in 4-layer decode profiles: Llama-3-8B's (4096 + 1024
  + 1024 rows, k 4096, row groups (5, 1, 1), 112 programs) 9.1 us against
  11.1 for "reduce" (twenty-ninth session); Llama-3.2-3B's (3072 + 1024 +
  1024, k 3072, (7, 2, 2), 132 programs) 7.2 against 8.5; Llama-3-70B's
  (8192 + 1024 + 1024, k 8192, (3, 1, 1), 160 programs: past one wave of
  the SMs) 18.7 against 28.1 (thirtieth session).
  """
  if m != 1 or k < LUT_MIN_K or not _mosaic_dq64(
      k, blocksize, dtype, nested, nested_blocksize, code, interpret):
    return False
  if min(ns) >= LUT_MIN_N:
    return True
  return (len(ns) > 1 and min(ns) >= LUT_GROUP_MIN_N
          and sum(ns) >= LUT_MIN_N)


# On since the thirty-fourth session's run (docs/benchmarks.md): the
# Llama-3-8B shape in NF4 + DQ decoded 406.6 tokens/s at batch 1 with this
# and `NORM_FUSED` on, 392.8 with both off, in one call on the H200 (4-layer
# profiles, thirty-third session: 597.5 against 610.1 us of kernels a
# step). Set it False for the unfused launches.
SWIGLU_FUSED = True


def swiglu_serves(m: int, n: int, k: int, n_out: int, blocksize: int, dtype,
                  nested: bool, nested_blocksize: int, code,
                  interpret: bool = True) -> bool:
  """Whether a SwiGLU MLP's three weights (gate and up `[n, k]`, down
  `[n_out, n]`) run as `gemv_4bit_lut.gemv_swiglu`'s two launches: with
  `SWIGLU_FUSED` on, where the table GEMV serves gate and up together and
  down alone (`lut_serves`), so the unfused path would run the same two
  kernels with the partials' sums and `silu(gate) * up` in an XLA kernel
  between."""
  return (SWIGLU_FUSED
          and lut_serves(m, (n, n), k, blocksize, dtype, nested,
                         nested_blocksize, code, interpret)
          and lut_serves(m, (n_out,), n, blocksize, dtype, nested,
                         nested_blocksize, code, interpret))


# On, measured with SWIGLU_FUSED (above): an RMSNorm made in the table
# GEMV's build (`gemv_4bit_lut.NormInput`).
NORM_FUSED = True


def norm_serves(m: int, ns: tuple[int, ...], k: int, blocksize: int, dtype,
                nested: bool, nested_blocksize: int, code,
                interpret: bool = True) -> bool:
  """Whether weights that read one RMSNorm'd row (a layer's q/k/v after
  its input norm, gate/up after the post-attention norm) take the norm
  in the table GEMV's build (`gemv_4bit_lut.gemv_group`'s `rms_norm`):
  with `NORM_FUSED` on, where `lut_serves` them; the unfused path runs
  the norm as a kernel of its own before them."""
  return NORM_FUSED and lut_serves(m, ns, k, blocksize, dtype, nested,
                                   nested_blocksize, code, interpret)


def _check_weights(check, x, weights, ns, k, blocksize, nested_blocksize,
                   code, needs: str):
  """x's dtype, after a Mosaic GPU variant's `check` of every weight; the
  ValueError names `code` (what `needs` it) when it is None."""
  dtype = jnp.dtype(x.dtype)
  if code is None:
    raise ValueError(f"code: {needs}, got None")
  for (_, _, nested), n in zip(weights, ns):
    check(x.shape[0], n, k, blocksize, dtype, nested is not None,
          nested_blocksize)
  return dtype


def _gemv_lut(x, weights, *, ns, k, blocksize, nested_blocksize, bias,
              config, code, interpret):
  """The "lut" variant (`gemv_4bit_lut`): config ("lut", rows a warpgroup
  a step (64 or 128), 128, row groups, compute warps (4, or 8: two
  warpgroups beside a TMA one), stages[, early]), one launch a weight; or
  None, the default: all the weights in one launch
  (`gemv_4bit_lut.gemv_group`, `group_config`)."""
  dtype = _check_weights(
      gemv_4bit_lut.check, x, weights, ns, k, blocksize, nested_blocksize,
      code, "variant 'lut' makes its tables from the 16 code values and "
      "needs them")
  lut_weights = [(packed, absmax, *nested)
                 for packed, absmax, nested in weights]
  if config is None:  # the default: every weight in one launch
    ys = gemv_4bit_lut.gemv_group(
        x, lut_weights, code=code, ns=tuple(ns), k=k, interpret=interpret,
        **gemv_4bit_lut.group_config(tuple(ns), k))
  else:
    _, block_n, bk, rows, num_warps, stages = config[:6]
    early = bool(config[6]) if len(config) > 6 else False
    if (block_n not in gemv_4bit_lut.STEP_ROWS
        or bk != gemv_4bit_lut.CHUNK // 2 or num_warps not in (4, 8)):
      raise ValueError(
          "config: variant 'lut' runs 64 or 128 rows a step, "
          f"{gemv_4bit_lut.CHUNK // 2} bytes a row and 4 or 8 warps, got "
          f"block_n {block_n}, {bk} bytes and {num_warps} warps")
    ys = [gemv_4bit_lut.gemv(x, *w, code=code, n=n, k=k, rows=rows,
                             step_rows=block_n, stages=stages,
                             wgs=num_warps // 4, early=early,
                             interpret=interpret)
          for w, n in zip(lut_weights, ns)]
  return _with_bias(ys, bias, dtype)


WARP_TMA_MIN_SIDE = 8192  # below WARP_TMA_ALL_M rows of x, the TMA warp
# GEMV serves single weights with a side this long, and, with k of at least
# WARP_TMA_MIN_K (as measured), single weights of WARP_TMA_MIN_ROWS rows
# and groups of weights of WARP_TMA_GROUP_MIN_N rows each (gate/up, not
# q/k/v); from WARP_TMA_ALL_M to WARP_TMA_MAX_M rows every weight and
# group of weights with at least WARP_TMA_MIN_N rows each (the smallest
# measured: q/k/v's 1024)
WARP_TMA_MIN_ROWS = 4096
WARP_TMA_GROUP_MIN_N = 8192
WARP_TMA_MIN_K = 4096
WARP_TMA_ALL_M = 8
WARP_TMA_MAX_M = 16
WARP_TMA_MIN_N = 1024


def warp_tma_serves(m: int, ns: tuple[int, ...], k: int, blocksize: int,
                    dtype, nested: bool, nested_blocksize: int, code,
                    interpret: bool = True) -> bool:
  """Whether the default at these arguments is the TMA warp GEMV
  (`gemv_4bit_warp_tma`): 2 to 16 rows of 16-bit x, NF4/FP4 weights
  double-quantized in blocks of 64 (256 codes a nested absmax) with k a
  multiple of `MOSAIC_K_MULTIPLE`: below `WARP_TMA_ALL_M` rows a single
  weight with n or k at least `WARP_TMA_MIN_SIDE`, and where k is at least
  `WARP_TMA_MIN_K` a single weight of at least `WARP_TMA_MIN_ROWS` rows or
  a group of at least `WARP_TMA_GROUP_MIN_N` rows a weight; from
  `WARP_TMA_ALL_M` rows any weight or group of at least `WARP_TMA_MIN_N`
  rows each; compiled (`interpret` False), a Hopper GPU and a JAX with
  Mosaic GPU.

  Measured on the H200 with the permutes (docs/benchmarks.md,
  twenty-sixth and twenty-seventh sessions): M = 8..16 every weight and
  group, 22.5 us against the "warp" kernel's 27.3 on 14336x4096 at M = 8,
  and 2,245.1 tokens/s against 2,081.9 for the 8B decode at batch 8.
  Below M = 8, measured on the H100 with the "lds" decode (fortieth
  session), us against "warp": 4096x4096 7.9 against 9.7 (M = 2) and
  8.4 against 10.8 (M = 4), 4096x14336 19.2 against 24.5, the gate/up
  pair 30.8 against 34.8 (M = 2) and 30.6 against 36.9 (M = 4); q/k/v
  (4096 + 2 x 1024 rows) 13.1 against 12.8 and 14.1 against 11.9, so
  q/k/v keeps "warp" there.
  """
  if not 2 <= m <= WARP_TMA_MAX_M:
    return False
  if m >= WARP_TMA_ALL_M:
    wanted = min(ns) >= WARP_TMA_MIN_N or (
        len(ns) == 1 and k >= WARP_TMA_MIN_SIDE)
  elif len(ns) == 1:
    wanted = max(ns[0], k) >= WARP_TMA_MIN_SIDE or (
        ns[0] >= WARP_TMA_MIN_ROWS and k >= WARP_TMA_MIN_K)
  else:
    wanted = min(ns) >= WARP_TMA_GROUP_MIN_N and k >= WARP_TMA_MIN_K
  if not wanted:
    return False
  return _mosaic_dq64(k, blocksize, dtype, nested, nested_blocksize, code,
                      interpret)


def _gemv_warp_tma(x, weights, *, ns, k, blocksize, nested_blocksize, bias,
                   config, code, interpret):
  """The "warp_tma" variant (`gemv_4bit_warp_tma`), all the weights in one
  launch: config ("warp_tma", 64, 128, row groups of each weight (an int
  for one weight), compute warps (8 or 12: 2 or 3 compute
  warpgroups), stages[, K chunks a program (1, 2 or 4; default 1)[,
  decode ("prmt" or "lds"; default `gemv_4bit_warp_tma.DECODE`)]]);
  None: `default_config`'s."""
  dtype = _check_weights(
      gemv_4bit_warp_tma.check, x, weights, ns, k, blocksize,
      nested_blocksize, code,
      "variant 'warp_tma' decodes in registers and needs the 16 code values")
  if config is None:
    cfg = gemv_4bit_warp_tma.default_config(tuple(ns), k)
  else:
    _, block_n, bk, rows, num_warps, stages = config[:6]
    kchunks = int(config[6]) if len(config) > 6 else 1
    if (block_n != gemv_4bit_warp_tma.STEP_ROWS
        or bk != gemv_4bit_warp_tma.CHUNK // 2
        or num_warps not in (8, 12)):
      raise ValueError(
          "config: variant 'warp_tma' runs 64 rows a step, "
          f"{gemv_4bit_warp_tma.CHUNK // 2} bytes a row and 8 or 12 "
          f"warps, got block_n {block_n}, {bk} bytes and {num_warps} warps")
    decode = (config[7] if len(config) > 7
              else gemv_4bit_warp_tma.DECODE)
    cfg = dict(rows=rows, stages=stages, wgs=num_warps // 4,
               kchunks=kchunks, decode=decode)
  ys = gemv_4bit_warp_tma.gemv_group(
      x, [(packed, absmax, *nested) for packed, absmax, nested in weights],
      code=code, ns=tuple(ns), k=k, interpret=interpret, **cfg)
  return _with_bias(ys, bias, dtype)


def _gemv(x, weights, lut, *, ns, k, blocksize, nested_blocksize, bias,
          config, code, interpret):
  """The kernel over one or several weights (see `gemv_4bit_group`)."""
  m = x.shape[0]
  dtype = jnp.dtype(x.dtype)
  half = blocksize // 2
  nkb = k // blocksize
  n_all = sum(ns)
  dq_all = all(nest is not None for _, _, nest in weights)
  if config is None and lut_serves(m, ns, k, blocksize, dtype, dq_all,
                                   nested_blocksize, code, interpret):
    return _gemv_lut(x, weights, ns=ns, k=k, blocksize=blocksize,
                     nested_blocksize=nested_blocksize, bias=bias,
                     config=None, code=code, interpret=interpret)
  if config is None and warp_tma_serves(m, ns, k, blocksize, dtype, dq_all,
                                       nested_blocksize, code, interpret):
    return _gemv_warp_tma(x, weights, ns=ns, k=k, blocksize=blocksize,
                          nested_blocksize=nested_blocksize, bias=bias,
                          config=None, code=code, interpret=interpret)
  if config is None:
    config = default_config(m, n_all, k, blocksize, dtype.name,
                            mma=code is not None)
  variant, block_n, block_kb, split_k, num_warps, num_stages = config[:6]
  if variant == "warp_tma":
    return _gemv_warp_tma(x, weights, ns=ns, k=k, blocksize=blocksize,
                          nested_blocksize=nested_blocksize, bias=bias,
                          config=config, code=code, interpret=interpret)
  if variant == "lut":
    return _gemv_lut(x, weights, ns=ns, k=k, blocksize=blocksize,
                     nested_blocksize=nested_blocksize, bias=bias,
                     config=config, code=code, interpret=interpret)
  if variant == "tma":
    return _gemv_tma(x, weights, ns=ns, k=k, blocksize=blocksize,
                     nested_blocksize=nested_blocksize, bias=bias,
                     config=config, code=code, interpret=interpret)
  table = config[6] if len(config) > 6 else "pair"
  prefetch = int(config[7]) if len(config) > 7 else 0
  if table not in ("pair", "nibble", "prmt"):
    raise ValueError(
        f"config: table must be 'pair', 'nibble' or 'prmt', got {table!r}")
  if table == "prmt" and (variant == "dot" or code is None
                          or dtype == jnp.float32):
    raise ValueError(
        "config: table 'prmt' needs variant 'reduce' or 'mma', 16-bit x and "
        "`code`; got "
        f"variant {variant!r}, x {dtype.name}, code "
        f"{'given' if code is not None else 'None'}")
  if variant not in ("reduce", "dot", "mma", "warp"):
    raise ValueError("config: variant must be 'reduce', 'dot', 'mma', "
                     f"'warp', 'tma', 'lut' or 'warp_tma', got {variant!r}")
  if variant == "warp":
    _check_warp(m, k, block_n, num_warps, table)
  if variant == "mma" and dtype == jnp.float32:
    raise ValueError("config: variant 'mma' needs 16-bit x, got float32")
  dqs = {nested is not None for _, _, nested in weights}
  if len(dqs) != 1:
    raise ValueError("weights: all double-quantized or none")
  dq = dqs.pop()
  steps = -(-(-(-nkb // block_kb)) // split_k)
  if variant == "warp":  # steps of 64 bytes a row; block_kb unused
    steps = -(-(k // 2 // warp_mma.BYTES_PER_STEP) // split_k)
  pair = dtype != jnp.float32 and table == "pair" and variant != "mma"
  x3 = x.reshape(m, nkb, half, 2)
  # "mma"/"dot": x's even and odd columns (the high and low nibbles'
  # inputs) as one array [2, ...], padded: one small XLA pass.
  if variant == "reduce":  # x itself, split in the kernel
    xs = x3
    out_rows = m
  elif variant == "warp":  # x's pairs of values, one per weight byte
    p = warp_mma.tile_shape(blocksize)[1]
    xs = jax.lax.bitcast_convert_type(x.reshape(m, k // 2, 2),
                                      jnp.uint32).reshape(m, k // 2 // p, p)
    out_rows = m
  elif variant == "dot":
    m_pad = max(16, _pow2_ceil(m))
    xs = jnp.pad(jnp.moveaxis(x3, -1, 0),
                 ((0, 0), (0, m_pad - m), (0, 0), (0, 0)))
    out_rows = m_pad
  else:  # "mma": [2, m_pad, K / 2], zero-padded to whole steps
    m_pad = max(16, _pow2_ceil(m))
    kpad = (split_k * steps * block_kb - nkb) * half
    xs = jnp.pad(jnp.moveaxis(x3, -1, 0).reshape(2, m, nkb * half),
                 ((0, 0), (0, m_pad - m), (0, kpad)))
    out_rows = m_pad
  args = [xs]
  nested_lens = []
  for (packed, absmax, nested), n in zip(weights, ns):
    if variant == "warp":
      p = warp_mma.tile_shape(blocksize)[1]
      args += [packed.reshape(n, k // 2 // p, p), absmax.reshape(n, nkb)]
    else:
      args += [packed.reshape(n, nkb, half), absmax.reshape(n, nkb)]
    if dq:
      nested_absmax, code2, offset = nested
      nested_lens.append(nested_absmax.shape[0])
      args += [nested_absmax.astype(jnp.float32), code2.astype(jnp.float32),
               jnp.asarray(offset, jnp.float32).reshape(1)]
    else:
      nested_lens.append(0)
  if variant == "mma" or table == "prmt":  # codes in the compute dtype
    args.append(_backend.round_to_dtype(lut.astype(jnp.float32), dtype))
  elif pair:
    args.append(pair_table(lut))
  elif dtype == jnp.float32:
    args.append(lut.astype(jnp.float32))
  else:  # the codes rounded to bfloat16, as in the pair table
    args.append(_backend.round_to_dtype(lut.astype(jnp.float32),
                                        jnp.bfloat16))
  if table == "prmt" and variant in _WORDS_INPUT:  # the permutes' operands
    words = np.asarray(lut_decode.table_words(code, dtype),
                       np.uint32).view(np.int32)
    if variant == "warp":  # words 0, 2, 4, 6, once a tile block
      words = np.repeat(words[[0, 2, 4, 6]][:, None],
                        warp_mma.tile_shape(blocksize)[0], 1)
    args.append(jnp.asarray(words))
  has_bias = bias is not None and split_k == 1
  if has_bias:
    args.append(bias)
  args = _backend.same_vma(*args)
  shape = (out_rows, n_all)  # "mma" and "dot" store their tiles transposed
  if split_k == 1:
    out_shape = _backend.out_struct(shape, dtype, *args)
  else:
    out_shape = _backend.out_struct((split_k,) + shape, jnp.float32, *args)
  kernel = functools.partial(
      _kernel, m=m, ns=ns, nkb=nkb, block_kb=block_kb, half=half,
      block_n=block_n, steps=steps, dq=dq, nested_blocksize=nested_blocksize,
      nested_lens=tuple(nested_lens), variant=variant, has_bias=has_bias,
      split_k=split_k, compute_dtype=dtype, pair=pair, prefetch=prefetch,
      code=code if table == "prmt" else None, interpret=interpret)
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(sum(-(-n // block_n) for n in ns), split_k),
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=num_stages),
      interpret=interpret,
      name=f"jaxbnb_gemv_4bit_{variant}",
      cost_estimate=pl.CostEstimate(
          flops=2 * m * n_all * k, transcendentals=0,
          bytes_accessed=n_all * k // 2 + n_all * nkb * (1 if dq else 4)
          + m * k * dtype.itemsize + m * n_all * dtype.itemsize),
  )(*args)
  # The padding lanes are sliced off first: the split-K sum reads only the
  # `m` rows the kernel wrote.
  if split_k > 1:
    out = sum_splits(out[:, :m])
  else:
    out = out[:m]
  if split_k > 1 and bias is not None:
    out = out + bias.astype(jnp.float32)
  out = out.astype(dtype)
  if len(ns) == 1:
    return (out,)
  starts = np.cumsum((0,) + tuple(ns))
  return tuple(out[:, a:b] for a, b in zip(starts[:-1], starts[1:]))
