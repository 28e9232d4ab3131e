"""The "warp_tma" GEMV (`pallas_kernels.gemv_4bit_warp_tma`, Mosaic GPU, M =
2..16).

Called as users' code reaches it: through `gemv_4bit` (the default at M =
2..16 for double-quantized blocksize-64 weights, K a multiple of 256) and
`gemv_4bit_group`. On the CPU the jnp twin runs against the documented
weight (code and absmax rounded to x's dtype, their product rounded once),
and the PTX itself runs in the emulator (`_ptx`: the x copy's layout, the
lane map of the MMA's operands, the decode, the nested absmax, the step
counter and the stores) and, where Triton's `ptxas` is installed, is
assembled for sm_90a; the kernel runs under `pytest -m gpu`.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from pallas_kernels import _backend
from pallas_kernels import gemv_4bit as gk
from pallas_kernels import gemv_4bit_lut as lg
from pallas_kernels import gemv_4bit_warp_tma as wt
from tests import helpers
from tests.kernels import _ptx
from tests.kernels import _util
from tests.kernels.gemv_4bit_lut_test import (_assert_assembles, _entry,
                                              _ptxas)
from tests.kernels.gemv_4bit_test import _code


def _weights(n, k, quant_type, dtype, seed):
  w = jnp.asarray(_util.rng_array((n, k), seed, dtype))
  return F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                         compress_statistics=True)


def _nested(qs):
  return (qs.nested_absmax, qs.nested_code, qs.offset)


def _check(y, x, packed, qs, bias=None):
  """Against the weight the kernel multiplies (`kernel_weight`,
  `in_dtype`), fp32 sums in any order, one rounding to x's dtype."""
  w = _util.kernel_weight(packed, qs, x.dtype, in_dtype=True)
  exact, bound = helpers.matmul_bound(x, w, x.dtype, bias=bias)
  helpers.assert_within(y, exact, bound, f"warp_tma gemv {x.dtype}")


@pytest.mark.parametrize("m,n,k,dtype,quant_type,bias", [
    (2, 200, 8192, jnp.bfloat16, "nf4", False),
    (8, 70, 8192, jnp.float16, "fp4", True),
    (5, 8192, 1024, jnp.bfloat16, "nf4", True),
])
def test_default_at_m_2_to_8_matches_weight(m, n, k, dtype, quant_type, bias):
  """`gemv_4bit` with no config takes this kernel for a weight with a side
  of `WARP_TMA_MIN_SIDE` (interpret: its twin)."""
  packed, qs = _weights(n, k, quant_type, dtype, n + m)
  x = jnp.asarray(_util.rng_array((m, k), m + 1, dtype))
  b = jnp.asarray(_util.rng_array((n,), 3, dtype)) if bias else None
  assert gk.warp_tma_serves(m, (n,), k, 64, dtype, True, 256,
                            _code(quant_type))
  y = gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                   jnp.asarray(codebooks.code_for(quant_type)), n=n, k=k,
                   blocksize=64, nested=_nested(qs), bias=b,
                   code=_code(quant_type), interpret=True)
  assert y.shape == (m, n) and y.dtype == dtype
  _check(y, x, packed, qs, b)


@pytest.mark.parametrize("m", [9, 16])
def test_default_at_m_9_to_16_matches_weight(m):
  """9 to 16 rows of x: the default for any weight of `WARP_TMA_MIN_N`
  rows (a second MMA pair on x rows 8..15)."""
  n, k = 1024, 1024
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, m)
  x = jnp.asarray(_util.rng_array((m, k), m + 5, jnp.bfloat16))
  assert gk.warp_tma_serves(m, (n,), k, 64, jnp.bfloat16, True, 256,
                            _code("nf4"))
  y = gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                   jnp.asarray(codebooks.code_for("nf4")), n=n, k=k,
                   blocksize=64, nested=_nested(qs), code=_code("nf4"),
                   interpret=True)
  assert y.shape == (m, n)
  _check(y, x, packed, qs)


def test_group_matches_each_weight():
  """`gemv_4bit_group` (a layer's q/k/v) with a "warp_tma" config: each
  output is its weight's."""
  m, k, ns = 4, 1024, (256, 64, 64)
  made = [_weights(n, k, "nf4", jnp.bfloat16, 11 + n) for n in ns]
  x = jnp.asarray(_util.rng_array((m, k), 2, jnp.bfloat16))
  ys = gk.gemv_4bit_group(
      x, tuple((p.reshape(-1), q.absmax, _nested(q)) for p, q in made),
      jnp.asarray(codebooks.code_for("nf4")), ns=ns, k=k, blocksize=64,
      config=("warp_tma", 64, 128, (2, 1, 1), 8, 4), code=_code("nf4"),
      interpret=True)
  for y, (p, q) in zip(ys, made):
    _check(y, x, p, q)


