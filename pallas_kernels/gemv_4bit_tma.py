"""The 4-bit GEMV on Mosaic GPU: weights streamed by TMA, decoded in registers.

`gemv_4bit`'s "tma" variant, for M = 1..8 with double-quantized NF4/FP4
weights (blocksize 64) on Hopper. The Triton variants load each step's
bytes into registers themselves; here a TMA pipeline (`plgpu.emit_pipeline`,
`stages` steps in flight) copies each step's weight tile `[64, bk]` bytes
and x's matching pairs into shared memory, and one warpgroup (4 warps)
consumes them:

* Lane map (as `warp_mma`): lane `4 g + c` of warp `w` reads bytes
  `16 c .. 16 c + 15` of every 64-byte chunk of rows `a = 16 w + g` and
  `b = a + 8` (one 16-byte shared load each); the four lanes of a row cover
  the chunk. Word `i` of row a and of row b are the A operand of two
  `mma.sync.m16n8k16` (bytes 0-1, then 2-3), decoded with `lut_decode`'s
  byte permutes and scaled by the block's absmax in the compute dtype (as
  bitsandbytes' GEMV does). x's pairs for those bytes, from row `g % M`,
  are the B operand, so MMA column `g` holds x row `g % M` and `y` is read
  from columns `< M`. Two MMA accumulator chains a lane (even and odd chunks).
* Double quantization in the kernel: a block's absmax is
  `code[absmax_code] * nested_absmax[block // 256] + offset` (product and
  sum rounded apart, as bitsandbytes). The codes and the nested values of
  step t + 1 are read from global memory during step t, and the scales
  ride in the pipeline's carry; step 0 reads its own first.
* Each row tile and K split writes its fp32 partial `[M, 64]` through
  shared memory with one TMA store; the splits are summed by XLA. The
  output is padded to whole tiles: at M = 1 a store past the end of the
  `[split, 1, n]` output corrupted the next split's row on the H200.

The per-thread work is one inline-PTX block a step (`plgpu.inline_mgpu`);
`interpret=True` runs a jnp twin with the same rounding (no PTX), which
checks the wrapper's reshapes, padding and split sums on the CPU. The PTX
itself is checked by `pytest -m gpu`.

Not `gemv_4bit`'s default; a config ("tma", ...) selects it
(`default_config` gives one). Measured on the H200 (docs/benchmarks.md,
"GEMV on Mosaic GPU"), it is 5-12% faster than the default "warp" at M = 8
on the large decode shapes and slower on the small ones and at M <= 4.
Under ncu the weight stream is not what limits it: 24 us at M = 1 on
14336x4096 with DRAM at 26% of its peak, the schedulers issuing in 60% of
their cycles with a quarter of the warp slots occupied (89-96 registers a
thread), 12.3 M warp instructions. The Triton default ("reduce") takes
21.3 us under the same profile, issuing in 64% of cycles with 39% of the
warp slots occupied.
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
from pallas_kernels.dequantize_4bit import decode_absmax
from pallas_kernels.split_sum import sum_splits

try:  # pragma: no cover - depends on the installed JAX
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  import jax.experimental.mosaic.gpu as mgpu
  from jax.extend.mlir import ir
  from jax._src.lib.mlir.dialects import llvm, vector
  _HAVE_MGPU = all(hasattr(plgpu, a) for a in ("inline_mgpu", "emit_pipeline",
                                                 "kernel", "RefType"))
except ImportError:  # pragma: no cover
  _HAVE_MGPU = False

__all__ = ["BLOCK_N", "available", "check_config", "default_config", "gemv",
           "step_ptx"]

BLOCK_N = 64  # rows a program: 4 warps x 16 (MMA rows)
_TYPES = {"bfloat16": "bf16", "float16": "f16"}  # PTX type names


def available() -> bool:
  """Whether this JAX has the Mosaic GPU pieces the kernel uses."""
  return _HAVE_MGPU


def default_config(n: int, k: int, num_sms: int | None = None) -> tuple:
  """A `gemv_4bit` config of this variant for a weight `[n, k]` (k a
  multiple of 256): 128 bytes a row per step, two steps in flight, K split
  until about eight programs an SM wait (a program keeps two steps or
  more). The best of the sweep in docs/benchmarks.md ("GEMV on Mosaic
  GPU") at M = 8 on 14336x4096, 4096x14336 and 28672x4096; not
  `gemv_4bit`'s default (slower than "warp" on the smaller shapes).
  """
  if num_sms is None:
    num_sms = _backend.num_sms()
  total = k // 2 // 128
  tiles = -(-n // BLOCK_N)
  splits = [d for d in range(1, max(1, total // 2) + 1) if total % d == 0]
  split = next((d for d in splits if tiles * d >= 8 * num_sms), splits[-1])
  return ("tma", BLOCK_N, 128, split, 4, 2, "prmt", 0)


def check_config(m: int, k: int, blocksize: int, dtype, nested: bool,
                 bk: int, split: int, stages: int) -> None:
  """Raises ValueError naming the argument the "tma" variant cannot take."""
  dtype = jnp.dtype(dtype)
  if not nested:
    raise ValueError("absmax: variant 'tma' needs double-quantized weights "
                     "(nested), got plain float32 absmax")
  if blocksize != 64:
    raise ValueError(f"blocksize: variant 'tma' needs 64, got {blocksize}")
  if dtype.name not in _TYPES:
    raise ValueError(f"x: variant 'tma' needs bfloat16 or float16, got "
                     f"{dtype.name}")
  if not 1 <= m <= 8:
    raise ValueError(f"x: variant 'tma' takes 1 to 8 rows, got {m}")
  if bk not in (64, 128, 256):
    raise ValueError(f"config: variant 'tma' takes 64, 128 or 256 bytes a "
                     f"row per step, got {bk}")
  if split < 1 or (k // 2) % (bk * split):
    raise ValueError(
        f"k: variant 'tma' needs k / 2 a multiple of bytes per step x "
        f"split ({bk} x {split}), got k {k}")
  if stages < 1:
    raise ValueError(f"config: stages must be >= 1, got {stages}")


def _carry_size(bk: int) -> int:
  """Floats a lane carries between steps: 8 accumulators, the step
  counter and two scale words a 64-byte chunk, padded to 4."""
  return -(-(9 + 2 * (bk // 64)) // 4) * 4


@functools.lru_cache(maxsize=None)
def step_ptx(code: tuple[float, ...], dtype_name: str, m: int, bk: int,
             n: int, k: int, steps: int, n_nested: int) -> str:
  """One step of one lane, as inline PTX.

  Operands: `$0 .. $(V-1)` the carry out; then the shared addresses of the
  weight tile, x's tile and the nested table (`[256]` codes, then the
  offset), the global addresses of the absmax codes and the nested absmax;
  then the carry in. The carry (V floats): accumulators 0-7 (two chains),
  the step counter (8), and this step's scale words from 9 (rows a and b of
  each chunk, the dtype's bits in both halves).
  """
  q_n = bk // 64
  nkb = k // 64
  total = k // 2 // bk
  v = _carry_size(bk)
  nblk = bk // 32
  ptx_t = _TYPES[dtype_name]
  mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_t}.{ptx_t}.f32"
  w_in, x_in, t_in, c_in, n_in = (f"${v + i}" for i in range(5))
  cin = [f"${v + 5 + i}" for i in range(v)]
  words = lut_decode.table_words(code, jnp.dtype(dtype_name))
  lines = [
      "{",
      ".reg .b32 tid, lane, wp, g, c, c2, ra, wa, wb, xa, tmp, stp, gstep, "
      "gnext, rowa, rowb, ia, ib;",
      f".reg .b32 t<8>, w<8>, x<4>, oa<4>, ob<4>, s<{2 * q_n}>, "
      f"sn<{2 * q_n}>, ca<{q_n}>, cb<{q_n}>;",
      f".reg .f32 d<8>, off, fa, fb, na<{q_n}>, nb<{q_n}>;",
      ".reg .b64 cp, nsp, pa;",
      ".reg .b16 ha, hb;",
      ".reg .pred first;",
  ]
  lines += [f"mov.b32 t{i}, 0x{u:08x};" for i, u in enumerate(words)]
  lines += [f"mov.f32 d{i}, {cin[i]};" for i in range(8)]
  lines += [f"cvt.rzi.u32.f32 stp, {cin[8]};"]
  lines += [f"mov.b32 s{j}, {cin[9 + j]};" for j in range(2 * q_n)]
  lines += [
      "mov.u32 tid, %tid.x;", "and.b32 lane, tid, 31;", "shr.u32 wp, tid, 5;",
      "shr.u32 g, lane, 2;", "and.b32 c, lane, 3;", "shr.u32 c2, c, 1;",
      "mad.lo.u32 ra, wp, 16, g;",
      f"mul.lo.u32 wa, ra, {bk};", f"add.u32 wa, wa, {w_in};",
      "mad.lo.u32 wa, c, 16, wa;", f"add.u32 wb, wa, {8 * bk};",
      f"rem.u32 xa, g, {m};", f"mul.lo.u32 xa, xa, {bk};",
      "mad.lo.u32 xa, c, 16, xa;", "shl.b32 xa, xa, 2;",
      f"add.u32 xa, xa, {x_in};",
      f"ld.shared.f32 off, [{t_in}+1024];",
      # Mosaic GPU reverses the grid: ctaid.x is the split, ctaid.y the
      # row tile. Rows past the end read row n - 1's codes (not stored).
      "mov.u32 tmp, %ctaid.y;", "shl.b32 tmp, tmp, 6;",
      "add.u32 rowa, tmp, ra;", "add.u32 rowb, rowa, 8;",
      f"min.u32 rowa, rowa, {n - 1};", f"min.u32 rowb, rowb, {n - 1};",
      "mov.u32 tmp, %ctaid.x;", f"mad.lo.u32 gstep, tmp, {steps}, stp;",
      "add.u32 gnext, gstep, 1;", f"min.u32 gnext, gnext, {total - 1};",
      f"cvta.to.global.u64 cp, {c_in};", f"cvta.to.global.u64 nsp, {n_in};",
      "setp.eq.u32 first, stp, 0;",
  ]

  def fetch(step):
    """Step `step`'s absmax codes and nested values of this lane."""
    out = [f"mul.lo.u32 ia, rowa, {nkb};", f"mad.lo.u32 ia, {step}, {nblk}, ia;",
           "add.u32 ia, ia, c2;",
           f"mul.lo.u32 ib, rowb, {nkb};", f"mad.lo.u32 ib, {step}, {nblk}, ib;",
           "add.u32 ib, ib, c2;"]
    for q in range(q_n):
      for i_, cr, nr in (("ia", f"ca{q}", f"na{q}"), ("ib", f"cb{q}", f"nb{q}")):
        out += [f"add.u32 tmp, {i_}, {2 * q};", "cvt.u64.u32 pa, tmp;",
                "add.u64 pa, pa, cp;", f"ld.global.nc.u8 {cr}, [pa];",
                "shr.u32 tmp, tmp, 8;", f"min.u32 tmp, tmp, {n_nested - 1};",
                "mul.wide.u32 pa, tmp, 4;", "add.u64 pa, pa, nsp;",
                f"ld.global.nc.f32 {nr}, [pa];"]
    return out

  def scales(dst):
    """Scale words: `code[c] * nested + offset` (rounded apart), in the
    dtype, in both halves."""
    out = []
    for q in range(q_n):
      for j, cr, nr, fr, hr in ((0, f"ca{q}", f"na{q}", "fa", "ha"),
                                (1, f"cb{q}", f"nb{q}", "fb", "hb")):
        out += [f"shl.b32 tmp, {cr}, 2;", f"add.u32 tmp, tmp, {t_in};",
                f"ld.shared.f32 {fr}, [tmp];",
                f"mul.rn.f32 {fr}, {fr}, {nr};", f"add.rn.f32 {fr}, {fr}, off;",
                f"cvt.rn.{ptx_t}.f32 {hr}, {fr};",
                f"mov.b32 {dst}{2 * q + j}, {{{hr}, {hr}}};"]
    return out

  # Step 0 reads its own scales (nothing was fetched ahead), predicated.
  lines += ["@first " + line for line in fetch("gstep") + scales("s")]
  lines += fetch("gnext")  # in flight during this step's products
  for q in range(q_n):
    lines += [f"ld.shared.v4.u32 {{w0, w1, w2, w3}}, [wa+{64 * q}];",
              f"ld.shared.v4.u32 {{w4, w5, w6, w7}}, [wb+{64 * q}];"]
    ch = 4 * (q % 2)
    acc = "{" + ", ".join(f"d{ch + i}" for i in range(4)) + "}"
    for i in range(4):
      lines.append(
          f"ld.shared.v4.u32 {{x0, x1, x2, x3}}, [xa+{256 * q + 16 * i}];")
      for tile, word, sc in (("oa", f"w{i}", f"s{2 * q}"),
                             ("ob", f"w{4 + i}", f"s{2 * q + 1}")):
        names = {f"t{t}": f"t{t}" for t in range(8)}
        names.update(w=word, **{f"s{j}": sc for j in range(4)},
                     **{f"o{j}": f"{tile}{j}" for j in range(4)})
        decl, body = lut_decode.render(code, dtype_name, names, prefix="u_")
        lines += ["{", decl] + body + ["}"]
      lines.append(f"{mma} {acc}, {{oa0, ob0, oa1, ob1}}, {{x0, x1}}, {acc};")
      lines.append(f"{mma} {acc}, {{oa2, ob2, oa3, ob3}}, {{x2, x3}}, {acc};")
  lines += scales("sn")
  lines += [f"mov.f32 ${i}, d{i};" for i in range(8)]
  lines += ["add.u32 stp, stp, 1;", "cvt.rn.f32.u32 $8, stp;"]
  lines += [f"mov.b32 ${9 + j}, sn{j};" for j in range(2 * q_n)]
  lines += [f"mov.f32 ${i}, 0f00000000;" for i in range(9 + 2 * q_n, v)]
  lines.append("}")
  return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _finish_ptx(m: int) -> str:
  """The two chains summed and `y[:m]` of rows a and b stored to the
  shared `[m, 64]` tile: operands $0-$7 the accumulators, $8 its address.
  D[g][2c + j] (rows a) and D[g + 8][2c + j] (rows b) hold column 2c + j."""
  lines = ["{", ".reg .b32 tid, lane, wp, g, c, ra, oa;", ".reg .pred p;",
           ".reg .f32 y<4>;"]
  lines += [f"add.f32 y{j}, ${j}, ${4 + j};" for j in range(4)]
  lines += ["mov.u32 tid, %tid.x;", "and.b32 lane, tid, 31;",
            "shr.u32 wp, tid, 5;", "shr.u32 g, lane, 2;", "and.b32 c, lane, 3;",
            "mad.lo.u32 ra, wp, 16, g;", "shl.b32 oa, ra, 2;",
            "add.u32 oa, oa, $8;"]
  for col in range(m):
    lines += [f"setp.eq.u32 p, c, {col // 2};",
              f"@p st.shared.f32 [oa+{4 * col * BLOCK_N}], y{col % 2};",
              f"@p st.shared.f32 [oa+{4 * (col * BLOCK_N + 8)}], "
              f"y{2 + col % 2};"]
  lines.append("}")
  return "\n".join(lines)


