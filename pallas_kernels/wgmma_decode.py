"""The PTX of the wgmma GEMM's decode (`gemm_4bit_wgmma`), one lane's text.

`decode_ptx` turns a step's packed bytes `[tile_w, tile_k / 2]` in shared
memory into wgmma's A registers (Mosaic GPU's `WGMMA_LAYOUT`), each value
the code times its block's absmax in bf16, rounded once; the absmax comes
as bf16 scale words in shared memory, or from the double-quantized
statistics in global memory (`nested`), or in registers made a step ahead
by `scales_ptx` (`scales`). `table_operands` is the table input of
`load_table`. The tests run this text through a small PTX emulator on the
CPU (tests/kernels/gemm_4bit_wgmma_test.py).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from pallas_kernels import lut_decode

__all__ = ["decode_ptx", "scale_slots", "scales_ptx", "table_operands"]


def scale_slots(tile_w: int, tile_k: int) -> tuple[int, int]:
  """(words a row group, 64-bit words in all) of the scale words a lane
  carries a step ahead (`scales_ptx`): rows g and g + 8 of each row group,
  `tile_k / 64` blocks each, at least 4 words a group (wgmma's f32 layout
  of `[tile_w, 8]` holds 4 a lane); word `(i, h, q)` is `i P + h kb + q`."""
  groups, kb = tile_w // 64, tile_k // 64
  per = max(2 * kb, 4)
  return per, groups * per // 2


def _scale_lines(groups, blocks, nested, ptrs, dst):
  """PTX: each of this lane's rows' scale words of the step from the
  double-quantized statistics (`decode_ptx`'s `nested`), into `dst(i, h,
  qi)`. Needs `wp` and `g` set, and the registers and the offset of
  `_scale_regs`."""
  nkb, nbs = nested
  c_step, c_base, n_ptr, c2_ptr = ptrs
  width = {4: "u32", 2: "u16", 1: "u8"}[len(blocks)]
  lines = []
  for i in range(groups):
    for h in range(2):
      lines += ["mad.lo.u32 r, wp, 16, g;",
                f"add.u32 r, r, {64 * i + 8 * h};",
                f"mul.wide.u32 ta, r, {nkb};", f"add.u64 ca, {c_step}, ta;",
                f"ld.global.nc.{width} cw, [ca+{blocks[0]}];",
                f"sub.u64 ta, ca, {c_base};", "cvt.u32.u64 fl, ta;",
                f"shr.u32 fl, fl, {nbs.bit_length() - 1};",
                "mul.wide.u32 ta, fl, 4;", f"add.u64 ta, ta, {n_ptr};",
                "ld.global.nc.f32 nv, [ta];"]
      for qi in range(len(blocks)):
        lines += [f"prmt.b32 cq, cw, 0, {0x4440 + qi};",
                  "mul.wide.u32 ta, cq, 4;", f"add.u64 ta, ta, {c2_ptr};",
                  "ld.global.nc.f32 av, [ta];", "mul.rn.f32 av, av, nv;",
                  "add.rn.f32 av, av, off;",
                  f"cvt.rn.bf16x2.f32 {dst(i, h, qi)}, av, av;"]
  return lines


def _scale_regs(off_ptr):
  """The registers `_scale_lines` uses, and the offset loaded."""
  return [".reg .b32 cw, cq, fl;", ".reg .b64 ca, ta;",
          ".reg .f32 nv, av, off;", f"ld.global.nc.f32 off, [{off_ptr}];"]


def _check_nested(nested, kb):
  nbs = nested[1]
  if nbs & (nbs - 1) or nbs % kb:
    raise ValueError(f"nested: the nested blocksize must be a power of two "
                     f"and a multiple of {kb}, got {nbs}")


@functools.lru_cache(maxsize=None)
def scales_ptx(tile_w: int, tile_k: int, nested: tuple[int, int]) -> str:
  """One step's scale words of one lane from the double-quantized
  statistics, for the next step's decode (`decode_ptx`'s `scales`).

  Operands: `$0 .. $(W-1)` out, 64-bit, two words each (`scale_slots`;
  the first in the low half); then the global addresses of the statistics
  as `decode_ptx`'s `nested` takes them (the tile's first row's codes of
  the step, code 0, `nested_absmax`, the nested code values, the offset).
  """
  groups, kb = tile_w // 64, tile_k // 64
  _check_nested(nested, kb)
  per, wide = scale_slots(tile_w, tile_k)
  lines = ["{", ".reg .b32 tid, lane, wp, g, r;",
           f".reg .b32 sc<{2 * wide}>;", *_scale_regs(f"${wide + 4}"),
           "mov.u32 tid, %tid.x;", "and.b32 lane, tid, 31;",
           "shr.u32 wp, tid, 5;", "and.b32 wp, wp, 3;", "shr.u32 g, lane, 2;"]
  lines += [f"mov.b32 sc{j}, 0;" for j in range(2 * wide)]  # the padding
  lines += _scale_lines(groups, range(kb), nested,
                        [f"${wide + i}" for i in range(4)],
                        lambda i, h, qi: f"sc{i * per + h * kb + qi}")
  lines += [f"mov.b64 ${j}, {{sc{2 * j}, sc{2 * j + 1}}};"
            for j in range(wide)]
  lines.append("}")
  return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def decode_ptx(code: tuple[float, ...], tile_w: int, tile_k: int,
               s_stride: int | None = None, swizzle: bool = False,
               load_table: bool = False, part: int | None = None,
               nested: tuple[int, int] | None = None,
               scales: bool = False) -> str:
  """One step of one lane: the A registers of a `[tile_w, tile_k]` tile
  (with `part`, of its 64 columns `64 part ..`).

  Operands: `$0 .. $(R-1)` out, R = `tile_w / 64 * cols / 8 * 2` (cols:
  tile_k, or 64 with `part`), in `WGMMA_LAYOUT`'s register order (row
  group i, column group j, half h: `$((i * cols / 8 + j) * 2 + h)`); `$R`
  the shared address of the bytes
  `[tile_w, tile_k / 2]`, `$(R+1)` of the scale words `[tile_k / 64,
  tile_w]` (the absmax in bf16, in both halves; `s_stride` words apart,
  by default tile_w); with `load_table`, `$(R+2)` the global address of
  `table_operands(code)`.

  nested: `(blocks a row, nested blocksize)`: the absmax is decoded here
    from the double-quantized statistics in global memory, as
    bitsandbytes does (`nested_code[c] * nested_absmax[i // nested
    blocksize]`, then `+ offset`, each rounded), then rounded to bf16.
    The operands after `$R` are then the global addresses of the tile's
    first row's codes of this step (`$(R+1)`), of code 0 (`$(R+2)`, so
    the block's index is the difference), of `nested_absmax`, of the 256
    nested code values and of the offset; the table words (with
    `load_table`) last, `$(R+6)`. The nested blocksize is a power of two
    and a multiple of `tile_k / 64`, so a step's blocks of a row share one
    nested value.
  scales: the step's scale words arrive in registers, made by
    `scales_ptx` a step ahead (so their loads' latency hides behind the
    step before): operands `$(R+1) .. $(R+W)`, 64-bit, two words each
    (`scale_slots`); the table words (with `load_table`) after them.

  swizzle: the bytes as TMA's swizzle of `tile_k / 2` bytes leaves them
    (16-byte chunk `j` of row `r` at chunk `j ^ (r * tile_k / 256 % (tile_k
    / 32))`), so the eight rows one load instruction reads fall in
    distinct banks; without it rows 64 bytes or more apart share banks
    (a 4-way conflict at tile_k 128).
  load_table: the four permutes' register operands loaded from memory
    once a step, not written as constants: ptxas otherwise re-creates a
    constant before every permute (an `IMAD.U32` from a uniform register,
    15% of the kernel's instructions under Nsight Compute).
  """
  groups, kb = tile_w // 64, tile_k // 64
  blocks = range(kb) if part is None else [part]
  cols = 64 * len(blocks)
  s_stride = s_stride or tile_w
  nreg = groups * cols // 8 * 2
  row_bytes = tile_k // 2
  words = lut_decode.table_words(code, jnp.bfloat16)
  lines = [
      "{",
      ".reg .b32 tid, lane, wp, g, c, sel, wbase, sbase, r, wa, sa, sc, "
      "p0, p1, ga, gb, xo, la;",
      ".reg .b32 t<8>, v<8>;",
      f"mov.u32 wbase, ${nreg};",
  ]
  per, wide = scale_slots(tile_w, tile_k)
  if scales:
    t_ptr = f"${nreg + 1 + wide}"
    lines.append(f".reg .b32 sc<{2 * wide}>;")
    lines += [f"mov.b64 {{sc{2 * j}, sc{2 * j + 1}}}, ${nreg + 1 + j};"
              for j in range(wide)]
  elif nested:
    _check_nested(nested, kb)
    t_ptr = f"${nreg + 6}"
    lines += [f".reg .b32 sc<{groups * 2 * len(blocks)}>;",
              *_scale_regs(f"${nreg + 5}")]
  else:
    lines.append(f"mov.u32 sbase, ${nreg + 1};")
    t_ptr = f"${nreg + 2}"
  if load_table:
    lines.append(f"ld.global.nc.v4.u32 {{t0, t2, t4, t6}}, [{t_ptr}];")
  lines += [f"mov.b32 t{i}, 0x{u:08x};" for i, u in enumerate(words)
            if not (load_table and i % 2 == 0)]
  lines += ["mov.u32 tid, %tid.x;", "and.b32 lane, tid, 31;",
            "shr.u32 wp, tid, 5;", "and.b32 wp, wp, 3;",
            "shr.u32 g, lane, 2;", "and.b32 c, lane, 3;",
            # byte c of the first source, then byte c of the second
            "mad.lo.u32 sel, c, 17, 64;"]
  if swizzle:  # the chunk XOR of this lane's rows (it depends on g alone)
    lines += [f"mul.lo.u32 xo, g, {row_bytes};", "shr.u32 xo, xo, 7;",
              f"and.b32 xo, xo, {row_bytes // 16 - 1};",
              "shl.b32 xo, xo, 4;"]

  def chunk(q, b):
    """The address of 16-byte chunk `2 q + b` of the row at `wa`."""
    if not swizzle:
      return [], f"[wa+{32 * q + 16 * b}]"
    return [f"xor.b32 la, xo, {32 * q + 16 * b};",
            "add.u32 la, la, wa;"], "[la]"

  table = {f"t{i}": f"t{i}" for i in range(8)}
  if nested and not scales:
    # All of the step's scales first, so their global loads are in flight
    # during the decode: a row's codes of the step in one load (4, 2 or 1
    # bytes), its nested value, each block's nested code value; then
    # bitsandbytes' product and sum, rounded apart, and bf16 in both halves.
    nb = len(blocks)
    lines += _scale_lines(groups, blocks, nested,
                          [f"${nreg + 1 + i}" for i in range(4)],
                          lambda i, h, qi: f"sc{(2 * i + h) * nb + qi}")
  for i in range(groups):
    for h in range(2):
      lines += ["mad.lo.u32 r, wp, 16, g;", f"add.u32 r, r, {64 * i + 8 * h};",
                f"mad.lo.u32 wa, r, {row_bytes}, wbase;"]
      if not (nested or scales):
        lines.append("mad.lo.u32 sa, r, 4, sbase;")
      for qi, q in enumerate(blocks):
        for b, regs in ((0, "v0, v1, v2, v3"), (1, "v4, v5, v6, v7")):
          pre, addr = chunk(q, b)
          lines += pre + [f"ld.shared.v4.u32 {{{regs}}}, {addr};"]
        if scales:
          sc = f"sc{i * per + h * kb + q}"
        elif nested:
          sc = f"sc{(2 * i + h) * len(blocks) + qi}"
        else:
          sc = "sc"
          lines.append(f"ld.shared.u32 sc, [sa+{4 * s_stride * q}];")
        lines += [
            "prmt.b32 p0, v0, v1, sel;", "prmt.b32 p1, v2, v3, sel;",
            "prmt.b32 ga, p0, p1, 0x5410;",
            "prmt.b32 p0, v4, v5, sel;", "prmt.b32 p1, v6, v7, sel;",
            "prmt.b32 gb, p0, p1, 0x5410;",
        ]
        for half, gw in enumerate(("ga", "gb")):
          names = dict(table, w=gw, **{f"s{j}": sc for j in range(4)})
          for jj in range(4):
            j = 8 * qi + 4 * half + jj
            names[f"o{jj}"] = f"${(i * cols // 8 + j) * 2 + h}"
          decl, body = lut_decode.render(code, "bfloat16", names, prefix="u_")
          lines += ["{", decl] + body + ["}"]
  lines.append("}")
  return "\n".join(lines)


def table_operands(code: tuple[float, ...]) -> np.ndarray:
  """uint32 `[4]`: the table words `decode_ptx(..., load_table=True)`
  loads (`lut_decode.table_words` 0, 2, 4 and 6)."""
  words = lut_decode.table_words(code, jnp.bfloat16)
  return np.asarray(words[0::2], np.uint32)