@pytest.mark.parametrize("ns,k", [
    ((28672,), 28672), ((14336,), 53248), ((28672, 28672), 28672),
    ((128256,), 16384), ((16384,), 53248), ((152064,), 14336)])
def test_default_config_fits_shared_memory(ns, k):
  """Long programs' spans of nested absmax would overflow the SM's shared
  memory with one row group; the default takes fewer stages, then more
  groups, for any M the default serves (16 rows of x the most), with the
  default decode's table."""
  one = lg.default_rows(sum(ns), k)
  assert wt.smem_bytes(ns, k, (one,) * len(ns), 4, 16) > _backend.HOPPER_SMEM
  cfg = wt.default_config(ns, k)
  assert wt.smem_bytes(ns, k, cfg["rows"], cfg["stages"], 16,
                       decode=cfg["decode"]) <= _backend.HOPPER_SMEM
  assert cfg["stages"] >= 2 and min(cfg["rows"]) >= 1


def test_default_config_of_the_measured_shapes():
  """Where the shared memory holds it, the measured default: one program
  an SM and four stages."""
  assert wt.default_config((14336,), 4096) == dict(rows=(8,), stages=4,
                                                   kchunks=1, decode="lds")
  assert wt.default_config((4096,), 14336) == dict(rows=(2,), stages=4,
                                                   kchunks=1, decode="lds")
  assert wt.default_config((14336, 14336), 4096) == dict(
      rows=(8, 8), stages=4, kchunks=2, decode="lds")
  assert wt.default_config((14336, 14336), 4096, kchunks=1) == dict(
      rows=(4, 4), stages=4, kchunks=1, decode="lds")
  assert wt.default_config((4096, 1024, 1024), 4096) == dict(
      rows=(5, 1, 1), stages=4, kchunks=1, decode="lds")


@pytest.mark.parametrize("ns,k,kchunks", [
    ((14336, 14336), 4096, 2),   # Llama-3-8B's gate/up: measured faster
    ((11008, 11008), 4096, 2),   # Llama-2-7B's
    ((14336,), 4096, 1),         # one weight
    ((4096, 1024, 1024), 4096, 1),  # q/k/v: measured slower at 2
    ((4096,), 14336, 1),
    ((8192, 8192), 2048, 1),     # a pair at another K: not measured
    ((28672, 28672), 8192, 1)])