def _address(ref, bits):
  return llvm.ptrtoint(ir.IntegerType.get_signless(bits),
                       mgpu.utils.memref_ptr(ref))


def _elements(arr, count):
  [reg] = arr.registers.flat
  return reg, [vector.extract(reg, dynamic_position=[],
                              static_position=ir.DenseI64ArrayAttr.get([i]))
               for i in range(count)]


@lowering.lowered_once
def _compiled(x, packed, codes, nested_absmax, table, *, code, n, k, bk,
              split, stages):
  """The Mosaic GPU kernel: fp32 partials `[split, m, n_pad]`."""
  m = x.shape[0]
  dtype = jnp.dtype(x.dtype)
  kb = k // 2
  total = kb // bk
  steps = total // split
  tiles = -(-n // BLOCK_N)
  v = _carry_size(bk)
  layout = plgpu.Layout.WG_STRIDED((128 * v,), vec_size=v)
  sptx = step_ptx(code, dtype.name, m, bk, n, k, steps,
                  nested_absmax.shape[0])
  fptx = _finish_ptx(m)
  f32 = ir.F32Type.get

  @plgpu.inline_mgpu(
      arg_types=(_backend.ref_type(write=False),) * 5 + (layout,),
      return_type=plgpu.ShapeDtypeStruct((128 * v,), jnp.float32,
                                         layout=layout))
  def step(ctx, w_ref, x_ref, t_ref, c_ref, ns_ref, carry):
    del ctx
    reg, ins = _elements(carry, v)
    res = llvm.inline_asm(
        llvm.StructType.get_literal([f32()] * v),
        [_address(w_ref, 32), _address(x_ref, 32), _address(t_ref, 32),
         _address(c_ref, 64), _address(ns_ref, 64)] + ins,
        sptx,
        ",".join(["=f"] * v + ["r"] * 3 + ["l"] * 2 + ["f"] * v)
        + ",~{memory}",
        has_side_effects=True)
    out = llvm.mlir_undef(reg.type)
    for i in range(v):
      out = vector.insert(llvm.extractvalue(f32(), res, [i]), out,
                          dynamic_position=[],
                          static_position=ir.DenseI64ArrayAttr.get([i]))
    return mgpu.FragmentedArray(_registers=np.array([out]),
                                _layout=carry.layout, _is_signed=None)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), layout))
  def finish(ctx, o_ref, carry):
    del ctx
    _, ins = _elements(carry, 8)
    llvm.inline_asm(ir.Type.parse("!llvm.void"), ins + [_address(o_ref, 32)],
                    fptx, ",".join(["f"] * 8 + ["r"]) + ",~{memory}",
                    has_side_effects=True)

  def jaxbnb_gemv_4bit_tma(x_gmem, w_gmem, t_gmem, c_gmem, ns_gmem, o_gmem,
                           o_smem):
    i = lax.axis_index("n")
    s = lax.axis_index("s")

    def body(_, w_smem, x_smem, t_smem, carry):
      return step(w_smem, x_smem, t_smem, c_gmem, ns_gmem, carry)

    carry = plgpu.layout_cast(jnp.zeros((128 * v,), jnp.float32), layout)
    carry = plgpu.emit_pipeline(
        body, grid=(steps,),
        in_specs=[pl.BlockSpec((BLOCK_N, bk), lambda t: (i, s * steps + t)),
                  pl.BlockSpec((m, bk), lambda t: (0, s * steps + t)),
                  pl.BlockSpec((3, 128), lambda t: (0, 0))],
        max_concurrent_steps=stages, init_carry=carry)(w_gmem, x_gmem, t_gmem)
    finish(o_smem, carry)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem,
                            o_gmem.at[s, :, pl.ds(i * BLOCK_N, BLOCK_N)])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(
      jaxbnb_gemv_4bit_tma,
      out_type=jax.ShapeDtypeStruct((split, m, tiles * BLOCK_N), jnp.float32),
      grid=(tiles, split), grid_names=("n", "s"),
      scratch_types=[plgpu.SMEM((m, BLOCK_N), jnp.float32)])
  xw = lax.bitcast_convert_type(x.reshape(m, kb, 2), jnp.uint32)
  return kernel(xw, packed.reshape(n, kb), table, codes.reshape(-1),
                nested_absmax)


