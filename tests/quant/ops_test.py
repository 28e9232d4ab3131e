"""Property tests of the public quantization ops (jaxbnb.functional).

Error bounds follow bitsandbytes' own test suite (tests/test_functional.py):
`TestQuantize4BitFunctional.test_4bit_quant` (mean + 7 sigma of errors
measured on an RTX 4090), `test_4bit_compressed_stats`,
`Test8BitBlockwiseQuantizeFunctional.test_dynamic_blockwise_quantization`
and `TestLLMInt8Functional.test_integrated_int8_linear_matmul`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import ops
from tests import helpers

DTYPES = {"float32": jnp.float32, "float16": jnp.float16,
          "bfloat16": jnp.bfloat16}
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STORAGES = (jnp.uint8, jnp.int8, jnp.float16, jnp.bfloat16, jnp.float32)

# bitsandbytes test_4bit_quant: (mean, std) of the mean absolute error and
# the mean relative error of a 1024x1024 randn round trip, per blocksize.
# Columns: fp4 err, fp4 rel, nf4 err, nf4 rel.
BNB_4BIT_ERRORS = {
    32: ((.088925, .000091), (.242443, .000330),
         (.067746, .000069), (.189726, .000304)),
    64: ((.096543, .000111), (.260125, .000379),
         (.072798, .000074), (.203339, .000340)),
    128: ((.102969, .000134), (.275817, .000433),
          (.076831, .000091), (.215237, .000391)),
    256: ((.108684, .000182), (.289831, .000497),
          (.080337, .000102), (.226105, .000398)),
    512: ((.114115, .000234), (.302881, .000583),
          (.083547, .000143), (.236079, .000544)),
    1024: ((.119333, .000320), (.315000, .000757),
           (.086610, .000187), (.245370, .000600)),
    2048: ((.124556, .000455), (.326607, .000955),
           (.089592, .000251), (.254163, .000747)),
    4096: ((.129536, .000612), (.337169, .001239),
           (.092547, .000360), (.262473, .000999)),
}


N_SIGMA = 7  # bitsandbytes' own margin


def _stats(quant_type, blocksize):
  """((mean, std) of the abs error, (mean, std) of the rel error)."""
  fp4_err, fp4_rel, nf4_err, nf4_rel = BNB_4BIT_ERRORS[blocksize]
  return (nf4_err, nf4_rel) if quant_type == "nf4" else (fp4_err, fp4_rel)


def _bound(quant_type, blocksize):
  err, rel = _stats(quant_type, blocksize)
  return err[0] + N_SIGMA * err[1], rel[0] + N_SIGMA * rel[1]


def _assert_within_sigma(value, stat, what):
  """|value - mean| < N_SIGMA * std, with all three numbers in the message."""
  mean, std = stat
  assert abs(value - mean) < N_SIGMA * std, (
      f"{what}: {value:.6f} vs bnb mean {mean:.6f} +- {N_SIGMA} x {std:.6f} "
      f"({(value - mean) / std:+.1f} sigma)")


@functools.lru_cache(maxsize=None)
def _randn(shape, dtype_name, seed=0):
  # Drawn in float32, then rounded (as torch.randn(..., dtype=float16) is):
  # jax.random.normal drawn directly in bf16/f16 has visibly thinner tails,
  # which moves the 4-bit error statistics by 15-40 sigma of bnb's table.
  return jax.random.normal(jax.random.key(seed), shape,
                           jnp.float32).astype(DTYPES[dtype_name])


def _u8(packed) -> np.ndarray:
  """The raw bytes of a packed array, whatever its quant_storage."""
  p = jnp.asarray(packed).reshape(-1)
  if p.dtype != jnp.uint8:
    p = jax.lax.bitcast_convert_type(p, jnp.uint8).reshape(-1)
  return np.asarray(p)


def _assert_state_equal(a: F.QuantState, b: F.QuantState):
  for field in ("shape", "dtype", "blocksize", "quant_type", "nested"):
    assert getattr(a, field) == getattr(b, field), field
  for field in ("absmax", "code", "offset", "nested_absmax", "nested_code"):
    x, y = getattr(a, field), getattr(b, field)
    assert (x is None) == (y is None), field
    if x is None:
      continue
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, (field, x.dtype, y.dtype)
    assert x.shape == y.shape, (field, x.shape, y.shape)
    if x.dtype.kind == "f":
      helpers.assert_bits_equal(y, x, err_msg=field)
    else:
      np.testing.assert_array_equal(y, x, err_msg=field)


# --------------------------------------------------------------------------
# 1. Error statistics (bnb test_4bit_quant / test_4bit_compressed_stats)
# --------------------------------------------------------------------------

_ERR_CASES = (
    [("float32", qt, bs) for qt in ("nf4", "fp4") for bs in BLOCKSIZES_4BIT]
    + [("float16", "nf4", 64), ("float16", "fp4", 4096),
       ("bfloat16", "fp4", 64), ("bfloat16", "nf4", 4096)])


@pytest.mark.parametrize("dtype,quant_type,blocksize", _ERR_CASES)
def test_4bit_quant_error_statistics(dtype, quant_type, blocksize):
  a = _randn((1024, 1024), dtype)
  packed, qs = F.quantize_4bit(a, blocksize=blocksize, quant_type=quant_type)
  # bnb's test goes through the packed state dict, so does this one.
  qs = F.QuantState.from_dict(qs.as_dict(packed=True))
  out = F.dequantize_4bit(packed, qs)
  assert out.dtype == a.dtype and out.shape == a.shape
  err, rel = helpers.error_stats(a, out)
  # Two-sided: bnb's test only bounds the error from above, but a fixed-seed
  # N(0, 1) draw of 2**20 values lands within a few sigma of bnb's measured
  # mean on both sides (here within 2), so an error that is too small (a
  # wrong code book, values not really quantized) fails as well as one
  # that is too large (a threshold off by a little, a wrong absmax).
  err_stat, rel_stat = _stats(quant_type, blocksize)
  _assert_within_sigma(err, err_stat, f"{quant_type} bs={blocksize} err")
  _assert_within_sigma(rel, rel_stat, f"{quant_type} bs={blocksize} relerr")


@pytest.mark.parametrize("dtype,blocksize,quant_type", [
    ("float32", 32, "nf4"), ("float32", 64, "fp4"), ("float32", 128, "fp4"),
    ("float16", 128, "nf4"), ("float16", 32, "fp4")])
def test_4bit_compressed_stats(dtype, blocksize, quant_type):
  a = _randn((1024, 1024), dtype)
  packed, qs = F.quantize_4bit(a, blocksize=blocksize, quant_type=quant_type,
                               compress_statistics=True)
  assert qs.nested and qs.absmax.dtype == jnp.uint8
  err, rel = helpers.error_stats(a, F.dequantize_4bit(packed, qs))
  # bnb's test_4bit_compressed_stats bounds.
  assert err < 0.11, err
  assert rel < 0.28, rel
  # Double quantization changes only the dequantization scale, never the
  # codes: the codes are those of plain quantization, bit for bit.
  packed0, qs0 = F.quantize_4bit(a, blocksize=blocksize, quant_type=quant_type)
  np.testing.assert_array_equal(_u8(packed), _u8(packed0))
  # The reconstructed absmax is within half a gap of the signed dynamic map
  # (around the coded value) times the block's nested absmax, plus the two
  # fp32 roundings of `code * nested_absmax + offset`.
  plain = np.asarray(qs0.absmax, np.float64)
  recon = np.asarray(ops.float_absmax(qs), np.float64)
  code = np.asarray(qs.nested_code, np.float64)
  q = np.asarray(qs.absmax, np.int64)
  scale = np.repeat(np.asarray(qs.nested_absmax, np.float64), 256)[:q.size]
  gap = np.maximum(np.diff(code, prepend=code[0])[q],
                   np.diff(code, append=code[-1])[q])
  bound = gap / 2 * scale + 2 * np.spacing(recon.astype(np.float32))
  assert np.all(np.abs(recon - plain) <= bound), np.max(
      np.abs(recon - plain) - bound)
  # So the mean error moves from the plain one by at most the mean absmax
  # change (|code| <= 1), plus one output rounding for 16-bit dtypes.
  err0, rel0 = helpers.error_stats(a, F.dequantize_4bit(packed0, qs0))
  shift = np.repeat(np.abs(recon - plain), blocksize)[:a.size].mean()
  eps = float(jnp.finfo(a.dtype).eps) if dtype != "float32" else 0.0
  assert abs(err - err0) <= shift + eps * np.abs(np.asarray(
      a, np.float64)).mean(), (err, err0, shift)
  _assert_within_sigma(err0, _stats(quant_type, blocksize)[0], "plain err")


# --------------------------------------------------------------------------
# 2. 8-bit blockwise error bounds (bnb test_dynamic_blockwise_quantization)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,blocksize,nested", [
    ("float32", 64, False), ("float32", 4096, True), ("bfloat16", 256, True),
    ("float16", 1024, False)])
def test_blockwise_8bit_randn(dtype, blocksize, nested):
  a = _randn((256, 1024), dtype, seed=1)
  q, qs = F.quantize_blockwise(a, blocksize=blocksize, nested=nested)
  assert q.dtype == jnp.uint8 and q.shape == a.shape
  assert qs.nested == nested
  out = F.dequantize_blockwise(q, qs)
  assert out.dtype == a.dtype
  err, rel = helpers.error_stats(a, out)
  assert err < 0.011, err
  assert rel < 0.018, rel


@pytest.mark.parametrize("blocksize,nested", [(64, True), (512, False),
                                              (4096, True)])
def test_blockwise_8bit_rand_unsigned(blocksize, nested):
  a = jax.random.uniform(jax.random.key(2), (256, 1024), jnp.float32)
  code = F.create_dynamic_map(signed=False)
  q, qs = F.quantize_blockwise(a, code=code, blocksize=blocksize,
                               nested=nested)
  out = F.dequantize_blockwise(q, qs)
  err, rel = helpers.error_stats(a, out)
  assert err < 0.0023, err
  assert rel < 0.012, rel


def test_blockwise_8bit_without_state_matches_state():
  a = _randn((64, 128), "float32")
  q, qs = F.quantize_blockwise(a, blocksize=256)
  out = F.dequantize_blockwise(q, absmax=qs.absmax, blocksize=256)
  helpers.assert_bits_equal(out, F.dequantize_blockwise(q, qs))


# --------------------------------------------------------------------------
# 3. Round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,quant_type,nested", [
    ("float32", "nf4", False), ("float32", "fp4", True),
    ("float16", "fp4", False), ("float16", "nf4", True),
    ("bfloat16", "nf4", True)])
def test_quant_state_packed_dict_round_trip(dtype, quant_type, nested):
  a = _randn((96, 80), dtype, seed=3)
  packed, qs = F.quantize_4bit(a, blocksize=128, quant_type=quant_type,
                               compress_statistics=nested)
  d = qs.as_dict(packed=True)
  assert all(isinstance(v, np.ndarray) for v in d.values())
  assert f"quant_state.bitsandbytes__{quant_type}" in d
  back = F.QuantState.from_dict(d)
  _assert_state_equal(qs, back)
  if nested:
    assert back.nested_blocksize == qs.nested_blocksize == 256
  helpers.assert_bits_equal(F.dequantize_4bit(packed, back),
                            F.dequantize_4bit(packed, qs))
  # The unpacked dict round-trips too.
  _assert_state_equal(qs, F.QuantState.from_dict(qs.as_dict()))


@pytest.mark.parametrize("nested,storage", [
    (False, jnp.uint8), (True, jnp.uint8), (False, jnp.int8),
    (True, jnp.float16), (True, jnp.bfloat16), (False, jnp.float32)])
def test_params4bit_state_dict_round_trip(nested, storage):
  w = _randn((48, 64), "bfloat16", seed=4)
  p = F.Params4bit.from_float(w, quant_type="nf4", compress_statistics=nested,
                              quant_storage=storage)
  other = F.Params4bit.from_float(_randn((16, 64), "float32", seed=5),
                                  quant_type="fp4")
  state = {**p.state_dict("model.fc1."), **other.state_dict("model.fc10.")}
  assert state["model.fc1.weight"].dtype == np.dtype(jnp.dtype(storage))
  back = F.Params4bit.from_state_dict(state, "model.fc1.")
  assert back.data.dtype == p.data.dtype and back.data.shape == p.data.shape
  np.testing.assert_array_equal(_u8(back.data), _u8(p.data))
  _assert_state_equal(p.quant_state, back.quant_state)
  assert back.shape == (48, 64)
  helpers.assert_bits_equal(back.dequantize(), p.dequantize())
  back10 = F.Params4bit.from_state_dict(state, "model.fc10.")
  assert back10.quant_state.quant_type == "fp4"
  assert back10.shape == (16, 64)


def test_numpy_integer_blocksize_serializes():
  _, qs = F.quantize_4bit(_randn((8, 64), "float32"), blocksize=np.int64(64),
                          quant_type="nf4")
  back = F.QuantState.from_dict(qs.as_dict(packed=True))
  assert back.blocksize == 64 and type(back.blocksize) is int


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quant_storage_is_a_bitcast(quant_type):
  a = _randn((40, 72), "float16", seed=6)
  ref_packed, ref_qs = F.quantize_4bit(a, quant_type=quant_type)
  ref_bytes = _u8(ref_packed)
  ref_out = F.dequantize_4bit(ref_packed, ref_qs)
  for storage in STORAGES:
    packed, qs = F.quantize_4bit(a, quant_type=quant_type,
                                 quant_storage=storage)
    itemsize = jnp.dtype(storage).itemsize
    assert packed.dtype == storage
    assert packed.shape == (a.size // 2 // itemsize, 1)
    np.testing.assert_array_equal(_u8(packed), ref_bytes, err_msg=str(storage))
    helpers.assert_bits_equal(F.dequantize_4bit(packed, qs), ref_out,
                              err_msg=str(storage))


@pytest.mark.parametrize("shape,blocksize,quant_type", [
    ((7,), 64, "nf4"), ((3, 5), 32, "fp4"), ((1, 65), 64, "fp4"),
    ((129,), 64, "nf4")])
def test_odd_element_count_matches_zero_padding(shape, blocksize, quant_type):
  # Padding with one zero changes no absmax and the pad nibble is the code of
  # 0, so the packed bytes of x and [x, 0] must be identical.
  a = _randn(shape, "float32", seed=7)
  n = a.size
  assert n % 2 == 1
  packed, qs = F.quantize_4bit(a, blocksize=blocksize, quant_type=quant_type)
  assert packed.shape == ((n + 1) // 2, 1)
  assert qs.absmax.shape == (-(-n // blocksize),)
  padded = jnp.concatenate([a.reshape(-1), jnp.zeros((1,), a.dtype)])
  packed2, qs2 = F.quantize_4bit(padded, blocksize=blocksize,
                                 quant_type=quant_type)
  np.testing.assert_array_equal(_u8(packed), _u8(packed2))
  helpers.assert_bits_equal(qs.absmax, qs2.absmax)
  out = F.dequantize_4bit(packed, qs)
  assert out.shape == shape
  helpers.assert_bits_equal(out.reshape(-1),
                            F.dequantize_4bit(packed2, qs2)[:n])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("value", [0.3, -2.5, 1e-20])
def test_single_element(value, quant_type):
  # One element: absmax = |x|, scaled value = +-1, which both code books hold.
  a = jnp.full((1, 1), value, jnp.float32)
  packed, qs = F.quantize_4bit(a, quant_type=quant_type)
  assert packed.shape == (1, 1)
  assert qs.absmax.shape == (1,)
  out = F.dequantize_4bit(packed, qs)
  assert out.shape == (1, 1)
  helpers.assert_bits_equal(out, a)


@pytest.mark.parametrize("nested", [False, True])
def test_3d_shape_same_bytes_as_2d(nested):
  a = _randn((4, 6, 64), "bfloat16", seed=8)
  packed, qs = F.quantize_4bit(a, quant_type="nf4",
                               compress_statistics=nested)
  packed2, qs2 = F.quantize_4bit(a.reshape(24, 64), quant_type="nf4",
                                 compress_statistics=nested)
  np.testing.assert_array_equal(_u8(packed), _u8(packed2))
  assert qs.shape == (4, 6, 64) and qs.dtype == "bfloat16"
  out = F.dequantize_4bit(packed, qs)
  assert out.shape == a.shape and out.dtype == a.dtype
  helpers.assert_bits_equal(out.reshape(24, 64),
                            F.dequantize_4bit(packed2, qs2))
  # Round trip of the 3-D state through the packed dict keeps the shape.
  assert F.QuantState.from_dict(qs.as_dict(packed=True)).shape == (4, 6, 64)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [None, 128])
def test_dequantize_4bit_without_quant_state(quant_type, blocksize):
  a = _randn((32, 48), "float16", seed=9)
  packed, qs = F.quantize_4bit(a, blocksize=blocksize, quant_type=quant_type)
  out = F.dequantize_4bit(packed, absmax=qs.absmax, blocksize=blocksize,
                          quant_type=quant_type, shape=(32, 48),
                          dtype=jnp.float16)
  assert out.dtype == jnp.float16 and out.shape == (32, 48)
  helpers.assert_bits_equal(out, F.dequantize_4bit(packed, qs))
  wrapper = F.dequantize_nf4 if quant_type == "nf4" else F.dequantize_fp4
  out2 = wrapper(packed, absmax=qs.absmax, blocksize=blocksize,
                 shape=(32, 48), dtype="float16")
  helpers.assert_bits_equal(out2, out)


# --------------------------------------------------------------------------
# 4. Special values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_zero_input_dequantizes_to_zero(dtype, quant_type, nested):
  a = jnp.zeros((8, 64), DTYPES[dtype])
  packed, qs = F.quantize_4bit(a, quant_type=quant_type,
                               compress_statistics=nested)
  out = np.asarray(F.dequantize_4bit(packed, qs), np.float32)
  assert np.all(out == 0.0), out[out != 0.0]


def test_all_zero_blockwise_8bit_dequantizes_to_zero():
  q, qs = F.quantize_blockwise(jnp.zeros((4, 64)), blocksize=64)
  assert np.all(np.asarray(F.dequantize_blockwise(q, qs)) == 0.0)


def _block_codes(packed, n, blocksize):
  p = _u8(packed)
  codes = np.stack([p >> 4, p & 15], -1).reshape(-1)[:n]
  return codes.reshape(-1, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nan_stays_in_its_block(quant_type):
  bs = 64
  a = _randn((4 * bs,), "float32", seed=10)
  bad = a.at[bs + 5].set(jnp.nan)
  p0, q0 = F.quantize_4bit(a, blocksize=bs, quant_type=quant_type)
  p1, q1 = F.quantize_4bit(bad, blocksize=bs, quant_type=quant_type)
  c0, c1 = _block_codes(p0, a.size, bs), _block_codes(p1, a.size, bs)
  others = [0, 2, 3]
  np.testing.assert_array_equal(c1[others], c0[others])
  helpers.assert_bits_equal(np.asarray(q1.absmax)[others],
                            np.asarray(q0.absmax)[others])
  # NaN is ignored by the absmax (CUDA's fmaxf), so the block's scale is the
  # largest finite magnitude.
  absmax1 = np.asarray(q1.absmax)[1]
  ref = np.max(np.abs(np.delete(np.asarray(a[bs:2 * bs]), 5)))
  assert absmax1 == ref
  out = np.asarray(F.dequantize_4bit(p1, q1))
  np.testing.assert_array_equal(
      out.reshape(4, bs)[others],
      np.asarray(F.dequantize_4bit(p0, q0)).reshape(4, bs)[others])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_inf_makes_block_absmax_inf(quant_type):
  bs = 64
  a = _randn((4 * bs,), "float32", seed=11)
  bad = a.at[2 * bs + 1].set(-jnp.inf)
  p0, q0 = F.quantize_4bit(a, blocksize=bs, quant_type=quant_type)
  p1, q1 = F.quantize_4bit(bad, blocksize=bs, quant_type=quant_type)
  absmax = np.asarray(q1.absmax)
  assert np.isposinf(absmax[2])
  others = [0, 1, 3]
  assert np.all(np.isfinite(absmax[others]))
  helpers.assert_bits_equal(absmax[others], np.asarray(q0.absmax)[others])
  np.testing.assert_array_equal(_block_codes(p1, a.size, bs)[others],
                                _block_codes(p0, a.size, bs)[others])


# --------------------------------------------------------------------------
# 5. jax.jit
# --------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,nested,storage", [
    ("nf4", False, jnp.uint8), ("nf4", True, jnp.uint8),
    ("fp4", False, jnp.bfloat16), ("fp4", True, jnp.float32)])
def test_quantize_under_jit_matches_eager(quant_type, nested, storage):
  a = _randn((64, 96), "bfloat16", seed=12)

  def quant(x):
    return F.quantize_4bit(x, blocksize=128, quant_type=quant_type,
                           compress_statistics=nested, quant_storage=storage)

  packed_e, qs_e = quant(a)
  packed_j, qs_j = jax.jit(quant)(a)
  assert packed_j.dtype == storage and packed_j.shape == packed_e.shape
  np.testing.assert_array_equal(_u8(packed_j), _u8(packed_e))
  # Bit-exact, nested too: the optimization barriers in ops keep XLA from
  # contracting `absmax - mean` or `code * nested_absmax + offset` into an
  # FMA under jit (test_nested_quantize_under_jit_is_bit_exact), so no ulp
  # allowance is needed anywhere here.
  _assert_state_equal(qs_e, qs_j)

  out_e = F.dequantize_4bit(packed_e, qs_e)
  out_j = jax.jit(F.dequantize_4bit)(packed_j, qs_j)
  both = jax.jit(lambda x: F.dequantize_4bit(*quant(x)))(a)
  assert out_j.dtype == both.dtype == jnp.bfloat16
  helpers.assert_bits_equal(out_j, out_e)
  helpers.assert_bits_equal(both, out_e)


def test_nested_dequantize_under_jit_is_bit_exact():
  a = _randn((256, 256), "float32", seed=0)
  packed, qs = F.quantize_4bit(a, blocksize=64, quant_type="nf4",
                               compress_statistics=True)
  helpers.assert_bits_equal(jax.jit(F.dequantize_4bit)(packed, qs),
                            F.dequantize_4bit(packed, qs))


def test_nested_quantize_under_jit_is_bit_exact():
  a = _randn((64, 96), "bfloat16", seed=12)
  f = functools.partial(F.quantize_4bit, blocksize=128, quant_type="nf4",
                        compress_statistics=True)
  _, qs_e = f(a)
  _, qs_j = jax.jit(f)(a)
  _assert_state_equal(qs_e, qs_j)


def test_blockwise_8bit_under_jit_matches_eager():
  a = _randn((32, 128), "float32", seed=13)
  f = lambda x: F.quantize_blockwise(x, blocksize=256, nested=True)
  q_e, qs_e = f(a)
  q_j, qs_j = jax.jit(f)(a)
  np.testing.assert_array_equal(np.asarray(q_j), np.asarray(q_e))
  _assert_state_equal(qs_e, qs_j)
  helpers.assert_bits_equal(jax.jit(F.dequantize_blockwise)(q_j, qs_j),
                            F.dequantize_blockwise(q_e, qs_e))


# --------------------------------------------------------------------------
# 6. Bad input raises a clear error naming the argument
# --------------------------------------------------------------------------

_X = jnp.ones((8, 64), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_non_float_input_raises_type_error(dtype):
  a = jnp.ones((8, 64), dtype)
  with pytest.raises(TypeError, match="`A`"):
    F.quantize_4bit(a)
  with pytest.raises(TypeError, match="`A`"):
    F.quantize_blockwise(a)
  with pytest.raises(TypeError, match="`A`"):
    F.int8_vectorwise_quant(a)


@pytest.mark.parametrize("fn", [F.quantize_4bit, F.quantize_blockwise,
                                F.int8_vectorwise_quant])
def test_empty_input_raises_value_error(fn):
  with pytest.raises(ValueError, match="`A`.*at least one element"):
    fn(jnp.zeros((0, 64), jnp.float32))


@pytest.mark.parametrize("blocksize", [16, 100, True, 8192, 64.5])
def test_bad_blocksize_4bit(blocksize):
  with pytest.raises(ValueError, match="blocksize"):
    F.quantize_4bit(_X, blocksize=blocksize)


@pytest.mark.parametrize("blocksize", [32, 100, True])
def test_bad_blocksize_8bit(blocksize):
  with pytest.raises(ValueError, match="blocksize"):
    F.quantize_blockwise(_X, blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["int4", "NF4", None])
def test_bad_quant_type(quant_type):
  with pytest.raises(ValueError, match="quant_type"):
    F.quantize_4bit(_X, quant_type=quant_type)
  packed, qs = F.quantize_4bit(_X)
  with pytest.raises(ValueError, match="quant_type"):
    F.dequantize_4bit(packed, absmax=qs.absmax, quant_type=quant_type,
                      shape=(8, 64), dtype=jnp.float32)


@pytest.mark.parametrize("n", [2, 6, 10, 130])
def test_float16_storage_needs_even_byte_count(n):
  a = jnp.ones((n,), jnp.float32)
  with pytest.raises(ValueError, match="quant_storage"):
    F.quantize_4bit(a, quant_storage=jnp.float16)
  # uint8 storage always works.
  packed, _ = F.quantize_4bit(a)
  assert packed.shape == ((n + 1) // 2, 1)


def test_float32_storage_needs_multiple_of_4_bytes():
  with pytest.raises(ValueError, match="quant_storage"):
    F.quantize_4bit(jnp.ones((12,)), quant_storage=jnp.float32)


@pytest.mark.parametrize("storage", [jnp.int32, jnp.float64, jnp.bool_])
def test_unsupported_quant_storage(storage):
  with pytest.raises((ValueError, TypeError), match="quant_storage"):
    F.quantize_4bit(_X, quant_storage=storage)


def test_dequantize_4bit_without_state_requires_absmax():
  packed, _ = F.quantize_4bit(_X)
  with pytest.raises(ValueError, match="absmax"):
    F.dequantize_4bit(packed)
  with pytest.raises(ValueError, match="absmax"):
    F.dequantize_4bit(packed, shape=(8, 64), dtype=jnp.float32)


def test_dequantize_4bit_wrong_packed_size():
  packed, qs = F.quantize_4bit(_X)
  with pytest.raises(ValueError, match="packed `A`"):
    F.dequantize_4bit(packed[:-1], qs)


def test_dequantize_4bit_float_packed_input():
  with pytest.raises(TypeError, match="`A`"):
    F.dequantize_4bit(np.ones((4, 1), np.float64), absmax=jnp.ones(1),
                      shape=(8,), dtype=jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8])
def test_dequantize_blockwise_non_uint8_input(dtype):
  with pytest.raises(TypeError, match="`A`"):
    F.dequantize_blockwise(jnp.ones((64,), dtype), absmax=jnp.ones(1),
                           blocksize=64)


def test_dequantize_blockwise_requires_state_or_absmax():
  with pytest.raises(ValueError, match="absmax"):
    F.dequantize_blockwise(jnp.ones((64,), jnp.uint8))


@pytest.mark.parametrize("code_shape", [(16,), (255,), (16, 16)])
def test_quantize_blockwise_bad_code_shape(code_shape):
  with pytest.raises(ValueError, match="`code`"):
    F.quantize_blockwise(_X, code=jnp.zeros(code_shape), blocksize=64)


@pytest.mark.parametrize("threshold", [-1.0, -1e-6, float("nan")])
def test_int8_negative_threshold(threshold):
  with pytest.raises(ValueError, match="threshold"):
    F.int8_vectorwise_quant(_X, threshold)


def _packed_state_dict():
  _, qs = F.quantize_4bit(_X, quant_type="nf4", compress_statistics=True)
  return qs.as_dict(packed=True)


@pytest.mark.parametrize("key", ["absmax", "quant_map", "nested_quant_map"])
def test_from_dict_missing_array(key):
  d = _packed_state_dict()
  del d[key]
  with pytest.raises(ValueError, match=key):
    F.QuantState.from_dict(d)


@pytest.mark.parametrize("key", ["shape", "blocksize", "dtype",
                                 "nested_offset"])
def test_from_dict_missing_json_entry(key):
  d = _packed_state_dict()
  blob_key = "quant_state.bitsandbytes__nf4"
  meta = json.loads(bytes(d[blob_key]).decode())
  del meta[key]
  d[blob_key] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  with pytest.raises(ValueError, match=key):
    F.QuantState.from_dict(d)


def test_from_dict_no_quant_state_entry():
  d = _packed_state_dict()
  del d["quant_state.bitsandbytes__nf4"]
  with pytest.raises(ValueError, match="quant_state"):
    F.QuantState.from_dict(d)


def test_from_dict_two_quant_state_entries():
  d = _packed_state_dict()
  d["quant_state.bitsandbytes__fp4"] = d["quant_state.bitsandbytes__nf4"]
  with pytest.raises(ValueError, match="quant_state"):
    F.QuantState.from_dict(d)


def test_from_dict_bad_quant_state_suffix():
  d = _packed_state_dict()
  d["quant_state.bitsandbytes__int4"] = d.pop("quant_state.bitsandbytes__nf4")
  with pytest.raises(ValueError, match="quant_state"):
    F.QuantState.from_dict(d)


@pytest.mark.parametrize("blob", [b"{not json", b"\xff\xfe\x00", b""])
def test_from_dict_malformed_json(blob):
  d = _packed_state_dict()
  d["quant_state.bitsandbytes__nf4"] = np.frombuffer(blob, np.uint8)
  with pytest.raises(ValueError, match="quant_state"):
    F.QuantState.from_dict(d)


def test_from_dict_absmax_of_wrong_length():
  d = _packed_state_dict()
  d["absmax"] = d["absmax"][:-1]
  with pytest.raises(ValueError, match="absmax"):
    F.QuantState.from_dict(d)


def test_params4bit_truncated_weight():
  p = F.Params4bit.from_float(_X, quant_type="nf4")
  state = p.state_dict("fc.")
  state["fc.weight"] = state["fc.weight"][:-1]
  with pytest.raises(ValueError, match="weight"):
    F.Params4bit.from_state_dict(state, "fc.")


def test_params4bit_missing_weight():
  p = F.Params4bit.from_float(_X, quant_type="nf4")
  state = p.state_dict("fc.")
  with pytest.raises(ValueError, match="weight"):
    F.Params4bit.from_state_dict(state, "fc2.")


# --------------------------------------------------------------------------
# 7. LLM.int8 row-wise quantization
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dtype", [
    ((1, 2, 4), "float16"), ((8, 128, 256), "float16"),
    ((64, 96), "bfloat16"), ((3, 1, 7), "float32")])
def test_int8_vectorwise_quant_within_one(shape, dtype):
  a = _randn(shape, dtype, seed=14)
  ca, stats, cols = F.int8_vectorwise_quant(a)
  assert cols is None
  assert ca.dtype == jnp.int8 and ca.shape == a.shape
  a2 = np.asarray(a, np.float32).reshape(-1, shape[-1])
  absmax = np.max(np.abs(a2), axis=1)
  assert stats.dtype == jnp.float32 and stats.shape == (a2.shape[0],)
  np.testing.assert_array_equal(np.asarray(stats), absmax)
  # Exactly bnb's formula: rint(A * (127 / absmax)) in float32 (reciprocal
  # scale first, round half to even), not merely within one of it.
  scale = (np.float32(127) / absmax).astype(np.float32)
  ref = np.rint((a2 * scale[:, None]).astype(np.float32))
  np.testing.assert_array_equal(
      np.asarray(ca, np.int32).reshape(a2.shape), ref.astype(np.int32))
  # ... which is within one of the exactly rounded a * 127 / absmax.
  exact = np.round(a2.astype(np.float64) * 127 / absmax[:, None])
  assert np.abs(ref - exact).max() <= 1
  # The row maximum maps to exactly +-127.
  assert np.all(np.max(np.abs(np.asarray(ca, np.int32).reshape(a2.shape)),
                       axis=1) == 127)
  # And dequantization is within half a step, plus the float32 rounding of
  # the scale, of the product and of the dequantization (a few ulp of the
  # row absmax).
  deq = np.asarray(F.int8_vectorwise_dequant(ca, stats)).reshape(a2.shape)
  assert np.all(np.abs(deq - a2) <= absmax[:, None] / 127 * 0.5
                + 4 * np.spacing(absmax[:, None]))


def _outlier_matrix(rows=16, cols=64):
  a = np.clip(np.asarray(_randn((rows, cols), "float32", seed=15)), -2.5, 2.5)
  a[3, 5] = 7.0
  a[0, 40] = -9.0
  a[11, 40] = 6.5
  a[7, 63] = 3.0   # exactly at the threshold: |A| >= threshold is an outlier
  return a


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_int8_vectorwise_quant_outliers(dtype):
  a_np = _outlier_matrix()
  a = jnp.asarray(a_np, DTYPES[dtype])
  ca, stats, cols = F.int8_vectorwise_quant(a, threshold=3.0)
  assert cols.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(cols), [5, 40, 63])
  ca = np.asarray(ca, np.int32)
  assert np.all(ca[:, [5, 40, 63]] == 0)
  # The outliers are excluded from the row absmax.
  a32 = np.asarray(a, np.float32)
  masked = np.where(np.abs(a32) >= 3.0, 0.0, np.abs(a32))
  np.testing.assert_array_equal(np.asarray(stats), masked.max(axis=1))
  keep = np.setdiff1d(np.arange(a_np.shape[1]), [5, 40, 63])
  scale = (np.float32(127) / masked.max(axis=1)).astype(np.float32)
  ref = np.rint((a32 * scale[:, None]).astype(np.float32))
  np.testing.assert_array_equal(ca[:, keep], ref[:, keep])
  assert np.any(ca[:, keep] != 0)
  # The mask variant agrees.
  ca2, stats2, mask = F.int8_vectorwise_quant_mask(a, threshold=3.0)
  np.testing.assert_array_equal(np.asarray(ca2, np.int32), ca)
  np.testing.assert_array_equal(np.asarray(stats2), np.asarray(stats))
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(mask)), [5, 40, 63])


def test_int8_vectorwise_quant_single_row_zeroes_only_outliers():
  a = np.asarray([[1.0, -2.0, 8.0, 0.5]], np.float32)
  ca, stats, cols = F.int8_vectorwise_quant(jnp.asarray(a), threshold=6.0)
  np.testing.assert_array_equal(np.asarray(cols), [2])
  np.testing.assert_array_equal(np.asarray(ca), [[64, -127, 0, 32]])
  np.testing.assert_array_equal(np.asarray(stats), [2.0])


def test_int8_vectorwise_quant_no_outliers_with_threshold():
  a = jnp.asarray(np.clip(np.asarray(_randn((8, 32), "float32", seed=16)),
                          -2, 2))
  ca, stats, cols = F.int8_vectorwise_quant(a, threshold=6.0)
  assert cols.shape == (0,)
  ca0, stats0, _ = F.int8_vectorwise_quant(a)
  np.testing.assert_array_equal(np.asarray(ca), np.asarray(ca0))
  np.testing.assert_array_equal(np.asarray(stats), np.asarray(stats0))


def test_int8_vectorwise_quant_mask_under_jit():
  a = jnp.asarray(_outlier_matrix(), jnp.float16)
  f = functools.partial(F.int8_vectorwise_quant_mask, threshold=3.0)
  ca_j, stats_j, mask_j = jax.jit(f)(a)
  ca_e, stats_e, mask_e = f(a)
  np.testing.assert_array_equal(np.asarray(ca_j), np.asarray(ca_e))
  np.testing.assert_array_equal(np.asarray(stats_j), np.asarray(stats_e))
  assert mask_j.dtype == jnp.bool_ and mask_j.shape == (64,)
  np.testing.assert_array_equal(np.asarray(mask_j), np.asarray(mask_e))
  assert int(np.asarray(mask_j).sum()) == 3


def test_int8_vectorwise_quant_under_jit():
  a = jnp.asarray(_outlier_matrix(), jnp.float16)
  # threshold 0: no data-dependent output, jittable.
  ca_j, stats_j, cols = jax.jit(F.int8_vectorwise_quant)(a)
  assert cols is None
  ca_e, stats_e, _ = F.int8_vectorwise_quant(a)
  np.testing.assert_array_equal(np.asarray(ca_j), np.asarray(ca_e))
  np.testing.assert_array_equal(np.asarray(stats_j), np.asarray(stats_e))
  # threshold > 0: the column indices have a data-dependent length.
  with pytest.raises(NotImplementedError, match="int8_vectorwise_quant_mask"):
    jax.jit(lambda x: F.int8_vectorwise_quant(x, 3.0))(a)


def test_int8_vectorwise_dequant_bad_stats():
  ca, stats, _ = F.int8_vectorwise_quant(_X)
  with pytest.raises(ValueError, match="stats"):
    F.int8_vectorwise_dequant(ca, stats[:-1])
  with pytest.raises(TypeError, match="`A`"):
    F.int8_vectorwise_dequant(ca.astype(jnp.int32), stats)


def test_nested_quantization_by_tables_equals_the_search():
  """Double quantization outside the "reference" kernel mode finds each
  nested code with `pallas_kernels.code_tables` (two lookups); the bytes
  equal the reference's binary search, on absmax spread over decades, ties
  and exact map values included, and through `quantize_4bit` end to end."""
  import jaxbnb  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  q = np.asarray(codebooks.create_dynamic_map(signed=True), np.float32)
  absmax = np.concatenate([
      10.0 ** rng.uniform(-6, 2, 3000), q[128:] + 1.0,
      np.full(256, 0.5), np.zeros(256), rng.exponential(1.0, 1000)])
  absmax = jnp.asarray(absmax.astype(np.float32))
  outs = []
  for mode in ("reference", "interpret"):
    with jaxbnb.kernel_mode(mode):
      outs.append(ops._double_quantize(absmax, 256))
  for a, b in zip(outs[0], outs[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = jnp.asarray(rng.standard_normal((64, 512)).astype(np.float32))
  states = []
  for mode in ("reference", "interpret"):
    with jaxbnb.kernel_mode(mode):
      states.append(F.quantize_4bit(x, quant_type="nf4",
                                    compress_statistics=True)[1])
  np.testing.assert_array_equal(np.asarray(states[0].absmax),
                                np.asarray(states[1].absmax))
  np.testing.assert_array_equal(np.asarray(states[0].nested_absmax),
                                np.asarray(states[1].nested_absmax))


# --------------------------------------------------------------------------
# Argument checks of the dequantizers: lengths and dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n_absmax", [3, 7, 9, 100])
def test_dequantize_blockwise_absmax_length(n_absmax):
  q = jnp.zeros((8, 64), jnp.uint8)  # 512 codes, blocksize 64: 8 blocks
  with pytest.raises(ValueError, match=re.escape(
      f"dequantize_blockwise: `absmax` has {n_absmax} entries, expected "
      "ceil(n / blocksize) = ceil(512 / 64) = 8 for 512 codes.")):
    F.dequantize_blockwise(q, absmax=jnp.ones(n_absmax), blocksize=64)
  assert F.dequantize_blockwise(q, absmax=jnp.ones(8), blocksize=64).shape \
      == (8, 64)


@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_blockwise_state_absmax_length(nested):
  q, qs = F.quantize_blockwise(jnp.linspace(-1, 1, 512), blocksize=64,
                               nested=nested)
  for absmax in (qs.absmax[:-1], jnp.concatenate([qs.absmax, qs.absmax])):
    with pytest.raises(ValueError, match=re.escape(
        f"dequantize_blockwise: quant_state.absmax has {absmax.shape[0]} "
        "entries, expected ceil(n / blocksize) = ceil(512 / 64) = 8")):
      F.dequantize_blockwise(q, dataclasses.replace(qs, absmax=absmax))
  with pytest.raises(ValueError, match=re.escape(
      "dequantize_blockwise: quant_state.code must have 256 entries, got "
      "shape (100,).")):
    F.dequantize_blockwise(q, dataclasses.replace(qs, code=qs.code[:100]))
  if nested:
    with pytest.raises(ValueError, match="quant_state.nested_absmax has 0 "
                       "entries, expected ceil"):
      F.dequantize_blockwise(q, dataclasses.replace(
          qs, nested_absmax=qs.nested_absmax[:0]))
  with pytest.raises(TypeError, match="`quant_state` must be a QuantState, "
                     "got dict"):
    F.dequantize_blockwise(q, qs.as_dict())


def test_dequantize_blockwise_code_length():
  q = jnp.zeros((64,), jnp.uint8)
  with pytest.raises(ValueError, match=re.escape(
      "dequantize_blockwise: `code` must have 256 entries, got shape (100,)")):
    F.dequantize_blockwise(q, absmax=jnp.ones(1), code=jnp.zeros(100),
                           blocksize=64)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, "int8", jnp.bool_,
                                   jnp.float64, "foo"])
def test_dequantize_4bit_rejects_a_non_float_dtype(dtype):
  packed, qs = F.quantize_4bit(jnp.full((8, 64), 0.7), quant_type="nf4")
  shown = {"foo": "'foo'"}.get(dtype, jnp.dtype(dtype).name
                               if dtype != "foo" else None)
  with pytest.raises(TypeError, match=re.escape(
      "dequantize_4bit: `dtype` must be one of ('float32', 'float16', "
      f"'bfloat16'), got {shown}.")):
    F.dequantize_4bit(packed, absmax=qs.absmax, shape=(8, 64), dtype=dtype,
                      quant_type="nf4")
  # A state whose recorded dtype is not a float is refused as well.
  with pytest.raises(TypeError, match=re.escape(
      "`quant_state.dtype` must be one of")):
    F.dequantize_4bit(packed, dataclasses.replace(qs, dtype="int32"))
  out = F.dequantize_4bit(packed, absmax=qs.absmax, shape=(8, 64),
                          dtype="bfloat16", quant_type="nf4")
  assert out.dtype == jnp.bfloat16


def test_dequantize_4bit_table_lengths():
  packed, qs = F.quantize_4bit(jnp.linspace(-1, 1, 64 * 600).reshape(-1, 64),
                               quant_type="nf4", compress_statistics=True)
  with pytest.raises(ValueError, match=re.escape(
      "dequantize_4bit: quant_state.code must have 16 entries, got shape "
      "(256,).")):
    F.dequantize_4bit(packed, dataclasses.replace(qs, code=qs.nested_code))
  with pytest.raises(ValueError, match=re.escape(
      "dequantize_4bit: quant_state.nested_absmax has 2 entries, expected "
      "ceil(600 / nested_blocksize 256) = 3.")):
    F.dequantize_4bit(packed, dataclasses.replace(
        qs, nested_absmax=qs.nested_absmax[:2]))
  with pytest.raises(ValueError, match=re.escape(
      "quant_state.nested_code must have 256 entries, got (100,).")):
    F.dequantize_4bit(packed, dataclasses.replace(
        qs, nested_code=qs.nested_code[:100]))
  with pytest.raises(TypeError, match="`quant_state` must be a QuantState"):
    F.dequantize_4bit(packed, qs.as_dict(packed=True))


def test_bad_arguments_found_by_the_audit_name_the_argument():
  """Each of these gave a raw XLA/numpy error or a silent wrong result."""
  x = jnp.ones((3, 64), jnp.float32)
  packed, qs = F.quantize_4bit(jnp.ones((16, 64)), quant_type="nf4")
  with pytest.raises(TypeError, match=r"matmul_4bit: `dtype` must be one of "
                     r"\('float32', 'float16', 'bfloat16'\), got int8"):
    F.matmul_4bit(x, packed, qs, dtype=jnp.int8)
  with pytest.raises(ValueError, match=r"matmul_4bit: packed `B` has 510 "
                     r"bytes, expected \(n \+ 1\) // 2 = 512"):
    F.matmul_4bit(x, packed[:-2], qs)
  acc = jnp.ones((2, 3), jnp.int32)
  row, col = jnp.ones(2), jnp.ones(3)
  with pytest.raises(ValueError, match=r"`row_stats` must have one entry per "
                     r"row of `A` \(2\), got shape \(3,\)"):
    F.int8_mm_dequant(acc, col, col)
  with pytest.raises(ValueError, match=r"`col_stats` must have one entry per "
                     r"column of `A` \(3\), got shape \(2,\)"):
    F.int8_mm_dequant(acc, row, row)
  for bias in (jnp.ones(1), jnp.ones(2)):
    with pytest.raises(ValueError, match=r"`bias` must have shape \(3,\)"):
      F.int8_mm_dequant(acc, row, col, bias)
  assert F.int8_mm_dequant(acc, row, col, jnp.ones(3)).shape == (2, 3)
  p4, qs4 = F.quantize_4bit(jnp.ones(512), quant_type="fp4")
  with pytest.raises(ValueError, match=r"dequantize_blockwise: `quant_state` "
                     r"is a 4-bit \(fp4\) state .* dequantize_4bit"):
    F.dequantize_blockwise(p4, qs4)
  with pytest.raises(ValueError, match=r"int8_vectorwise_quant: `A` must have "
                     "at least one dimension"):
    F.int8_vectorwise_quant(jnp.float16(1.0))


def test_create_linear_map_past_8_bits_as_bitsandbytes():
  """bnb returns 2**bits values (less one when signed), no padding."""
  assert F.create_linear_map(True, 9).shape == (511,)
  assert F.create_linear_map(False, 9).shape == (512,)
  np.testing.assert_array_equal(F.create_linear_map(False, 9)[[0, -1]],
                                [0.0, 1.0])
