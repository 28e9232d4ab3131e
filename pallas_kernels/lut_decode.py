"""4-bit codes to 16-bit values in registers: byte permutes, no memory gather.

The GEMV's decode used to gather each byte's values from a table in memory
(a dependent load per byte). Here the 16-entry code table, rounded to the
compute dtype (bfloat16 or float16), lives in eight 32-bit immediates: the
low bytes of the 16 values in four registers, the high bytes in four more.
`prmt.b32` picks any 4 bytes out of two registers by 3-bit selectors, so a
packed word of four bnb bytes (eight nibbles) decodes with 12 permutes for
the two byte tables (8 entries per permute, a third permute picks by the
nibble's top bit), 4 permutes to pair low and high bytes into 16-bit
values, and one packed multiply per two values by the block's absmax (in
the compute dtype, as bitsandbytes' own GEMV multiplies `quant_map[code] *
absmax` in that dtype): about 3 instructions per weight.

The instruction list `_program` is written once; `ptx` renders it for
`pltriton.elementwise_inline_asm` and `emulate` runs it on numpy words, so
the CPU tests check the very instructions the GPU runs. `decode_scaled` is
the kernel-facing entry: inline asm when compiled, a jnp twin (the same
values: table lookup in the compute dtype, product rounded once) in
interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._backend import pltriton
from pallas_kernels._backend import round_to_dtype

__all__ = ["decode_scaled", "decode_scaled_f32", "emulate", "ptx", "render",
           "scale_words", "split_pairs", "table_words"]

_DTYPES = {"bfloat16": "bf16x2", "float16": "f16x2"}


def table_words(code: tuple[float, ...], dtype) -> tuple[int, ...]:
  """The 16 codes in `dtype` as 8 words: low bytes of codes 0-3, 4-7, 8-11,
  12-15, then the high bytes likewise (byte i of a word = code 4w + i)."""
  bits = np.asarray(code, np.float32).astype(jnp.dtype(dtype)).view(
      np.uint16).astype(np.uint32)
  lo, hi = bits & 0xFF, bits >> 8
  words = []
  for part in (lo, hi):
    for w in range(4):
      q = part[4 * w:4 * w + 4]
      words.append(int(q[0] | q[1] << 8 | q[2] << 16 | q[3] << 24))
  return tuple(words)


def _program(words):
  """(op, dst, srcs) over named registers. In: `w` (4 bnb bytes; byte j
  is element j of the packed group), `s0`-`s3` (element j's scale in both
  16-bit halves). Out: `o0`-`o3`, element j's pair of values times its
  scale: the high nibble's in the low half, the low nibble's in the high
  half (memory order of the two weights)."""
  ops = []
  for i, v in enumerate(words):
    ops.append(("mov", f"t{i}", (v,)))
  ops += [
      ("and", "m", ("w", 0x77777777)),     # 3-bit selectors, nibble-wise
      ("and", "q", ("w", 0x88888888)),     # each nibble's top bit ...
      ("shr", "q", ("q", 1)),              # ... as 4: pick from the 2nd word
      ("or", "q", ("q", 0x32103210)),
      ("shr", "m1", ("m", 16)),
      ("shr", "q1", ("q", 16)),
  ]
  for half, (sel, pick) in enumerate((("m", "q"), ("m1", "q1"))):
    for part, base in (("l", 0), ("h", 4)):   # low bytes, high bytes
      ops += [
          ("prmt", "a", (f"t{base}", f"t{base + 1}", sel)),
          ("prmt", "b", (f"t{base + 2}", f"t{base + 3}", sel)),
          ("prmt", f"{part}{half}", ("a", "b", pick)),
      ]
  # l0 = low bytes of the values of nibbles (lo0, hi0, lo1, hi1), h0 their
  # high bytes (byte j's high nibble is the word's nibble 2j + 1).
  ops += [
      ("prmt", "p0", ("l0", "h0", 0x4051)),  # (hi0, lo0) of byte 0
      ("prmt", "p1", ("l0", "h0", 0x6273)),  # (hi1, lo1) of byte 1
      ("prmt", "p2", ("l1", "h1", 0x4051)),
      ("prmt", "p3", ("l1", "h1", 0x6273)),
  ]
  ops += [("mul", f"o{j}", (f"p{j}", f"s{j}")) for j in range(4)]
  return ops


def render(code, dtype_name, names, prefix=""):
  """`_program`'s decode as PTX lines (the table `mov`s left out: its
  words come in as operands). `names` maps `w`, `s0`-`s3`, `t0`-`t7` and
  the outputs `o0`-`o3` to registers or operands; the temporaries are
  declared here, named with `prefix` (so two decodes share one block).

  Returns:
    `(declaration, lines)`.
  """
  vec = _DTYPES[dtype_name]
  ops = [op for op in _program(table_words(code, jnp.dtype(dtype_name)))
         if op[0] != "mov"]
  temps = sorted({d for _, d, _ in ops} - set(names)) + ["z"]
  names = dict(names, **{t: prefix + t for t in temps})
  def r(v):
    return names[v] if isinstance(v, str) else f"0x{v:08x}"
  lines = [f"mov.b32 {r('z')}, 0x80008000;"]  # -0 in both halves
  for op, d, s in ops:
    if op in ("and", "or"):
      lines.append(f"{op}.b32 {r(d)}, {r(s[0])}, {r(s[1])};")
    elif op == "shr":
      lines.append(f"shr.u32 {r(d)}, {r(s[0])}, {s[1]};")
    elif op == "prmt":
      lines.append(f"prmt.b32 {r(d)}, {r(s[0])}, {r(s[1])}, {r(s[2])};")
    elif op == "mul":  # x * s + (-0): one rounding, the sign of zero kept
      lines.append(f"fma.rn.{vec} {r(d)}, {r(s[0])}, {r(s[1])}, {r('z')};")
  decl = f".reg .b32 {', '.join(prefix + t for t in temps)};"
  return decl, lines


@functools.lru_cache(maxsize=None)
def ptx(code: tuple[float, ...], dtype_name: str) -> str:
  """The inline PTX: operands $0-$3 out (o0-o3), $4 = w, $5-$8 = s0-s3,
  then the eight table words (registers the compiler loads once, where
  `mov`s into place would run at every call). With `pack=4` a 32-bit
  operand takes four registers (one per element), so word i is $(9 + 4i)
  and its three twins go unread."""
  names = {"w": "$4", "s0": "$5", "s1": "$6", "s2": "$7", "s3": "$8"}
  names.update({f"t{i}": f"${9 + 4 * i}" for i in range(8)})
  # Outputs are written only after every input is read (no early clobber).
  names.update({f"o{i}": f"r{i}" for i in range(4)})
  decl, lines = render(code, dtype_name, names)
  out = ["{", decl, ".reg .b32 r0, r1, r2, r3;"] + lines
  out += ["mov.b32 $%d, r%d;" % (i, i) for i in range(4)]
  out.append("}")
  return "\n".join(out)


def _prmt(a, b, c):
  """PTX `prmt.b32` default mode, vectorized over uint32 numpy arrays."""
  src = (b.astype(np.uint64) << 32) | a.astype(np.uint64)
  out = np.zeros_like(a, np.uint32)
  for k in range(4):
    sel = (c >> (4 * k)) & 0xF
    byte = ((src >> (8 * (sel & 7)).astype(np.uint64)) & 0xFF).astype(
        np.uint32)
    sign = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
    out |= np.where(sel & 8, sign, byte) << (8 * k)
  return out


def _mul_pairs(a, b, dtype):
  """Two packed 16-bit values times two, rounded once (the fma above)."""
  def unpack(v):
    lo = (v & 0xFFFF).astype(np.uint16).view(dtype).astype(np.float32)
    hi = (v >> 16).astype(np.uint16).view(dtype).astype(np.float32)
    return lo, hi
  (alo, ahi), (blo, bhi) = unpack(a), unpack(b)
  lo = (alo * blo).astype(dtype).view(np.uint16)
  hi = (ahi * bhi).astype(dtype).view(np.uint16)
  return lo.astype(np.uint32) | (hi.astype(np.uint32) << 16)


def emulate(code, dtype, w, scales):
  """Runs `_program` on uint32 numpy words `w` and the four scale words
  (`scales[j]`: element j's scale in both halves); returns (o0, .., o3)."""
  dtype = jnp.dtype(dtype)
  env = {"w": np.asarray(w, np.uint32)}
  for j in range(4):
    env[f"s{j}"] = np.asarray(scales[j], np.uint32)
  val = lambda v: env[v] if isinstance(v, str) else np.uint32(v)  # noqa: E731
  for op, d, s in _program(table_words(code, dtype)):
    if op == "mov":
      env[d] = np.broadcast_to(np.uint32(s[0]), env["w"].shape)
    elif op == "and":
      env[d] = val(s[0]) & val(s[1])
    elif op == "or":
      env[d] = val(s[0]) | val(s[1])
    elif op == "shr":
      env[d] = val(s[0]) >> np.uint32(s[1])
    elif op == "prmt":
      env[d] = _prmt(val(s[0]), val(s[1]), val(s[2]))
    elif op == "mul":
      env[d] = _mul_pairs(val(s[0]), val(s[1]), dtype)
  return tuple(env[f"o{i}"] for i in range(4))


def scale_words(scale, dtype):
  """uint32: `scale` rounded to `dtype`, its 16 bits in both halves."""
  bits = jax.lax.bitcast_convert_type(scale.astype(dtype), jnp.uint16)
  bits = bits.astype(jnp.uint32)
  return bits | (bits << 16)


def split_pairs(u, dtype):
  """uint32 pairs -> (low-half values, high-half values) in `dtype`."""
  lo = jax.lax.bitcast_convert_type(u.astype(jnp.uint16), dtype)
  hi = jax.lax.bitcast_convert_type((u >> 16).astype(jnp.uint16), dtype)
  return lo, hi


def decode_scaled(w, scale, code, dtype, interpret, table=None, words=None):
  """Values of the high and low nibbles of uint8 `w`, times `scale`.

  Args:
    w: uint8 bytes (a Triton tile; its elements per thread come in 4s).
    scale: uint32, same shape: each byte's absmax in `dtype`, in both
      16-bit halves (`scale_words`; built once per block, broadcast).
    code: the 16 code values (static).
    dtype: bfloat16 or float16, the values' dtype.
    interpret: the jnp twin instead of the inline asm.
    table: for the twin, float32 `[16]` holding `code` rounded to `dtype`
      (inside a kernel: the loaded table input, since kernels cannot
      capture constants); by default built from `code`.
    words: optional int32 scalars, `table_words` 0, 2, 4 and 6 loaded at
      run time (the permutes' register operands). Given as constants,
      the compiler re-creates them before every permute under register
      pressure.

  Returns:
    `(hi, lo)` in `dtype`: `code[w >> 4] * s` and `code[w & 15] * s`, the
    code rounded to `dtype` and the product rounded once.
  """
  dtype = jnp.dtype(dtype)
  if interpret:
    if table is None:
      table = jnp.asarray(np.asarray(code, np.float32).astype(dtype).astype(
          np.float32))
    wi = w.astype(jnp.int32)
    s = split_pairs(scale, dtype)[0].astype(jnp.float32)
    return (round_to_dtype(table[wi >> 4] * s, dtype).astype(dtype),
            round_to_dtype(table[wi & 15] * s, dtype).astype(dtype))
  return split_pairs(_pairs(w, scale, code, dtype, words), dtype)


def _pairs(w, scale, code, dtype, words=None):
  """The inline asm: uint32 pairs (high nibble's value in the low half)."""
  # Triton's integers are signless: int32 out (and in), the bits the same.
  code = tuple(float(c) for c in code)
  args = [w, jax.lax.bitcast_convert_type(scale, jnp.int32)]
  args += [jnp.full(w.shape, np.uint32(v).view(np.int32), jnp.int32)
           for v in table_words(code, dtype)]
  if words is not None:  # the permutes' first operands, from memory
    for j, v in zip((0, 2, 4, 6), words):
      args[2 + j] = jnp.full(w.shape, v, jnp.int32)
  (pairs,) = pltriton.elementwise_inline_asm(
      ptx(code, dtype.name),
      args=args,
      constraints="=r,=r,=r,=r,r,r,r,r,r" + ",r" * 32,
      pack=4,
      result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.int32)],
  )
  return jax.lax.bitcast_convert_type(pairs, jnp.uint32)


def decode_scaled_f32(w, scale, code, dtype, interpret, table=None,
                      words=None):
  """`decode_scaled`'s values widened to float32 (exactly).

  For bfloat16 the widening is one bit operation per value on the packed
  pair (a bf16 value is the top half of its float32), so a GEMV that
  multiplies and accumulates in float32 pays no conversion instructions.

  Returns:
    `(hi, lo)` float32, the values of `decode_scaled`.
  """
  dtype = jnp.dtype(dtype)
  if interpret or dtype != jnp.bfloat16:
    hi, lo = decode_scaled(w, scale, code, dtype, interpret, table, words)
    return hi.astype(jnp.float32), lo.astype(jnp.float32)
  u = _pairs(w, scale, code, dtype, words)
  return (jax.lax.bitcast_convert_type(u << np.uint32(16), jnp.float32),
          jax.lax.bitcast_convert_type(u & np.uint32(0xFFFF0000),
                                       jnp.float32))