def _twin(x, packed, codes, nested_absmax, nested_code, offset, *, code, n,
          k, split):
  """The kernel's values in jnp: weights decoded and scaled in the dtype
  (the absmax product and sum rounded apart), products summed in fp32;
  partials per K split, `[split, m, n]`."""
  m = x.shape[0]
  dtype = jnp.dtype(x.dtype)
  nkb = k // 64
  absmax = decode_absmax(codes, jnp.arange(codes.shape[0]), nested_absmax,
                         nested_code.astype(jnp.float32), offset, 256,
                         nested_absmax.shape[0], True)
  scale = lut_decode.scale_words(absmax.reshape(n, nkb, 1), dtype)
  w = packed.reshape(n, nkb, 32)
  hi, lo = lut_decode.decode_scaled(w, jnp.broadcast_to(scale, w.shape), code,
                                    dtype, True)
  wv = jnp.stack([hi, lo], -1).reshape(n, split, k // split)
  xv = x.reshape(m, split, k // split)
  return jnp.einsum("msk,nsk->smn", xv.astype(jnp.float32),
                    wv.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def gemv(x: jax.Array, packed: jax.Array, codes: jax.Array,
         nested_absmax: jax.Array, nested_code: jax.Array,
         offset: jax.Array, *, code: tuple[float, ...], n: int, k: int,
         bk: int = 128, split: int = 4, stages: int = 2,
         interpret: bool = False) -> jax.Array:
  """`x @ W.T` in fp32 for a double-quantized 4-bit `W [n, k]`, blocksize 64.

  Args:
    x: `[m, k]` bfloat16 or float16, m <= 8.
    packed: uint8 `[n * k / 2]`, bitsandbytes' order.
    codes: uint8 `[n * k / 64]`, the absmax codes.
    nested_absmax: float32 `[ceil(n * k / 64 / 256)]`.
    nested_code: float32 `[256]`, the nested map.
    offset: float32 scalar.
    code: the 16 code values (static).
    n, k: the weight's shape.
    bk: bytes of a row per pipeline step (64, 128 or 256).
    split: K splits (programs per row tile).
    stages: steps in flight.
    interpret: the jnp twin (CPU).

  Returns:
    float32 `[m, n]`.

  Example (the jnp twin, on any device; every weight is code 7 = 7.0,
  every absmax 1 * 1 + 0):

    >>> import jax.numpy as jnp
    >>> from pallas_kernels import gemv_4bit_tma
    >>> n, k = 64, 1024
    >>> packed = jnp.full((n * k // 2,), 0x77, jnp.uint8)
    >>> codes = jnp.zeros((n * k // 64,), jnp.uint8)
    >>> y = gemv_4bit_tma.gemv(
    ...     jnp.ones((1, k), jnp.bfloat16), packed, codes,
    ...     jnp.ones((4,), jnp.float32), jnp.ones((256,), jnp.float32), 0.0,
    ...     code=tuple(range(16)), n=n, k=k, interpret=True)
    >>> y.shape, float(y[0, 0])
    ((1, 64), 7168.0)
  """
  m = x.shape[0]
  check_config(m, k, 64, x.dtype, True, bk, split, stages)
  code = tuple(float(c) for c in code)
  offset = jnp.asarray(offset, jnp.float32)
  if not interpret and not available():
    raise RuntimeError(
        "variant 'tma' needs Mosaic GPU's inline_mgpu and emit_pipeline "
        f"(jax 0.11.2 has them); this JAX is {jax.__version__}")
  if interpret:
    part = _twin(x, packed, codes, nested_absmax.astype(jnp.float32),
                 nested_code, offset, code=code, n=n, k=k, split=split)
  else:
    table = jnp.concatenate([nested_code.astype(jnp.float32),
                             offset.reshape(1), jnp.zeros((127,), jnp.float32)
                             ]).reshape(3, 128)
    part = _compiled(x, packed, codes, nested_absmax.astype(jnp.float32),
                     table, code=code, n=n, k=k, bk=bk, split=split,
                     stages=stages)[:, :, :n]
  return sum_splits(part)
