"""pallas_kernels.int8_quant (the decode activations in one program) and
pallas_kernels.int8_matmul.int8_decode (it, then the decode kernel).

The kernel's outputs must be bit-equal to jaxbnb's reference row-wise
quantization (`int8_vectorwise_quant`, itself bit-equal to bitsandbytes)
and to `int8_matmul.outlier_limbs`; `int8_decode` is checked against the
float64 golden value of tests/kernels/int8_matmul_test.py with the "limbs"
bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import reference
from pallas_kernels import int8_matmul as ik
from pallas_kernels import int8_quant as iq
from tests import helpers
from tests.kernels.int8_matmul_test import _check
from tests.kernels.int8_matmul_test import _inputs


def _activations(m, k, dtype, seed):
  """Normal rows with planted outliers at both signs, one exactly at the
  threshold, one just below it, and a row of zeros when m > 2."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)).astype(np.float32)
  x[0, 5] = 9.0
  x[m - 1, k - 1] = -20.5
  x[0, min(17, k - 1)] = 6.0  # |x| >= threshold counts
  x[m // 2, min(40, k - 1)] = 5.99
  if m > 2:
    x[1] = 0.0
  return jnp.asarray(x).astype(dtype)


def _expected(x, threshold, limbs, kp):
  m, k = x.shape
  ca, sca, mask = reference.int8_vectorwise_quant(x.astype(jnp.float16),
                                                  threshold)
  x_out = jnp.where(mask[None, :], x, jnp.zeros((), x.dtype))
  (hi, mid, lo), scale = ik.outlier_limbs(x_out)
  a = jnp.concatenate([jnp.pad(v, ((0, limbs - m), (0, kp - k)))
                       for v in (ca, hi, mid, lo)])
  return a, sca, scale


def _assert_equal(x, threshold, limbs, kp, interpret=True):
  m = x.shape[0]
  a, row, xscale = iq.quantize_decode_activations(
      x, threshold=threshold, limbs=limbs, kp=kp, interpret=interpret)
  want_a, want_row, want_scale = _expected(x, threshold, limbs, kp)
  assert a.shape == (4 * limbs, kp) and a.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(a), np.asarray(want_a))
  np.testing.assert_array_equal(np.asarray(row[:m]), np.asarray(want_row))
  np.testing.assert_array_equal(np.asarray(xscale[:m]),
                                np.asarray(want_scale))


@pytest.mark.parametrize("m,k,dtype,kp", [
    (1, 300, jnp.bfloat16, 512),
    (3, 200, jnp.float16, 256),
    (4, 4096, jnp.bfloat16, 4096),
    (8, 1000, jnp.float32, 1024),
    (16, 512, jnp.bfloat16, 512),
    (11, 96, jnp.float16, 96),
])
def test_interpret_bit_equal_to_reference(m, k, dtype, kp):
  x = _activations(m, k, dtype, seed=m * k)
  _assert_equal(x, 6.0, ik._limb_lanes(m), kp)  # pylint: disable=protected-access


def test_interpret_non_finite_and_thresholds():
  """inf/NaN rows: NaN digit scales, codes as the reference's; other
  thresholds (rounded to float16 as bitsandbytes compares)."""
  x = _activations(5, 256, jnp.float32, seed=3)
  x = x.at[2, 9].set(jnp.inf).at[3, 9].set(jnp.nan).at[4, 100].set(-jnp.inf)
  for threshold in (6.0, 1.5, 3.3333):
    _assert_equal(x, threshold, 8, 256)
  a, row, xscale = iq.quantize_decode_activations(
      x, threshold=6.0, limbs=8, kp=256, interpret=True)
  assert np.isnan(np.asarray(xscale)[[2, 4]]).all()


def test_bad_arguments():
  x = jnp.ones((5, 64), jnp.bfloat16)
  for kw, match in ((dict(threshold=0.0, limbs=8, kp=64), "threshold=0.0"),
                    (dict(threshold=6.0, limbs=4, kp=64), "m=5"),
                    (dict(threshold=6.0, limbs=8, kp=48), "kp=48")):
    with pytest.raises(ValueError, match=match):
      iq.quantize_decode_activations(x, interpret=True, **kw)


@pytest.mark.parametrize("m,n,k,dtype,config", [
    (1, 50, 256, jnp.bfloat16, None),
    (3, 40, 200, jnp.float16, (16, 64, 1, 4, 3)),
    (9, 33, 300, jnp.float32, (32, 32, 2, 4, 3, "limbs")),
    (16, 48, 512, jnp.bfloat16, (16, 64, 2, 4, 3)),
])
def test_interpret_int8_decode(m, n, k, dtype, config):
  x, weight, bias = _inputs(m, n, k, dtype, 6.0, seed=m + k,
                            bias_dtype=dtype)
  y = ik.int8_decode(x, weight.CB, weight.SCB, threshold=6.0, bias=bias,
                     config=config, interpret=True)
  _check(y, x, weight, bias, 6.0, limbs=True)
  # The same as the decode kernel on XLA-quantized inputs, bit for bit.
  ca, sca, mask = reference.int8_vectorwise_quant(x.astype(jnp.float16), 6.0)
  x_out = jnp.where(mask[None], x, 0)
  want = ik.int8_matmul(ca, sca, weight.CB, weight.SCB, dtype=x.dtype,
                        bias=bias, x_outlier=x_out, config=config,
                        interpret=True)
  helpers.assert_bits_equal(y, want)


def test_int8_decode_bad_input():
  x, weight, _ = _inputs(2, 32, 64, jnp.bfloat16, 6.0)
  with pytest.raises(ValueError, match="threshold must be > 0, got 0.0"):
    ik.int8_decode(x, weight.CB, weight.SCB, threshold=0.0, interpret=True)
  with pytest.raises(ValueError, match="config.5. must be 'limbs'.*'skip'"):
    ik.int8_decode(x, weight.CB, weight.SCB, threshold=6.0,
                   config=(16, 32, 1, 4, 3, "skip"), interpret=True)


def test_lowers_for_cuda():
  s = jax.ShapeDtypeStruct
  for m, k in ((1, 4096), (16, 4096 + 96)):
    text = helpers.lowered_for_h200(functools.partial(
        iq.quantize_decode_activations, threshold=6.0,
        limbs=ik._limb_lanes(m), kp=-(-k // 256) * 256),  # pylint: disable=protected-access
        s((m, k), jnp.bfloat16))
    assert "jaxbnb_int8_quantize_decode" in text
    text = helpers.lowered_for_h200(functools.partial(
        ik.int8_decode, threshold=6.0), s((m, k), jnp.bfloat16),
        s((1000, k), jnp.int8), s((1000,), jnp.float32))
    assert "jaxbnb_int8_matmul" in text


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gpu_bit_equal_to_reference(m, dtype):
  x = _activations(m, 4096, dtype, seed=m)
  x = x * jnp.asarray(2.0, dtype) ** jnp.arange(m, dtype=dtype)[:, None]
  _assert_equal(x, 6.0, ik._limb_lanes(m), 4096, interpret=False)  # pylint: disable=protected-access


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16])
def test_gpu_int8_decode_through_matmul_8bit(m):
  x, weight, bias = _inputs(m, 4096, 4096, jnp.bfloat16, 6.0, seed=m,
                            outlier_cols=(3, 700, 701, 2048, 4000),
                            bias_dtype=jnp.bfloat16)
  y = jax.jit(lambda a: F.matmul_8bit(a, weight, bias, threshold=6.0))(x)
  _check(y, x, weight, bias, 6.0, limbs=True)
