"""The 4-bit decode from a table in shared memory, filled once a program.

A packed bnb byte `b` holds two codes: `b >> 4` (the even element) and
`b & 15`. The table holds, for each of the 256 byte values, the fp32 pair
`(code[b >> 4], code[b & 15])`: 8 bytes an entry. A warp's 32 lanes look
up 32 unrelated bytes at once; with one copy of the table they would
collide on shared-memory banks. So each entry is stored 16 times in a
128-byte row, copy `c` at byte `8 c`, and lane `l` reads copy `l % 16`:
a 64-bit load is served a half-warp at a time, and the 16 lanes of a half
hit 16 distinct bank pairs whatever their bytes (256 rows, 32 KiB).

A byte then costs a permute (the byte out of its word), a multiply-add
(its row's address) and one 64-bit shared load, which yields both values
in fp32: no widening and no packed multiply. The GEMV multiplies them by
`x` in fp32 and scales each block's sum by its fp32 absmax once.

The table is a function-scope `.shared` array declared by one inline-PTX
block (`ptxas` gives it 32 KiB of static shared memory, beside Triton's
own dynamic allocation). Filling it costs each program 32 KiB of stores
and a barrier, so it pays only in programs that stream many steps of
weights (the GEMV's persistent grid), not in thousands of short ones: the
seventh session measured that (docs/benchmarks.md, "GEMV: a shared-memory
table for the decode").

`interpret=True` (the CPU tests) reads the same values from the table
array with a gather: the twin checks the kernel's indexing and math; the
PTX itself is checked by `pytest -m gpu`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._backend import fma_rn
from pallas_kernels._backend import pltriton
from pallas_kernels._backend import round_to_dtype

__all__ = ["COPIES", "ROW_BYTES", "fill", "lane_base", "pair_values",
           "products"]

COPIES = 16             # copies of each entry (a half-warp's lanes)
ROW_BYTES = 8 * COPIES  # one entry's row: 16 fp32 pairs
_TABLE_BYTES = 256 * ROW_BYTES

_DECLARE = f"""{{
.shared .align 16 .b8 jaxbnb_lut[{_TABLE_BYTES}];
mov.u32 $0, jaxbnb_lut;
}}"""

_STORE = "\n".join(
    ["{", ".reg .b32 p;", f"mad.lo.u32 p, $1, {ROW_BYTES}, $4;"]
    + [f"st.shared.v4.f32 [p+{16 * i}], {{$2, $3, $2, $3}};"
       for i in range(ROW_BYTES // 16)]
    + ["mov.b32 $0, $1;", "}"])

_BARRIER = "bar.sync 0;\nmov.b32 $0, $1;"

_LANE = f"""{{
.reg .b32 l;
mov.u32 l, %laneid;
and.b32 l, l, {COPIES - 1};
mad.lo.u32 $0, l, 8, $1;
}}"""

# pack=4: $0-$3 out, $4 the four bytes (byte j = element j), $5-$8 the
# x values of the high nibbles, $9-$12 of the low ones, $13-$16 the lane's
# copy address. Outputs are written after every input is read.
_LOOKUP = "\n".join(
    ["{", ".reg .b32 a0, a1, a2, a3;", ".reg .f32 h0, h1, h2, h3, l0, l1, l2, l3;"]
    + [f"prmt.b32 a{j}, $4, 0, 0x444{j};" for j in range(4)]
    + [f"mad.lo.u32 a{j}, a{j}, {ROW_BYTES}, $13;" for j in range(4)]
    + [f"ld.shared.v2.f32 {{h{j}, l{j}}}, [a{j}];" for j in range(4)]
    + [f"mul.rn.f32 h{j}, h{j}, ${5 + j};" for j in range(4)]
    + [f"fma.rn.f32 h{j}, l{j}, ${9 + j}, h{j};" for j in range(4)]
    + [f"mov.b32 ${j}, h{j};" for j in range(4)]
    + ["}"])


def pair_values(lut: jax.Array, dtype) -> jax.Array:
  """float32 `[2, 256]`: row 0 `code[b >> 4]`, row 1 `code[b & 15]`.

  The codes are rounded to bfloat16 for 16-bit `dtype` (the values of
  `gemv_4bit.pair_table`), exact for float32.
  """
  code = lut.astype(jnp.float32)
  if jnp.dtype(dtype) != jnp.float32:
    code = round_to_dtype(code, jnp.bfloat16)
  b = jnp.arange(256, dtype=jnp.int32)
  return jnp.stack([code[b >> 4], code[b & 15]])


def fill(table_ref, interpret: bool) -> jax.Array:
  """Declares and fills the shared table from `pair_values` in
  `table_ref` (`[2, 256]`); every thread of the program must call it once,
  before any `lookup`. Returns the table's shared address (int32 scalar;
  0 in interpret mode)."""
  if interpret:
    return jnp.int32(0)
  (base,) = pltriton.elementwise_inline_asm(
      _DECLARE, args=[jnp.zeros((1,), jnp.int32)], constraints="=r,r",
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])
  hi, lo = table_ref[0], table_ref[1]
  entry = jnp.arange(256, dtype=jnp.int32)
  (stored,) = pltriton.elementwise_inline_asm(
      _STORE, args=[entry, hi, lo, jnp.broadcast_to(base, (256,))],
      constraints="=r,r,f,f,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct((256,), jnp.int32)])
  # The barrier reads every store's result, so it follows them all.
  done = jnp.min(stored).reshape(1)
  (base,) = pltriton.elementwise_inline_asm(
      _BARRIER, args=[base, done], constraints="=r,r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])
  return jnp.max(base)


def lane_base(base: jax.Array, shape: tuple[int, ...],
              interpret: bool) -> jax.Array | None:
  """int32 `shape`: each lane's copy of row 0 (`base + 8 (lane % 16)`),
  the `lookup` operand. None in interpret mode."""
  if interpret:
    return None
  (lb,) = pltriton.elementwise_inline_asm(
      _LANE, args=[jnp.broadcast_to(base, shape)], constraints="=r,r",
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])
  return lb


def products(w: jax.Array, xe: jax.Array, xo: jax.Array,
             lb: jax.Array | None, interpret: bool,
             table: jax.Array | None = None) -> jax.Array:
  """`code[w >> 4] * xe + code[w & 15] * xo` per byte, float32.

  (One result: the decoded values never leave the inline PTX, since
  Pallas lowers an inline-asm block with a single result.)

  Args:
    w: uint8 bytes (a Triton tile; its elements per thread come in 4s).
    xe, xo: float32, `w`'s shape: the inputs of the high and low nibbles.
    lb: `lane_base` of `w`'s shape (compiled).
    interpret: gather from `table` instead of the shared table.
    table: `pair_values` (`[2, 256]` float32), for interpret mode.

  Returns:
    float32, `w`'s shape: the high nibble's product rounded, then the low
    nibble's added in one fused multiply-add.
  """
  if interpret:
    wi = w.astype(jnp.int32)
    return fma_rn(table[1][wi], xo, table[0][wi] * xe, True)
  (out,) = pltriton.elementwise_inline_asm(
      _LOOKUP, args=[w, xe, xo, lb],
      constraints="=f,=f,=f,=f,r" + ",f" * 8 + ",r" * 4, pack=4,
      result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.float32)])
  return out
