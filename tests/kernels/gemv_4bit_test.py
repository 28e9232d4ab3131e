"""pallas_kernels.gemv_4bit against x @ W.T in float64, per element.

W is the weight the kernel documents it multiplies with
(`_util.kernel_weight`: the fp32 code table for float32 inputs, the codes
rounded to bfloat16 for 16-bit inputs, times the fp32 absmax); the bound is
the float32 accumulation over K plus one rounding to the output dtype
(`tests/helpers.matmul_bound`). A single wrong code, absmax or bias element
is far outside it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit as gk
from tests import helpers
from tests.kernels import _util

CASES = [
    # (m, n, k, blocksize, quant_type, dtype, nested, config)
    (1, 40, 256, 64, "nf4", jnp.float32, False, None),
    (3, 70, 64 * 12, 64, "fp4", jnp.bfloat16, True, None),
    (1, 33, 64 * 7, 64, "nf4", jnp.bfloat16, True, ("reduce", 16, 4, 2, 4, 3)),
    (2, 33, 128 * 5, 128, "nf4", jnp.float16, False,
     ("reduce", 16, 2, 2, 4, 3)),
    (5, 70, 64 * 12, 64, "nf4", jnp.bfloat16, True, ("dot", 64, 2, 2, 4, 3)),
    (16, 100, 32 * 10, 32, "fp4", jnp.float16, False, None),
    (9, 64, 64 * 5, 64, "nf4", jnp.bfloat16, True, ("dot", 32, 4, 1, 4, 3)),
    (4, 17, 4096, 4096, "nf4", jnp.float32, False, None),
    # "mma": the byte-permute decode, scaled in the compute dtype
    (1, 70, 64 * 12, 64, "nf4", jnp.bfloat16, True,
     ("mma", 32, 4, 2, 4, 3, "prmt", False)),
    (3, 33, 64 * 7, 64, "fp4", jnp.float16, False,
     ("mma", 16, 2, 2, 4, 3, "prmt", True)),
    (16, 64, 128 * 6, 128, "nf4", jnp.float16, True,
     ("mma", 64, 2, 1, 4, 3, "prmt", False)),
    (40, 100, 32 * 10, 32, "fp4", jnp.bfloat16, False,
     ("mma", 32, 4, 1, 4, 3, "prmt", True)),
    (2, 50, 64 * 9, 64, "nf4", jnp.bfloat16, True,
     ("mma", 16, 1, 2, 4, 3, "prmt", 3)),
    (9, 64, 64 * 5, 64, "nf4", jnp.bfloat16, True,
     ("mma", 32, 2, 1, 4, 3, "nibble", False)),
    # "reduce" with the byte-permute decode: masked rows; unmasked loads;
    # masked K with the prefetching loop
    (1, 70, 64 * 12, 64, "nf4", jnp.bfloat16, True,
     ("reduce", 16, 4, 3, 4, 1, "prmt", 0)),
    (1, 64, 64 * 8, 64, "fp4", jnp.float16, False,
     ("reduce", 16, 2, 4, 4, 1, "prmt", 0)),
    (3, 33, 64 * 7, 64, "nf4", jnp.bfloat16, True,
     ("reduce", 16, 2, 2, 4, 3, "prmt", True)),
    # "warp": tensor-core products from registers (M <= 8): masked rows and
    # a K split that leaves the last program idle steps; unmasked, looping;
    # blocks of 32 (4 a step), 128 (1) and 256 (half of one)
    (1, 70, 128 * 5, 64, "nf4", jnp.bfloat16, True,
     ("warp", 32, 1, 2, 2, 1, "prmt", 0)),
    (2, 64, 128 * 10, 64, "fp4", jnp.float16, False,
     ("warp", 64, 1, 1, 4, 1, "prmt", 0)),
    (3, 40, 128 * 3, 32, "nf4", jnp.bfloat16, False,
     ("warp", 16, 1, 3, 1, 1, "prmt", 0)),
    (8, 48, 128 * 4, 128, "fp4", jnp.bfloat16, True,
     ("warp", 32, 1, 2, 2, 1, "prmt", 0)),
    (5, 33, 256 * 3, 256, "nf4", jnp.float16, True,
     ("warp", 64, 1, 4, 4, 1, "prmt", 0)),
    # M = 65..128's default: "mma", 64-row tiles, prefetch
    (96, 70, 64 * 6, 64, "nf4", jnp.bfloat16, True, None),
]


def _code(quant_type):
  return tuple(float(c) for c in codebooks.code_for(quant_type))


def _call_with_config(m, n, k, nested, blocksize, dtype, config,
                      code="nf4"):
  """`gemv_4bit` in interpret mode on a ones weight `[n, k]` with `config`
  and the 16 values of `code` (None: none given), for the config error
  tests of each variant."""
  packed, qs = F.quantize_4bit(jnp.ones((n, k), jnp.bfloat16),
                               blocksize=blocksize,
                               compress_statistics=nested)
  nest = (qs.nested_absmax, qs.nested_code, qs.offset) if nested else None
  return gk.gemv_4bit(jnp.ones((m, k), dtype), packed.reshape(-1), qs.absmax,
                      jnp.asarray(codebooks.code_for("nf4")), n=n, k=k,
                      blocksize=blocksize, nested=nest, config=config,
                      code=code and _code(code), interpret=True)


def _check(y, x, packed, qs, bias, config=None):
  in_dtype = config is not None and gk.scales_in_compute_dtype(config)
  w = _util.kernel_weight(packed, qs, x.dtype, in_dtype=in_dtype)
  exact, bound = helpers.matmul_bound(x, w, x.dtype, bias=bias)
  helpers.assert_within(y, exact, bound, f"gemv {x.dtype}")
  # The kernel's weight is the reference weight up to the bf16 code table
  # (unit roundoff 2**-8) and the reference's own rounding to the compute
  # dtype (2**-8 bf16, 2**-11 fp16, 2**-24 fp32), relative; "mma" rounds
  # the code, the absmax and their product to the compute dtype (three
  # unit roundoffs against the reference's one).
  w_ref = np.asarray(F.dequantize_4bit(packed, qs).astype(jnp.float32))
  u = {jnp.float32: helpers.F32_EPS / 2, jnp.bfloat16: 2.0**-8,
       jnp.float16: 2.0**-11}[jnp.dtype(x.dtype).type]
  rel = {jnp.float32: helpers.F32_EPS, jnp.bfloat16: 2.0**-7,
         jnp.float16: 2.0**-8 + 2.0**-11}[jnp.dtype(x.dtype).type]
  if in_dtype:
    rel = 4.1 * u
  assert np.all(np.abs(w - w_ref) <= rel * np.abs(w_ref) + 1e-30)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,n,k,blocksize,quant_type,dtype,nested,config",
                         CASES)
def test_interpret_matches_dequant_matmul(m, n, k, blocksize, quant_type,
                                          dtype, nested, config, with_bias):
  w = jnp.asarray(_util.rng_array((n, k), n + k, dtype))
  x = jnp.asarray(_util.rng_array((m, k), m, dtype))
  bias = jnp.asarray(_util.rng_array((n,), 2, dtype)) if with_bias else None
  packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                               compress_statistics=nested)
  nest = (qs.nested_absmax, qs.nested_code, qs.offset) if nested else None
  y = gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                   jnp.asarray(codebooks.code_for(quant_type)), n=n, k=k,
                   blocksize=blocksize, nested=nest, bias=bias, config=config,
                   code=_code(quant_type), interpret=True)
  assert y.shape == (m, n) and y.dtype == dtype
  _check(y, x, packed, qs, bias, config or gk.default_config(
      m, n, k, blocksize, jnp.dtype(dtype).name, mma=True))


def test_pair_table():
  lut = jnp.asarray(codebooks.code_for("nf4"))
  table = np.asarray(gk.pair_table(lut))
  hi = (table >> 16).astype(np.uint32) << 16
  lo = (table & 0xFFFF).astype(np.uint32) << 16
  code = np.asarray(lut.astype(jnp.bfloat16).astype(jnp.float32))
  b = np.arange(256)
  np.testing.assert_array_equal(hi.view(np.float32), code[b >> 4])
  np.testing.assert_array_equal(lo.view(np.float32), code[b & 15])


def test_can_use_and_config():
  assert gk.can_use(1, 4096, 4096, 64, jnp.bfloat16)
  assert not gk.can_use(1, 4096, 4000, 64, jnp.bfloat16)   # K % blocksize
  cfg = gk.default_config(1, 14336, 4096, 64, "bfloat16")
  assert cfg[0] == "reduce"
  assert gk.default_config(16, 14336, 4096, 64, "bfloat16")[0] == "dot"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 33, 64])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 4096 + 64 * 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_matches_dequant_matmul(m, n, k, dtype):
  w = jnp.asarray(_util.rng_array((n, k), 1, dtype))
  x = jnp.asarray(_util.rng_array((m, k), 2, dtype))
  packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
  y = gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                   jnp.asarray(codebooks.code_for("nf4")), n=n, k=k,
                   blocksize=64,
                   nested=(qs.nested_absmax, qs.nested_code, qs.offset))
  _check(y, x, packed, qs, None)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [65, 100, 128])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 4096 + 64 * 3)])
def test_gpu_large_m_default(m, n, k):
  """M = 65..128 in bf16 (served by the GEMV on large weights): the
  default config (64-row "mma" tiles, prefetch), compiled. (fp32 x at
  these M is never sent to the GEMV: its "reduce" default unrolls a row
  loop per x row.)"""
  _check_compiled(m, n, k, jnp.bfloat16, "nf4", None, seed=31)


@pytest.mark.gpu
@pytest.mark.parametrize("m,config", [
    (1, ("reduce", 16, 4, 2, 4, 3, "nibble", True)),
    (3, ("reduce", 8, 2, 4, 8, 2, "pair", True)),
    (2, ("reduce", 8, 8, 1, 4, 3, "nibble", False)),
])
def test_gpu_table_and_prefetch_options(m, config):
  """The opt-in table and prefetch settings, compiled."""
  n, k = 1000, 4096
  w = jnp.asarray(_util.rng_array((n, k), 7, jnp.bfloat16))
  x = jnp.asarray(_util.rng_array((m, k), 8, jnp.bfloat16))
  packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
  y = gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                   jnp.asarray(codebooks.code_for("nf4")), n=n, k=k,
                   blocksize=64,
                   nested=(qs.nested_absmax, qs.nested_code, qs.offset),
                   config=config)
  _check(y, x, packed, qs, None)


@pytest.mark.parametrize("m,config", [
    (1, ("reduce", 16, 4, 2, 4, 3, "nibble", True)),
    (3, ("reduce", 16, 2, 3, 4, 3, "pair", True)),
    (2, ("reduce", 8, 8, 1, 4, 3, "nibble", False)),
])
def test_interpret_table_and_prefetch_options_match(m, config):
  """The 16-entry table and the prefetching loop give the default's bits."""
  n, k = 70, 64 * 12
  w = jnp.asarray(_util.rng_array((n, k), 5, jnp.bfloat16))
  x = jnp.asarray(_util.rng_array((m, k), 6, jnp.bfloat16))
  packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
  nest = (qs.nested_absmax, qs.nested_code, qs.offset)
  call = lambda cfg: gk.gemv_4bit(
      x, packed.reshape(-1), qs.absmax, jnp.asarray(codebooks.code_for("nf4")),
      n=n, k=k, blocksize=64, nested=nest, config=cfg, interpret=True)
  y = call(config)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(call(
      ("reduce",) + config[1:6])))
  _check(y, x, packed, qs, None)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("config", [
    ("mma", 64, 4, 1, 4, 3, "prmt", False),
    ("mma", 64, 2, 2, 4, 3, "prmt", 3),
    ("mma", 32, 2, 2, 4, 3, "nibble", False),
])
@pytest.mark.parametrize("dtype,quant_type", [(jnp.bfloat16, "nf4"),
                                              (jnp.float16, "fp4")])