def test_default_k_chunks_two_for_a_pair_at_k_4096(ns, k, kchunks):
  """Two weights in one launch (a gate/up pair) at K = 4096 take 2 K
  chunks a program by default (`PAIR_KCHUNKS`): half the partials that
  `silu(gate) * up` reads; every other launch 1."""
  cfg = wt.default_config(ns, k, num_sms=132)
  assert cfg["kchunks"] == kchunks
  assert wt.smem_bytes(ns, k, cfg["rows"], cfg["stages"], wt.MAX_M,
                       kchunks=kchunks, decode=cfg["decode"]
                       ) <= _backend.HOPPER_SMEM
  assert sum(cfg["rows"]) * (k // wt.CHUNK // kchunks) <= 132  # one wave


def test_default_rows_keep_the_shortest_wave():
  """Row groups shared by rounding can make a few more programs than SMs:
  q/k/v at 2 K chunks a program would be (11, 3, 3), 136 programs, two
  waves (measured 19.2 us against 15.5); the default takes (10, 2, 2).
  Where the second wave is the shorter way (a 70B-shaped q/k/v: 160
  programs of 23 steps or fewer against 128 of 33), it stays."""
  qkv = (4096, 1024, 1024)
  assert wt.makespan(qkv, (11, 3, 3), 4096, 2) == 14
  assert wt.makespan(qkv, (10, 2, 2), 4096, 2) == 9
  assert wt.default_config(qkv, 4096, kchunks=2)["rows"] == (10, 2, 2)
  big = (8192, 1024, 1024)
  assert wt.makespan(big, (3, 1, 1), 8192) == 23
  assert wt.makespan(big, (2, 1, 1), 8192) == 33
  assert wt.default_config(big, 8192)["rows"] == (3, 1, 1)


def test_served_where_it_was_measured_faster():
  """The default: M = 2..7 one weight with a side of 8192 or more, and
  with k of 4096 or more (as measured) one of 4096 rows or more and groups of
  8192 rows a weight (gate/up, not q/k/v);
  M = 8..16 every weight and group of 1024 rows a weight;
  double-quantized blocks of 64, 16-bit x."""
  code = _code("nf4")

  def serves(m=4, ns=(14336,), k=4096, nested=True, dtype=jnp.bfloat16):
    return gk.warp_tma_serves(m, ns, k, 64, dtype, nested, 256, code)
  assert serves() and serves(ns=(4096,), k=14336) and serves(m=2)
  assert serves(m=8, ns=(11008,)) and serves(m=16, ns=(4096,), k=14336)
  assert not serves(m=1) and not serves(m=17)
  assert serves(ns=(4096,)) and serves(m=2, ns=(14336, 14336))
  assert serves(m=7, ns=(11008, 11008)) and serves(m=3, ns=(70,), k=8192)
  assert not serves(m=7, ns=(4096, 1024, 1024))
  assert not serves(m=2, ns=(2048,)) and not serves(m=4, ns=(4096, 4096))
  assert not serves(ns=(4096,), k=2048) and not serves(
      m=2, ns=(14336, 14336), k=3072)
  assert serves(m=2, ns=(14336,), k=2048)  # a side of 8192, as before
  for m in (8, 12, 16):
    assert serves(m=m, ns=(4096,)) and serves(m=m, ns=(14336, 14336))
    assert serves(m=m, ns=(4096, 1024, 1024))
  assert not serves(m=16, k=4096 + 640)
  assert not serves(m=8, ns=(1000,)) and not serves(m=8, ns=(4096, 512))
  assert serves(m=8, ns=(70,), k=8192)  # a long single weight, as below 8
  assert not serves(k=8192 + 64)  # not a multiple of 256 (a K chunk)
  # k past whole 1024s (the codes' rows padded): Llama-2-7B's down,
  # Qwen2.5-7B's gate/up and down.
  assert serves(ns=(4096,), k=11008) and serves(m=8, ns=(4096,), k=11008)
  assert serves(m=8, ns=(18944, 18944), k=3584)
  # Not where k's 256-column chunks leave over 30% of the SMs idle:
  # 3584x18944 (74 chunks, one row group; 132 SMs here, as on the H200).
  assert not serves(m=16, ns=(3584,), k=18944)
  assert not serves(m=4, ns=(3584,), k=18944)
  assert serves(m=8, ns=(8192,), k=28672)  # 112 chunks: 85%
  assert not serves(nested=False) and not serves(dtype=jnp.float32)


@pytest.mark.parametrize("k,num_sms,fills", [
    (4096, 132, True),    # 16 chunks x 8 row groups: 128 programs
    (14336, 132, True),   # 56 x 2: 112
    (18944, 132, False),  # 74 x 1: 74, 56%
    (28672, 132, True),   # 112 x 1: 85%
    (11008, 114, True),   # 43 x 2: 86 of an H100 PCIe's 114, 75%
    (11520, 132, False),  # 45 x 2: 90, 68%
    (12288, 132, True),   # 48 x 2: 96, 73%
    (23552, 132, False),  # 92 x 1: 70% less a little
    (13824, 114, True),   # 54 x 2: 108 of 114
    (16384, 114, False),  # 64 x 1: one row group past 57 chunks, 56%
    (256, 132, True),     # 1 x 132
])
def test_mosaic_fills_sms(k, num_sms, fills):
  """The Mosaic GPU GEMVs serve only where k's 256-column chunks times
  the row groups of one wave fill MOSAIC_MIN_FILL of the SMs."""
  assert gk.mosaic_fills_sms(k, num_sms) == fills


@pytest.mark.parametrize("kwargs,match", [
    (dict(m=1), "x: the TMA warp GEMV takes 2 to 16 rows, got 1"),
    (dict(m=17), "x: the TMA warp GEMV takes 2 to 16 rows, got 17"),
    (dict(k=1600), "k: the TMA warp GEMV needs a multiple of 256"),
    (dict(stages=0), "stages: must be >= 1, got 0"),
    (dict(rows=0), r"rows: one count >= 1 per weight \(1\), got 0"),
    (dict(rows=1, stages=60), "rows/stages: row groups"),
    (dict(wgs=1), "wgs: must be 2 or 3, got 1"),
    (dict(wgs=4), "wgs: must be 2 or 3, got 4"),
    (dict(kchunks=3), r"kchunks: must be one of \(1, 2, 4\) and divide "
                      "k / 256 = 4, got 3"),
    (dict(kchunks=8, k=1024), "kchunks: must be one of"),
])
def test_errors_name_the_argument(kwargs, match):
  m, k = kwargs.pop("m", 2), kwargs.pop("k", 1024)
  n = 64
  packed, qs = _weights(n, 1024, "nf4", jnp.bfloat16, 1)
  codes = qs.absmax if k == 1024 else jnp.zeros((n * k // 64,), jnp.uint8)
  packed = packed.reshape(-1) if k == 1024 else jnp.zeros((n * k // 2,),
                                                          jnp.uint8)
  with pytest.raises(ValueError, match=match):
    wt.gemv(jnp.ones((m, k), jnp.bfloat16), packed, codes, qs.nested_absmax,
            qs.nested_code, qs.offset, code=_code("nf4"), n=n, k=k,
            interpret=True, **kwargs)


def test_config_names_its_shape():
  packed, qs = _weights(64, 1024, "nf4", jnp.bfloat16, 1)
  with pytest.raises(ValueError, match="8 or 12 warps, got block_n 32"):
    gk.gemv_4bit(jnp.ones((2, 1024), jnp.bfloat16), packed.reshape(-1),
                 qs.absmax, jnp.asarray(codebooks.code_for("nf4")), n=64,
                 k=1024, blocksize=64, nested=_nested(qs),
                 config=("warp_tma", 32, 128, 1, 8, 4), code=_code("nf4"),
                 interpret=True)


def _emulate(x, weights, code, ns, k, rows, wgs=wt.WGS, ways=None,
             kchunks=1, partials=None, decode=None, early=False):
  """The kernel's PTX run by `_ptx` over every program of a group of
  weights `(packed, qs)`: build, then each pipeline step with its TMA
  tiles written into shared memory (rows past the weight zero, as TMA
  fills them). fp32 `[m, n_g]` per weight (the partials summed; the
  partials themselves appended to the list `partials`, if given);
  `early`: `build_ptx`'s."""
  m = x.shape[0]
  decode = wt.DECODE if decode is None else decode
  tile_rows = wt.STEP_ROWS * wgs
  plan, n_pad = lg.row_plan(ns, k, rows, tile_rows, 4 * kchunks)
  span = max(p[3] for p in plan)
  out = np.zeros((k // wt.CHUNK // kchunks, m, n_pad), np.float32)
  dtype = jnp.dtype(x.dtype)

  def texts(n, steps, group0, row0, n_nested):
    return (wt.build_ptx(code, dtype.name, m, n, k, steps * tile_rows, span,
                         n_nested, group0, wgs, kchunks, decode, early),
            wt.step_ptx(code, dtype.name, m, n, k, steps, n_pad, group0,
                        row0, wgs, kchunks, decode))

  def on_program(mc, _):
    if ways is not None:
      for line, w in mc.ways.items():
        ways[line] = max(w, ways.get(line, 1))

  _ptx.run_pipeline(x, weights, ns, k, plan, span, tile_rows, wgs,
                    wt.own_rows(m, kchunks, decode) * 576, out, texts,
                    on_program,
                    kchunks, (1 + (m > 8)) * 128 * wgs * 16)
  if partials is not None:
    partials.append(out)
  total = out.sum(0)
  return [total[:, p[5]:p[5] + n] for p, n in zip(plan, ns)]


@pytest.mark.parametrize("m,ns,k,rows,dtype,quant_type,wgs", [
    (3, (200,), 1024, (2,), jnp.bfloat16, "nf4", 2),  # padded step, 2 groups
    (8, (100,), 2048, (1,), jnp.float16, "fp4", 2),   # every MMA column read
    (5, (130, 64), 1024, (1, 1), jnp.bfloat16, "nf4", 2),  # a group of two
    (16, (200,), 1024, (2,), jnp.bfloat16, "nf4", 2),  # two MMA column tiles
    (11, (70,), 2048, (1,), jnp.float16, "fp4", 2),   # the second one partly
    (4, (300,), 1024, (1,), jnp.bfloat16, "nf4", 3),  # three compute WGs
    (16, (130,), 1024, (1,), jnp.bfloat16, "fp4", 3),  # three, 16 rows of x
    # k not a multiple of 1024: the codes' rows padded (`codes_tiles`).
    (6, (130,), 1280, (1,), jnp.bfloat16, "nf4", 2),
    (12, (70, 90), 2816, (1, 1), jnp.float16, "fp4", 2),
])
def test_ptx_emulated_matches_weight(m, ns, k, rows, dtype, quant_type, wgs):
  """The PTX itself on the CPU gives `x @ W.T` for the documented weight
  (within fp32 sums in any order)."""
  made = [_weights(n, k, quant_type, dtype, 7 * n + m) for n in ns]
  x = jnp.asarray(_util.rng_array((m, k), m, dtype))
  got = _emulate(x, made, _code(quant_type), ns, k, rows, wgs)
  for y, (p, q) in zip(got, made):
    w = _util.kernel_weight(p, q, dtype, in_dtype=True)
    exact, bound = helpers.matmul_bound(x, w, jnp.float32)
    helpers.assert_within(y, exact, bound, "emulated warp_tma PTX")


@pytest.mark.parametrize("m,ns,k,rows,wgs,kchunks,decode", [
    (8, (200,), 1024, (2,), 2, 1, "lds"),
    (5, (130, 64), 1024, (1, 1), 2, 2, "prmt"),
    (16, (130,), 2048, (1,), 3, 2, "lds"),
])
def test_ptx_early_build_gives_the_same_partials(m, ns, k, rows, wgs, kchunks,
                                                 decode):
  """`early`: the TMA warpgroup branches past the build at once and the
  compute threads meet at named barrier 15, not barrier 0; the partials
  are the same."""
  made = [_weights(n, k, "nf4", jnp.bfloat16, 5 * n + m) for n in ns]
  x = jnp.asarray(_util.rng_array((m, k), m + 1, jnp.bfloat16))
  parts = {}
  for early in (False, True):
    parts[early] = []
    _emulate(x, made, _code("nf4"), ns, k, rows, wgs, kchunks=kchunks,
             partials=parts[early], decode=decode, early=early)
  np.testing.assert_array_equal(parts[True][0], parts[False][0])
  text = wt.build_ptx(_code("nf4"), "bfloat16", m, 1000, k, 384, 256, 63,
                      wgs=wgs, kchunks=kchunks, decode=decode, early=True)
  assert text.index("@!pw bra WT_BUILT;") < text.index("ld.global")
  assert text.rindex("st.shared") < text.index("WT_BUILT:") < text.index(
      f"@pw bar.sync 15, {128 * wgs};")
  assert "bar.sync 0;" not in text
  assert "bar.sync 0;" in wt.build_ptx(_code("nf4"), "bfloat16", m, 1000, k,
                                       384, 256, 63, wgs=wgs, kchunks=kchunks,
                                       decode=decode)


@pytest.mark.parametrize("m,ns,k,rows,dtype,quant_type,wgs,kchunks", [
    (3, (200,), 1024, (2,), jnp.bfloat16, "nf4", 2, 1),
    (8, (100,), 2048, (1,), jnp.float16, "fp4", 2, 1),
    (16, (130, 64), 1024, (1, 1), jnp.bfloat16, "nf4", 3, 1),
    (11, (70,), 2048, (1,), jnp.bfloat16, "fp4", 2, 2),
])
def test_ptx_emulated_lds_decode_equals_prmt(m, ns, k, rows, dtype,
                                             quant_type, wgs, kchunks):
  """The "lds" decode's table holds the permutes' values, so the emulated
  kernel gives the "prmt" kernel's partials bit for bit (the same MMAs in
  the same order), and `x @ W.T` for the documented weight."""
  made = [_weights(n, k, quant_type, dtype, 5 * n + m) for n in ns]
  x = jnp.asarray(_util.rng_array((m, k), m + 2, dtype))
  parts = {}
  for decode in wt.DECODES:
    parts[decode] = []
    got = _emulate(x, made, _code(quant_type), ns, k, rows, wgs,
                   kchunks=kchunks, partials=parts[decode], decode=decode)
  np.testing.assert_array_equal(parts["lds"][0], parts["prmt"][0])
  for y, (p, q) in zip(got, made):
    w = _util.kernel_weight(p, q, dtype, in_dtype=True)
    exact, bound = helpers.matmul_bound(x, w, jnp.float32)
    helpers.assert_within(y, exact, bound, "emulated warp_tma PTX, lds")


def test_ptx_lds_table_has_no_bank_conflicts():
  """The "lds" table's fill (a quarter-warp's 16-byte stores) and every
  lane's lookups (each its own copy) meet distinct banks."""
  n, k = 128, 1024
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, 4)
  x = jnp.asarray(_util.rng_array((16, k), 5, jnp.bfloat16))
  ways = {}
  _emulate(x, [(packed, qs)], _code("nf4"), (n,), k, (1,), ways=ways,
           decode="lds")
  lookups = {l: w for l, w in ways.items() if "[ka" in l}
  fills = {l: w for l, w in ways.items() if "{fv0" in l}
  assert len(lookups) == 4 and len(fills) == 1  # one line, eight times
  assert set(lookups.values()) == set(fills.values()) == {1}, (lookups,
                                                               fills)


def test_lds_config_names_its_decode():
  """A decode other than the two is refused, naming the argument; the
  "lds" table counts in the shared memory of the default config."""
  packed, qs = _weights(64, 1024, "nf4", jnp.bfloat16, 1)
  with pytest.raises(ValueError, match="decode: must be one of"):
    wt.gemv(jnp.ones((2, 1024), jnp.bfloat16), packed.reshape(-1),
            qs.absmax, *_nested(qs), code=_code("nf4"), n=64, k=1024,
            decode="gather", interpret=True)
  assert (wt.smem_bytes((14336,), 4096, (8,), 4, 16, decode="lds")
          - wt.smem_bytes((14336,), 4096, (8,), 4, 16, decode="prmt")
          ) >= 256 * 32 * 4


@pytest.mark.parametrize("m,ns,k,rows,kchunks,wgs", [
    (8, (200,), 2048, (2,), 2, 2),    # two chunks a program, 2 groups
    (16, (130, 64), 2048, (1, 1), 4, 2),  # four, a group, 16 rows of x
    (5, (300,), 1024, (1,), 4, 3),    # the whole K, three compute WGs
    (11, (70,), 2048, (1,), 2, 2),    # the second MMA column tile partly
    # k past whole 1024s (codes padded): a pair of chunks across a tile of
    # codes, as run "j" of the sweep times on Qwen2.5-7B's down.
    (6, (90,), 1536, (1,), 2, 2),
])
def test_ptx_emulated_k_chunks_a_program(m, ns, k, rows, kchunks, wgs):
  """With `kchunks` K chunks a program the PTX keeps its accumulators
  between a row tile's steps and writes `k / 256 / kchunks` partials:
  `x @ W.T` within fp32 sums in any order, and each partial the sum of
  its chunks' (the partials of one chunk a program, emulated too)."""
  made = [_weights(n, k, "nf4", jnp.bfloat16, 3 * n + m) for n in ns]
  x = jnp.asarray(_util.rng_array((m, k), m + 1, jnp.bfloat16))
  parts, ones = [], []
  got = _emulate(x, made, _code("nf4"), ns, k, rows, wgs, kchunks=kchunks,
                 partials=parts)
  _emulate(x, made, _code("nf4"), ns, k,
           wt.default_config(ns, k)["rows"], wgs, partials=ones)
  assert parts[0].shape[0] == k // wt.CHUNK // kchunks
  for y, (p, q) in zip(got, made):
    w = _util.kernel_weight(p, q, jnp.bfloat16, in_dtype=True)
    exact, bound = helpers.matmul_bound(x, w, jnp.float32)
    helpers.assert_within(y, exact, bound, "emulated warp_tma PTX")
  # The partials by chunk group: padded rows differ between the two row
  # plans, so compare each weight's rows.
  plan, _ = lg.row_plan(ns, k, rows, wt.STEP_ROWS * wgs, 4 * kchunks)
  plan1, _ = lg.row_plan(ns, k, wt.default_config(ns, k)["rows"],
                         wt.STEP_ROWS * wgs)
  for (_, _, _, _, _, r0), (_, _, _, _, _, r1), n in zip(plan, plan1, ns):
    mine = parts[0][:, :, r0:r0 + n]
    theirs = ones[0][:, :, r1:r1 + n].reshape(-1, kchunks, m, n).sum(1)
    np.testing.assert_allclose(mine, theirs, rtol=1e-5,
                               atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("m", [8, 16])
def test_ptx_x_loads_have_no_bank_conflicts(m):
  """The lanes' 16-byte loads of x's copy (a quarter-warp at a time) and of
  the permute words meet distinct banks (in the emulator, on the step's
  own addresses); the weight words' loads meet at most two lanes a bank."""
  n, k = 128, 1024
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, 3)
  x = jnp.asarray(_util.rng_array((m, k), 4, jnp.bfloat16))
  ways = {}
  _emulate(x, [(packed, qs)], _code("nf4"), (n,), k, (1,), ways=ways,
           decode="prmt")  # "prmt" also loads the permute words
  xs = {l: w for l, w in ways.items() if "{xv" in l or "{xu" in l}
  words = {l: w for l, w in ways.items() if "{tw0" in l}
  weights = {l: w for l, w in ways.items() if "{wA" in l or "{wB" in l}
  assert len(xs) == 8 * (1 + (m > 8)) and len(words) == 1
  assert len(weights) == 4
  assert set(xs.values()) == set(words.values()) == {1}, (xs, words)
  assert max(weights.values()) <= 2, weights


@pytest.mark.parametrize("which", ["build", "step_bf16", "step_f16",
                                   "step_m16", "build_k4", "step_m16_k4",
                                   "build_lds", "step_m16_lds",
                                   "step_f16_lds", "build_early",
                                   "build_lds_early"])
def test_ptx_assembles_for_sm90a(tmp_path, which):
  """The blocks assemble with `ptxas -arch=sm_90a` (Triton's copy; the
  test skips where Triton is not installed)."""
  ptxas = _ptxas()
  if ptxas is None:
    pytest.skip("no ptxas: Triton is not installed")
  early = which.endswith("_early")
  which = which.removesuffix("_early")
  kchunks = 4 if which.endswith("_k4") else 1
  decode = "lds" if which.endswith("_lds") else "prmt"
  if which.startswith("build"):
    src = _entry(wt.build_ptx(_code("nf4"), "bfloat16", 8, 14336, 4096, 1792,
                              512, 896, kchunks=kchunks, decode=decode,
                              early=early),
                 ["r"] * 4 + ["l"] * 4)
  else:
    src = _entry(wt.step_ptx(_code("nf4"), "float16"
                             if which.startswith("step_f16") else "bfloat16",
                             16 if which.startswith("step_m16") else 5,
                             14336, 4096, 14, 14336, kchunks=kchunks,
                             decode=decode),
                 ["r"] * (6 + (kchunks > 1)) + ["l"])
  _assert_assembles(ptxas, src, tmp_path / which)


@pytest.mark.parametrize("m,warps,kchunks,decode", [
    (4, 8, 1, "prmt"), (16, 12, 1, "prmt"), (8, 12, 1, "prmt"),
    (8, 8, 2, "prmt"), (16, 8, 4, "prmt"), (16, 8, 1, "lds"),
    (8, 12, 2, "lds")])
def test_lowers_for_cuda(m, warps, kchunks, decode):
  """The kernel lowers to a Mosaic GPU module (needs JAX's CUDA plugin),
  with 2 or 3 compute warpgroups, 1, 2 or 4 K chunks a program and
  either decode."""
  assert "mosaic_gpu" in _util.lowered_gemv_4bit(
      ("warp_tma", 64, 128, 2, warps, 4, kchunks, decode), m)


@pytest.mark.parametrize("alloc_first,early_max_m", [(False, 0), (True, 0),
                                                     (True, 16)])
def test_lowers_for_cuda_with_the_pipeline_allocated_first(alloc_first,
                                                           early_max_m,
                                                           monkeypatch):
  """With `gemv_4bit_lut.ALLOC_FIRST` (the pipeline's buffers allocated
  before the build, which this kernel's body shares; the default) or
  without, and with the TMA warpgroup past the build (`EARLY_MAX_M`) or
  not, it lowers."""
  monkeypatch.setattr(lg, "ALLOC_FIRST", alloc_first)
  monkeypatch.setattr(wt, "EARLY_MAX_M", early_max_m)
  monkeypatch.setattr(wt, "EARLY_SMALL_ELEMENTS", 0)
  gk.gemv_4bit.clear_cache()  # its traces are keyed by arguments only
  text = _util.lowered_gemv_4bit(("warp_tma", 64, 128, 2, 8, 4, 2, "lds"), 8)
  assert "mosaic_gpu" in text
  assert ("WT_BUILT" in text) == (early_max_m >= 8)


@pytest.mark.parametrize("m,n,k,skips", [
    (2, 4096, 4096, True), (8, 4096, 4096, True), (9, 4096, 4096, False),
    (16, 4096, 4096, False), (16, 1024, 4096, True), (9, 1000, 2048, True),
    (16, 3072, 4096, True), (16, 3584, 4096, False), (12, 6144, 2048, True),
    (12, 6144, 2304, False)])
def test_default_skips_the_build_up_to_early_max_m(m, n, k, skips,
                                                   monkeypatch):
  """By default the TMA warpgroup branches past the build for launches of
  at most `EARLY_MAX_M` (8) rows of x, where it was measured faster, and
  up to 16 rows for weights of at most 3072 x 4096 elements
  (`EARLY_SMALL_ELEMENTS`); it waits at the build's barrier otherwise
  (M = 12 and 16 were slower on 4096x4096 and the larger weights). Both
  bounds at 0 turn it off."""
  assert wt.EARLY_MAX_M == 8 and wt.EARLY_SMALL_ELEMENTS == 3072 * 4096
  assert wt.skips_build(m, (n,), k) == skips
  config = ("warp_tma", 64, 128, 2, 8, 4, 1, "lds")
  gk.gemv_4bit.clear_cache()
  text = _util.lowered_gemv_4bit(config, m, n, k)
  assert ("WT_BUILT" in text) == skips
  monkeypatch.setattr(wt, "EARLY_MAX_M", 0)
  monkeypatch.setattr(wt, "EARLY_SMALL_ELEMENTS", 0)
  gk.gemv_4bit.clear_cache()
  assert "WT_BUILT" not in _util.lowered_gemv_4bit(config, m, n, k)
  gk.gemv_4bit.clear_cache()


def test_skips_build_counts_every_weight_of_the_launch():
  """`skips_build` past `EARLY_MAX_M` rows counts the launch's weights
  together: q/k/v of Llama-3-8B (6,144 rows) wait at 16 rows, and so do
  three weights of 2048, 1024 and 1024 rows, where the 2048-row weight
  alone does not; Llama-3.2-1B's q/k/v (3,072 rows of 2048) skip it,
  Llama-3.2-3B's (5,120 rows of 3072) wait and its o (3072x3072) skips."""
  assert wt.skips_build(16, (2048,), 4096)
  assert not wt.skips_build(16, (3072, 1024, 1024), 3072)
  assert wt.skips_build(16, (3072,), 3072)
  assert not wt.skips_build(16, (4096, 1024, 1024), 4096)
  assert not wt.skips_build(16, (2048, 1024, 1024), 4096)
  assert wt.skips_build(16, (2048, 512, 512), 2048)
  assert wt.skips_build(16, (512, 512), 4096)
  assert not wt.skips_build(17, (512,), 1024)
  helpers.assert_docstring_examples_pass(wt.skips_build, "skips_build")


_GPU_CASES = [(2, (14336,), 4096), (8, (4096,), 4096), (5, (1000,), 2048),
              (8, (14336, 14336), 4096), (4, (4096, 1024, 1024), 4096),
              (3, (4096,), 14336), (16, (14336,), 4096), (11, (1000,), 2048),
              # k past whole 1024s: Llama-2-7B's down, Qwen2.5-7B's MLP
              (2, (4096,), 11008), (8, (18944, 18944), 3584),
              (16, (5120,), 13824)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(_GPU_CASES)))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_matches_weight(case, dtype):
  """The compiled kernel against the documented weight, through
  `gemv_4bit_group` as the model calls it."""
  m, ns, k = _GPU_CASES[case]
  made = [_weights(n, k, "nf4", dtype, n + g) for g, n in enumerate(ns)]
  x = jnp.asarray(_util.rng_array((m, k), 21, dtype))
  cfg = gk.gemv_4bit_warp_tma.default_config(ns, k)
  if gk.warp_tma_serves(m, ns, k, 64, dtype, True, 256, _code("nf4"),
                        interpret=False):
    config = None  # the default
  else:
    config = ("warp_tma", 64, 128, cfg["rows"], 8, cfg["stages"])
  ys = gk.gemv_4bit_group(
      x, tuple((p.reshape(-1), q.absmax, _nested(q)) for p, q in made),
      jnp.asarray(codebooks.code_for("nf4")), ns=ns, k=k, blocksize=64,
      config=config, code=_code("nf4"))
  for y, (p, q) in zip(ys, made):
    _check(y, x, p, q)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [0, 3, 4, 6, 7])
def test_gpu_lds_decode_matches_weight(case):
  """Compiled with the "lds" decode (config's eighth entry), through
  `gemv_4bit_group`, against the documented weight."""
  m, ns, k = _GPU_CASES[case]
  made = [_weights(n, k, "nf4", jnp.bfloat16, 3 * n + g)
          for g, n in enumerate(ns)]
  x = jnp.asarray(_util.rng_array((m, k), 25, jnp.bfloat16))
  cfg = gk.gemv_4bit_warp_tma.default_config(ns, k, decode="lds")
  ys = gk.gemv_4bit_group(
      x, tuple((p.reshape(-1), q.absmax, _nested(q)) for p, q in made),
      jnp.asarray(codebooks.code_for("nf4")), ns=ns, k=k, blocksize=64,
      config=("warp_tma", 64, 128, cfg["rows"], 8, cfg["stages"], 1, "lds"),
      code=_code("nf4"))
  for y, (p, q) in zip(ys, made):
    _check(y, x, p, q)


_GPU_KCHUNK_CASES = [(8, (14336, 14336), 4096, 2), (16, (4096,), 14336, 4),
                     (8, (4096, 1024, 1024), 4096, 4), (11, (1000,), 2048, 2),
                     (3, (4096,), 4096, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(_GPU_KCHUNK_CASES)))
def test_gpu_k_chunks_a_program_match_weight(case):
  """Compiled with 2 or 4 K chunks a program (config's seventh entry),
  through `gemv_4bit_group`, against the documented weight."""
  m, ns, k, kchunks = _GPU_KCHUNK_CASES[case]
  made = [_weights(n, k, "nf4", jnp.bfloat16, 2 * n + g)
          for g, n in enumerate(ns)]
  x = jnp.asarray(_util.rng_array((m, k), 23, jnp.bfloat16))
  cfg = gk.gemv_4bit_warp_tma.default_config(ns, k, kchunks=kchunks)
  ys = gk.gemv_4bit_group(
      x, tuple((p.reshape(-1), q.absmax, _nested(q)) for p, q in made),
      jnp.asarray(codebooks.code_for("nf4")), ns=ns, k=k, blocksize=64,
      config=("warp_tma", 64, 128, cfg["rows"], 8, cfg["stages"], kchunks),
      code=_code("nf4"))
  for y, (p, q) in zip(ys, made):
    _check(y, x, p, q)
