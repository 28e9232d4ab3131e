"""4-bit weights through a warp's tensor-core product, straight from registers.

For the GEMV at M = 1..8: each thread decodes its own bytes with byte
permutes (`lut_decode`) and hands the values to `mma.sync.m16n8k16` as the
A operand, in registers, where the "reduce" variant widens every value
to fp32 and multiplies it by x with two FMAs a byte, and the "mma"
variant goes through shared memory to meet `tl.dot`'s operand layout.

Why a tile's elements can feed the MMA as they lie: with the byte tile
`[rows, nb, p]` (`nb * p` = 64 bytes of a row per step), Triton gives
each thread 16 consecutive bytes of one row, four threads a row, eight
rows a warp (lane = 4 * (row % 8) + byte // 16: seen in the TTGIR of every tile
shape used, and relied on by the GPU tests). The MMA's row g is lanes 4g..4g+3 and its K slots 2c..
2c+1, 2c+8..2c+9 belong to lane 4g + c. So one inline-asm call (`pack=4`:
one word of four bytes per thread) puts word `i` of each thread's run of
a row into the MMA as row g (tile "a") and the same word of row `R + r`
as row g + 8 (tile "b"); the four threads of a row supply the K slots,
and every row's slots hold the same K positions (lanes with equal `c`
hold the same bytes of their rows). x is the B operand: column n gets
`x[n % M]` from the lanes of row 8j + n, so D[g][n] is `y[row, n % M]`
summed over the four threads' words (columns n >= M repeat the first
ones and are never read back).

The four accumulators a thread gets back (D[g][2c], D[g][2c+1],
D[g+8][2c], D[g+8][2c+1]) are stored in the four elements of the call's
pack: the tile-shaped fp32 accumulator's element at byte position q of
row r holds `y[r (j < 2) or R + r (j >= 2), 2 * (q // 16) + j % 2]`
with j = q % 4, partial over the words `(q // 4) % 4` of the 4 threads.
`row_sums` reads `y` back from it.

`product` is the kernel-facing entry; `interpret=True` runs a jnp twin
that emulates the warp (same values, fp32 sums in another order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._backend import pltriton
from pallas_kernels import lut_decode

__all__ = ["BYTES_PER_STEP", "product", "ptx", "row_sums", "tile_shape"]

# Bytes of a row per step: 4 threads x 16 bytes (one 128-bit load each).
BYTES_PER_STEP = 64
_MMA_TYPES = {"bfloat16": "bf16", "float16": "f16"}


def tile_shape(blocksize: int) -> tuple[int, int]:
  """(nb, p): a step's 64 bytes of a row as `nb` quantization blocks (or
  parts of one) of `p` bytes."""
  half = blocksize // 2
  p = min(half, BYTES_PER_STEP)
  return BYTES_PER_STEP // p, p


@functools.lru_cache(maxsize=None)
def ptx(code: tuple[float, ...], dtype_name: str) -> str:
  """The inline PTX, `pack=4`: $0-$3 out (the four fp32 accumulators),
  $4 = word of tile a, $5 = word of tile b, $6 and $10 their scale words
  (of four registers each, the rest unread), $14-$17 the four x pairs,
  $18-$21 the accumulators in, then the eight table words at $(22 + 4i).
  Two decodes, then two MMAs (bytes 0-1, then 2-3 of the words)."""
  table = {f"t{i}": f"${22 + 4 * i}" for i in range(8)}
  decls, lines = [], []
  for tile, w, s in (("a", "$4", "$6"), ("b", "$5", "$10")):
    names = dict(table, w=w, **{f"s{j}": s for j in range(4)},
                 **{f"o{j}": f"{tile}{j}" for j in range(4)})
    decl, body = lut_decode.render(code, dtype_name, names, prefix=tile + "_")
    decls += [decl, f".reg .b32 {tile}0, {tile}1, {tile}2, {tile}3;"]
    lines += body
  t = _MMA_TYPES[dtype_name]
  mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32"
  lines += [
      f"{mma} {{d0, d1, d2, d3}}, {{a0, b0, a1, b1}}, {{$14, $15}}, "
      "{$18, $19, $20, $21};",
      f"{mma} {{e0, e1, e2, e3}}, {{a2, b2, a3, b3}}, {{$16, $17}}, "
      "{d0, d1, d2, d3};",
  ]
  lines += [f"mov.f32 ${i}, e{i};" for i in range(4)]
  return "\n".join(["{"] + decls + [".reg .f32 d0, d1, d2, d3, e0, e1, e2, e3;"]
                   + lines + ["}"])


def product(wa, wb, sa, sb, xp, acc, code, dtype, interpret, table=None,
            words=None):
  """`acc` plus one step's products (see the module docstring).

  Args:
    wa, wb: uint8 `[R, nb, p]` bytes of rows r and R + r.
    sa, sb: uint32 scale words (`lut_decode.scale_words`), broadcastable to
      the tile.
    xp: uint32 `[R, nb, p]`: x's pair of values for each byte (the pair of
      the byte's two weights) of row `(r % 8) % M` of x.
    acc: float32 `[R, nb, p]`, the accumulators.
    code: the 16 code values (static).
    dtype: bfloat16 or float16.
    interpret: the jnp twin instead of the inline asm.
    table: for the twin, float32 `[16]`: `code` rounded to `dtype`.
    words: optional int32 tiles, `table_words` 0, 2, 4, 6 loaded at run
      time (as in `lut_decode.decode_scaled`).

  Returns:
    The new accumulators.
  """
  dtype = jnp.dtype(dtype)
  sa = jnp.broadcast_to(sa, wa.shape)
  sb = jnp.broadcast_to(sb, wa.shape)
  if interpret:
    return acc + _twin(wa, wb, sa, sb, xp, code, dtype, table)
  code = tuple(float(c) for c in code)
  as_i32 = lambda v: jax.lax.bitcast_convert_type(v, jnp.int32)  # noqa: E731
  tw = [jnp.full(wa.shape, np.uint32(v).view(np.int32), jnp.int32)
        for v in lut_decode.table_words(code, dtype)]
  if words is not None:
    for j, v in zip((0, 2, 4, 6), words):
      tw[j] = v
  (out,) = pltriton.elementwise_inline_asm(
      ptx(code, dtype.name),
      args=[wa, wb, as_i32(sa), as_i32(sb), as_i32(xp), acc] + tw,
      constraints="=f,=f,=f,=f,r,r" + ",r" * 8 + ",r" * 4 + ",f" * 4
      + ",r" * 32,
      pack=4,
      result_shape_dtypes=[jax.ShapeDtypeStruct(wa.shape, jnp.float32)],
  )
  return out


def _twin(wa, wb, sa, sb, xp, code, dtype, table):
  """The warp's products, emulated: `[R, nb, p]` increments."""
  shape = wa.shape
  rows = shape[0]
  def vals(w, s):
    hi, lo = lut_decode.decode_scaled(w, s, code, dtype, True, table)
    return hi.astype(jnp.float32), lo.astype(jnp.float32)
  # (group of 8 rows, row in group g, thread c, word i, byte j)
  split = lambda v: v.reshape(rows // 8, 8, 4, 4, 4)  # noqa: E731
  ha, la = (split(v) for v in vals(wa, sa))
  hb, lb = (split(v) for v in vals(wb, sb))
  # x's low half pairs with the high nibble (the even weight).
  xe, xo = (split(v.astype(jnp.float32))
            for v in lut_decode.split_pairs(xp, dtype))
  def dots(h, l):  # D[G, g, i, n]: row g times column n (x of row n)
    return (jnp.einsum("Ggcij,Gncij->Ggin", h, xe,
                       precision=jax.lax.Precision.HIGHEST)
            + jnp.einsum("Ggcij,Gncij->Ggin", l, xo,
                         precision=jax.lax.Precision.HIGHEST))
  da, db = dots(ha, la), dots(hb, lb)
  # thread c gets columns 2c, 2c + 1: [G, g, i, c] -> [G, g, c, i]
  parts = [jnp.swapaxes(d[..., j::2], 2, 3) for d in (da, db) for j in (0, 1)]
  return jnp.stack(parts, axis=-1).reshape(shape)


def row_sums(acc, m):
  """`y` from the accumulators: `[m, R]` for rows r and `[m, R]` for R + r.

  Each y element is the sum of the tile positions that hold it (masked
  sums: no reshape, so the tile keeps its layout)."""
  _, nb, p = acc.shape
  q = (jnp.arange(nb, dtype=jnp.int32)[:, None] * p
       + jnp.arange(p, dtype=jnp.int32)[None, :])
  ya, yb = [], []
  for n in range(m):
    for out, j in ((ya, n % 2), (yb, 2 + n % 2)):
      sel = ((q // 16) == n // 2) & ((q % 4) == j)
      out.append(jnp.sum(jnp.sum(jnp.where(sel[None], acc, 0.0), axis=2),
                         axis=1))
  return ya, yb