def test_gpu_mma_variant(m, config, dtype, quant_type):
  """The "mma" variant compiled (the inline-PTX decode on the GPU)."""
  _check_compiled(m, 1000, 4096 + 64 * 3, dtype, quant_type, config, seed=9)


def _check_compiled(m, n, k, dtype, quant_type, config, seed, blocksize=64):
  """The compiled kernel (in-register decode, `code` given, double quant,
  bias) against the documented weight; `config` None: the default."""
  w = jnp.asarray(_util.rng_array((n, k), seed, dtype))
  x = jnp.asarray(_util.rng_array((m, k), seed + 1, dtype))
  bias = jnp.asarray(_util.rng_array((n,), seed + 2, dtype))
  packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                               compress_statistics=True)
  if config is None:
    config = gk.default_config(m, n, k, blocksize, jnp.dtype(dtype).name,
                               mma=True)
  y = gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                   jnp.asarray(codebooks.code_for(quant_type)), n=n, k=k,
                   blocksize=blocksize,
                   nested=(qs.nested_absmax, qs.nested_code, qs.offset),
                   bias=bias, config=config, code=_code(quant_type))
  _check(y, x, packed, qs, bias, config)


@pytest.mark.parametrize("config", [
    ("reduce", 16, 4, 16, 4, 1, "prmt", 0),    # unmasked, one step
    ("reduce", 32, 2, 2, 2, 3, "prmt", True),  # masked rows, prefetch
    None,                                      # M = 1's default
])
def test_reduce_prmt_lowers_for_cuda(config):
  """The in-register decode without tensor cores lowers to Triton."""
  s = jax.ShapeDtypeStruct
  n, k = 1000, 4096
  nkb = k // 64
  fn = functools.partial(gk.gemv_4bit, n=n, k=k, blocksize=64, config=config,
                         code=_code("nf4"))
  text = helpers.lowered_for_h200(
      fn, s((1, k), jnp.bfloat16), s((n * k // 2,), jnp.uint8),
      s((n * nkb,), jnp.uint8), s((16,), jnp.float32),
      nested=(s((-(-n * nkb // 256),), jnp.float32), s((256,), jnp.float32),
              s((), jnp.float32)))
  assert "jaxbnb_gemv_4bit_reduce" in text


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("config", [
    None,
    ("reduce", 16, 4, 16, 4, 1, "prmt", 0),
    ("reduce", 32, 2, 2, 2, 3, "prmt", True),
])
@pytest.mark.parametrize("dtype,quant_type", [(jnp.bfloat16, "nf4"),
                                              (jnp.float16, "fp4")])
def test_gpu_reduce_prmt_variant(m, config, dtype, quant_type):
  """The "reduce" variant with the in-register decode, compiled."""
  _check_compiled(m, 1000, 4096, dtype, quant_type, config, seed=12)


WARP_CONFIGS = [
    (("warp", 64, 1, 8, 4, 1, "prmt", 0), 64),
    (("warp", 32, 1, 3, 2, 1, "prmt", 0), 64),    # idle steps in the last split
    (("warp", 128, 1, 4, 8, 1, "prmt", 0), 128),
    (("warp", 64, 1, 2, 4, 1, "prmt", 0), 32),    # looping (17 steps)
    (("warp", 64, 1, 16, 4, 1, "prmt", 0), 256),
]


@pytest.mark.parametrize("m,k,config,match", [
    (9, 512, ("warp", 64, 1, 1, 4, 1, "prmt", 0),
     "x: variant 'warp' takes 1 to 8 rows, got 9"),
    (2, 448, ("warp", 64, 1, 1, 4, 1, "prmt", 0),
     "k: .*multiple of 128, got 448"),
    (2, 512, ("warp", 48, 1, 1, 4, 1, "prmt", 0), "block_n 48 with 4 warps"),
    (2, 512, ("warp", 64, 1, 1, 4, 1, "nibble", 0),
     "needs table 'prmt', got 'nibble'"),
])
def test_warp_config_errors_name_the_argument(m, k, config, match):
  n = 64
  packed, qs = F.quantize_4bit(jnp.ones((n, k), jnp.bfloat16))
  with pytest.raises(ValueError, match=match):
    gk.gemv_4bit(jnp.ones((m, k), jnp.bfloat16), packed.reshape(-1),
                 qs.absmax, jnp.asarray(codebooks.code_for("nf4")), n=n, k=k,
                 blocksize=64, config=config, code=_code("nf4"),
                 interpret=True)


@pytest.mark.parametrize("config,blocksize", WARP_CONFIGS[:2])
def test_warp_lowers_for_cuda(config, blocksize):
  """The "warp" variant lowers to Triton, with the warp-wide MMA."""
  s = jax.ShapeDtypeStruct
  n, k, m = 1000, 4352, 3
  nkb = k // blocksize
  fn = functools.partial(gk.gemv_4bit, n=n, k=k, blocksize=blocksize,
                         config=config, code=_code("nf4"))
  text = helpers.lowered_for_h200(
      fn, s((m, k), jnp.bfloat16), s((n * k // 2,), jnp.uint8),
      s((n * nkb,), jnp.uint8), s((16,), jnp.float32),
      nested=(s((-(-n * nkb // 256),), jnp.float32), s((256,), jnp.float32),
              s((), jnp.float32)))
  assert "jaxbnb_gemv_4bit_warp" in text
  assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("config,blocksize", WARP_CONFIGS)
@pytest.mark.parametrize("dtype,quant_type", [(jnp.bfloat16, "nf4"),
                                              (jnp.float16, "fp4")])
def test_gpu_warp_variant(m, config, blocksize, dtype, quant_type):
  """The "warp" variant compiled: its lane layout is Triton's choice, and
  only the GPU shows that it is the one `warp_mma` assumes."""
  _check_compiled(m, 1000, 4352, dtype, quant_type, config, seed=21,
                  blocksize=blocksize)


@pytest.mark.parametrize("folds", [0, gk._FOLDS])
def test_interpret_twin_keeps_the_compute_dtype_rounding(folds, monkeypatch):
  """A shape and tile where XLA dropped the twin's f32 -> bf16 -> f32 round
  trip (its excess-precision rule) when the products were accumulated
  one element at a time (`folds` 0; the FMA chains of the default did not
  trigger it): the result must still be the product of `x` and the weight
  rounded to bfloat16 (`_backend.round_to_dtype`)."""
  monkeypatch.setattr(gk, "_FOLDS", folds)
  jax.clear_caches()  # `_FOLDS` is read when the kernel is traced
  n, k = 64, 512
  w = jnp.asarray(_util.rng_array((n, k), 0, jnp.bfloat16))
  x = jnp.asarray(_util.rng_array((1, k), 1, jnp.bfloat16))
  packed, qs = F.quantize_4bit(w, quant_type="nf4")
  config = ("reduce", 32, 8, 1, 4, 1, "prmt", 0)
  y = gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                   jnp.asarray(codebooks.code_for("nf4")), n=n, k=k,
                   blocksize=64, config=config, code=_code("nf4"),
                   interpret=True)
  jax.clear_caches()
  _check(y, x, packed, qs, None, config)


# ---------------------------------------------------------------------------
# Several weights sharing x in one launch (a layer's q/k/v, gate/up).

GROUP_NS = (40, 24, 72)  # none a multiple of the tiles below


def _group_weights(ns, k, quant_type, dtype, nested, seed):
  out = []
  for g, n in enumerate(ns):
    w = jnp.asarray(_util.rng_array((n, k), seed + g, dtype))
    packed, qs = F.quantize_4bit(w, quant_type=quant_type,
                                 compress_statistics=nested)
    nest = (qs.nested_absmax, qs.nested_code, qs.offset) if nested else None
    out.append((packed, qs, (packed.reshape(-1), qs.absmax, nest)))
  return out


@pytest.mark.parametrize("m,dtype,nested,config", [
    (1, jnp.bfloat16, True, ("reduce", 16, 4, 3, 4, 1, "prmt", 0)),
    (2, jnp.float16, False, ("reduce", 16, 2, 2, 4, 3, "prmt", True)),
    (1, jnp.float32, True, ("reduce", 16, 4, 2, 4, 3, "nibble", False)),
    (8, jnp.bfloat16, True, ("mma", 32, 2, 2, 4, 3, "prmt", 1)),
    (16, jnp.bfloat16, False, ("mma", 64, 4, 1, 4, 3, "prmt", False)),
    (5, jnp.float16, True, ("dot", 32, 2, 2, 4, 3)),
    (3, jnp.bfloat16, True, ("warp", 32, 1, 2, 2, 1, "prmt", 0)),
])
def test_interpret_group_equals_one_call_per_weight(m, dtype, nested, config):
  k = 64 * 12
  ws = _group_weights(GROUP_NS, k, "nf4", dtype, nested, seed=20)
  x = jnp.asarray(_util.rng_array((m, k), 3, dtype))
  lut = jnp.asarray(codebooks.code_for("nf4"))
  ys = gk.gemv_4bit_group(x, tuple(w for _, _, w in ws), lut, ns=GROUP_NS,
                          k=k, blocksize=64, config=config,
                          code=_code("nf4"), interpret=True)
  assert [y.shape for y in ys] == [(m, n) for n in GROUP_NS]
  for y, (packed, qs, (flat, absmax, nest)), n in zip(ys, ws, GROUP_NS):
    one = gk.gemv_4bit(x, flat, absmax, lut, n=n, k=k, blocksize=64,
                       nested=nest, config=config, code=_code("nf4"),
                       interpret=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(one))
    _check(y, x, packed, qs, None, config)


def test_group_mixing_double_quant_is_an_error():
  k = 256
  a = _group_weights((16,), k, "nf4", jnp.bfloat16, True, seed=1)[0][2]
  b = _group_weights((16,), k, "nf4", jnp.bfloat16, False, seed=2)[0][2]
  with pytest.raises(ValueError, match="all double-quantized or none"):
    gk.gemv_4bit_group(jnp.ones((1, k), jnp.bfloat16), (a, b),
                       jnp.asarray(codebooks.code_for("nf4")), ns=(16, 16),
                       k=k, blocksize=64, code=_code("nf4"), interpret=True)


def _qkv_shapes():
  """(ns, k, abstract double-quantized weights) of an 8B layer's q/k/v."""
  s = jax.ShapeDtypeStruct
  ns, k = (4096, 1024, 1024), 4096
  nkb = k // 64
  return ns, k, tuple(
      (s((n * k // 2,), jnp.uint8), s((n * nkb,), jnp.uint8),
       (s((-(-n * nkb // 256),), jnp.float32), s((256,), jnp.float32),
        s((), jnp.float32))) for n in ns)


@pytest.mark.parametrize("m", [1, 8])
def test_group_lowers_for_cuda(m):
  """The grouped grid (one branch per weight) lowers to Triton."""
  s = jax.ShapeDtypeStruct
  ns, k, weights = _qkv_shapes()
  fn = functools.partial(gk.gemv_4bit_group, ns=ns, k=k, blocksize=64,
                         code=_code("nf4"))
  text = helpers.lowered_for_h200(fn, s((m, k), jnp.bfloat16), weights,
                                  s((16,), jnp.float32))
  assert "jaxbnb_gemv_4bit_" in text


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8, 16, 64])
def test_gpu_group_equals_one_call_per_weight(m):
  """Compiled: q/k/v-like weights in one launch, each output the one of
  its own call with the same config, up to the order in which XLA adds the
  split-K partials (a reduction over another output width): at most one
  unit in the last place of the bfloat16 result (seen: 1 value of
  64 x 256 at M = 64)."""
  ns, k = (1000, 256, 256), 4096
  ws = _group_weights(ns, k, "nf4", jnp.bfloat16, True, seed=30)
  x = jnp.asarray(_util.rng_array((m, k), 4, jnp.bfloat16))
  lut = jnp.asarray(codebooks.code_for("nf4"))
  config = gk.default_config(m, sum(ns), k, 64, "bfloat16", mma=True)
  ys = gk.gemv_4bit_group(x, tuple(w for _, _, w in ws), lut, ns=ns, k=k,
                          blocksize=64, code=_code("nf4"))
  for y, (packed, qs, (flat, absmax, nest)), n in zip(ys, ws, ns):
    one = gk.gemv_4bit(x, flat, absmax, lut, n=n, k=k, blocksize=64,
                       nested=nest, config=config, code=_code("nf4"))
    y32, one32 = (np.asarray(v, np.float32) for v in (y, one))
    top = np.maximum(np.abs(y32), np.abs(one32))
    assert np.all(np.abs(y32 - one32) <= helpers.ulp(top, jnp.bfloat16))
    _check(y, x, packed, qs, None, config)
