"""pallas_kernels.lut_decode: the byte-permute decode, instruction by
instruction (a numpy emulation of the very PTX the GPU runs), against a
table lookup in the compute dtype; and its jnp twin against the same."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb._src.quant import codebooks
from pallas_kernels import _backend
from pallas_kernels import gemv_4bit as gk
from pallas_kernels import lut_decode as ld
from tests import helpers

CASES = [(q, d) for q in ("nf4", "fp4") for d in (jnp.bfloat16, jnp.float16)]


def _code(quant_type):
  return tuple(float(c) for c in codebooks.code_for(quant_type))


def _expected(code, dtype, b, scale):
  """code[nibble] and scale rounded to dtype, product rounded once."""
  dt = np.dtype(jnp.dtype(dtype))
  table = np.asarray(code, np.float32).astype(dt).astype(np.float32)
  s = scale.astype(dt).astype(np.float32)
  return ((table[b >> 4] * s).astype(dt), (table[b & 15] * s).astype(dt))


def _bits(a):
  return np.asarray(a).view(np.uint16)


@pytest.mark.parametrize("quant_type,dtype", CASES)
def test_emulated_ptx_decodes_every_byte(quant_type, dtype):
  code = _code(quant_type)
  rng = np.random.default_rng(0)
  # every byte value in every one of the four positions of a word
  b = np.stack([np.roll(np.arange(256), 37 * j) for j in range(4)],
               -1).astype(np.uint8)
  scale = rng.uniform(0.0, 4.0, b.shape).astype(np.float32)
  scale[:3] = np.asarray([0.0, 1.0, 2.0**-20])[:, None]  # zero, 1, tiny
  sw = np.asarray(ld.scale_words(jnp.asarray(scale), dtype))
  out = np.stack(ld.emulate(code, dtype, b.view(np.uint32)[:, 0],
                            [sw[:, j] for j in range(4)]), -1)
  hi, lo = ld.split_pairs(jnp.asarray(out), dtype)
  want_hi, want_lo = _expected(code, dtype, b.astype(np.int32), scale)
  np.testing.assert_array_equal(_bits(hi), _bits(want_hi))
  np.testing.assert_array_equal(_bits(lo), _bits(want_lo))
  # the jnp twin (interpret mode) gives the same bits
  th, tl = ld.decode_scaled(jnp.asarray(b), jnp.asarray(sw), code, dtype,
                            interpret=True)
  np.testing.assert_array_equal(_bits(th), _bits(want_hi))
  np.testing.assert_array_equal(_bits(tl), _bits(want_lo))


def test_table_words_hold_the_codes():
  code = _code("nf4")
  words = ld.table_words(code, jnp.bfloat16)
  raw = np.asarray(words, np.uint32).view(np.uint8)  # little-endian bytes
  bits = raw[:16].astype(np.uint16) | (raw[16:].astype(np.uint16) << 8)
  np.testing.assert_array_equal(
      bits.view(jnp.bfloat16).astype(np.float32),
      np.asarray(code, np.float32).astype(jnp.bfloat16).astype(np.float32))


def test_ptx_is_one_block_per_word():
  """16 byte permutes and 4 products per word; the table words are read
  from operands $9, $13, ..., $37 (one register of each 4-register
  operand under `pack=4`), never moved into place."""
  text = ld.ptx(_code("fp4"), "float16")
  assert text.count("prmt.b32") == 16 and text.count("fma.rn.f16x2") == 4
  assert "bf16x2" in ld.ptx(_code("fp4"), "bfloat16")
  assert "mov.b32 t" not in text
  used = set(re.findall(r"\$(\d+)", text))
  assert {str(9 + 4 * i) for i in range(8)} <= used
  assert not used & {str(9 + 4 * i + j) for i in range(8) for j in (1, 2, 3)}


def test_lowers_for_cuda():
  s = jax.ShapeDtypeStruct
  n, k = 1000, 64 * 70
  for m, cfg in ((1, ("mma", 64, 4, 2, 4, 3, "prmt", False)),
                 (16, ("mma", 128, 8, 1, 4, 3, "prmt", True))):
    f = functools.partial(gk.gemv_4bit, n=n, k=k, blocksize=64, config=cfg,
                          code=_code("nf4"))
    text = helpers.lowered_for_h200(
        lambda x, p, a, l, na, c2, o, f=f: f(x, p, a, l, nested=(na, c2, o)),
        s((m, k), jnp.bfloat16), s((n * k // 2,), jnp.uint8),
        s((n * k // 64,), jnp.uint8), s((16,), jnp.float32),
        s((-(-n * k // 64 // 256),), jnp.float32), s((256,), jnp.float32),
        s((), jnp.float32))
    assert "jaxbnb_gemv_4bit_mma" in text


def test_round_to_dtype_rounds_as_astype_does():
  """`round_to_dtype` gives `astype(dtype)`'s values, float16 subnormals
  included (`lax.reduce_precision` alone would flush those); that XLA keeps
  its rounding inside a kernel is `gemv_4bit_test`'s
  `test_interpret_twin_keeps_the_compute_dtype_rounding`."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_normal(2048),
                      rng.uniform(-2e-5, 2e-5, 2048)]).astype(np.float32)
  for dtype in (jnp.bfloat16, jnp.float16):
    y = np.asarray(jax.jit(lambda v, d=dtype: _backend.round_to_dtype(v, d))(x))
    want = np.asarray(jnp.asarray(x).astype(dtype)).astype(np.float32)
    assert np.any(want != x)
    np.testing.assert_array_equal(y, want)
