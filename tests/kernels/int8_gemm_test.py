"""pallas_kernels.int8_gemm (LLM.int8 forward at prefill sizes) against
bitsandbytes' semantics computed independently in numpy.

The golden value and its bound are int8_matmul_test's: bit-exact without
outliers; with outliers within the float32 summation-order bound of the
exact sum (the kernel adds the gathered outlier products in float32 in the
tensor cores' order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb import functional as F
from jaxbnb._src.quant import reference
from pallas_kernels import int8_gemm as ig
from tests import helpers
from tests.kernels.int8_matmul_test import _check
from tests.kernels.int8_matmul_test import _golden
from tests.kernels.int8_matmul_test import _inputs
from tests.kernels.int8_matmul_test import spy_gemm


def _call(x, weight, bias, threshold, config=None, interpret=True,
          slots=64):
  ca, sca, mask = reference.int8_vectorwise_quant(
      x.astype(jnp.float16), threshold)
  return ig.int8_gemm(ca, sca, weight.CB, weight.SCB, dtype=x.dtype,
                      bias=bias, x=None if mask is None else x,
                      outlier_cols=mask, slots=slots, config=config,
                      interpret=interpret)


CASES = [
    # (m, n, k, dtype, threshold, bias dtype, config)
    (40, 50, 200, jnp.float16, 6.0, jnp.float16, (16, 32, 32, 2, 4, 3)),
    (33, 64, 128, jnp.bfloat16, 0.0, None, (32, 32, 64, 8, 4, 3)),
    (20, 70, 96, jnp.float32, 6.0, jnp.float32, (16, 64, 32, 1, 4, 3)),
    (64, 64, 256, jnp.bfloat16, 6.0, jnp.bfloat16, (64, 64, 128, 8, 4, 3)),
    (17, 48, 64, jnp.bfloat16, 6.0, jnp.float16, None),
    (100, 24, 160, jnp.float16, 0.0, jnp.float32, (32, 16, 64, 3, 4, 3)),
]


@pytest.mark.parametrize("m,n,k,dtype,threshold,bias_dtype,config", CASES)
def test_interpret_matches_bnb_semantics(m, n, k, dtype, threshold,
                                         bias_dtype, config):
  x, weight, bias = _inputs(m, n, k, dtype, threshold, seed=m + n,
                            bias_dtype=bias_dtype)
  y = _call(x, weight, bias, threshold, config)
  _check(y, x, weight, bias, threshold)


def test_interpret_unused_outlier_slots_add_nothing():
  """Fewer outlier columns than slots, and none at all: the zero slots
  leave the bit-exact int8 result alone."""
  x, weight, bias = _inputs(24, 40, 96, jnp.bfloat16, 0.0, seed=11,
                            bias_dtype=jnp.bfloat16)
  x = jnp.clip(x, -5.0, 5.0)
  y = _call(x, weight, bias, 6.0, (16, 32, 32, 2, 4, 3))
  with jaxbnb.kernel_mode("reference"):
    ref = F.matmul_8bit(x, weight, bias, threshold=6.0)
  helpers.assert_bits_equal(y, ref)


def test_default_config_and_can_use():
  assert ig.default_config(4096, 14336, 4096) == (128, 128, 128, 8, 4, 3)
  assert ig.default_config(32, 14336, 4096)[0] == 64
  assert ig.default_config(32, 8, 40)[2] == 32
  assert ig.can_use(4096, 14336, 4096, jnp.bfloat16)
  assert not ig.can_use(4096, 14336, 2**17, jnp.bfloat16)
  assert not ig.can_use(4096, 64, 64, jnp.int8)


# ---------------------------------------------------------------------------
# dispatch from jaxbnb.functional.matmul_8bit (M > 16)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [2, 3, 16])
def test_interpret_overflowing_slots(slots):
  """More outlier columns than slots: the masked product over the flagged
  K tiles; as many as slots: the gathered product. Both bnb's result."""
  x, weight, bias = _inputs(24, 40, 160, jnp.float16, 6.0, seed=slots,
                            outlier_cols=(3, 70, 71), bias_dtype=jnp.float16)
  y = _call(x, weight, bias, 6.0, (16, 32, 32, 2, 4, 3), slots=slots)
  _check(y, x, weight, bias, 6.0)


def test_more_outlier_columns_than_slots_through_matmul_8bit(monkeypatch):
  """70 outlier columns (> 32 slots) through `matmul_8bit`: the overflow
  kernel's masked product over the flagged K tiles, still bitsandbytes'
  result; the XLA reference takes its masked path too (> 64 columns)."""
  calls = spy_gemm(monkeypatch)
  x, weight, bias = _inputs(20, 32, 128, jnp.float32, 6.0, seed=3,
                            outlier_cols=tuple(range(0, 140, 2)),
                            bias_dtype=jnp.float32)
  assert int(jnp.sum(jnp.any(jnp.abs(x) >= 6.0, axis=0))) == 64
  x = x.at[1, 1:13:2].set(9.0)  # 6 more outlier columns: 70 in all
  with jaxbnb.kernel_mode("interpret"):
    y = jax.jit(lambda a: F.matmul_8bit(a, weight, bias, threshold=6.0))(x)
  assert calls == [(True, True)]
  _check(y, x, weight, bias, 6.0)
  with jaxbnb.kernel_mode("reference"):
    ref = F.matmul_8bit(x, weight, bias, threshold=6.0)
  _, bound, _ = _golden(x, weight.CB, weight.SCB, bias, 6.0)
  helpers.assert_within(y, np.asarray(ref, np.float64), 2 * bound)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_fp16_weights_forward_and_grads_through_the_kernel(monkeypatch,
                                                           threshold):
  """`matmul_8bit_fp16_weights` (a trainable float weight quantized in each
  call) runs its forward through int8_gemm; values and gradients match the
  XLA path."""
  calls = spy_gemm(monkeypatch)
  x, _, bias = _inputs(24, 40, 96, jnp.float32, threshold, seed=6,
                       bias_dtype=jnp.float32)
  w = jnp.asarray(np.random.default_rng(6).standard_normal((40, 96)),
                  jnp.float32) * 0.05

  def loss(a, w, b):
    return jnp.sum(F.matmul_8bit_fp16_weights(a, w, b,
                                              threshold=threshold) ** 2)

  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_8bit_fp16_weights(x, w, bias, threshold=threshold)
    grads = jax.grad(loss, argnums=(0, 1, 2))(x, w, bias)
  assert calls and all(c == (True, threshold > 0) for c in calls)
  with jaxbnb.kernel_mode("reference"):
    ref = F.matmul_8bit_fp16_weights(x, w, bias, threshold=threshold)
    ref_grads = jax.grad(loss, argnums=(0, 1, 2))(x, w, bias)
  if threshold == 0.0:
    helpers.assert_bits_equal(y, ref)
  else:
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_lowers_for_cuda():
  s = jax.ShapeDtypeStruct
  m, n, k = 300, 1000, 4096 + 96
  args = (s((m, k), jnp.int8), s((m,), jnp.float32), s((n, k), jnp.int8),
          s((n,), jnp.float32))
  kw = dict(bias=s((n,), jnp.float16), x=s((m, k), jnp.float16),
            outlier_cols=s((k,), jnp.bool_))
  text = helpers.lowered_for_h200(
      functools.partial(ig.int8_gemm, dtype=jnp.float16), *args, **kw)
  assert "jaxbnb_int8_gemm" in text and "jaxbnb_int8_gemm_overflow" in text


# ---------------------------------------------------------------------------
# compiled on the GPU
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,dtype,threshold,slots", [
    (4096, 4096, 4096, jnp.bfloat16, 0.0, 32),
    (4096, 4096, 4096, jnp.bfloat16, 6.0, 32),
    (300, 1000, 4096 + 96, jnp.bfloat16, 6.0, 32),
    (300, 1000, 4096 + 96, jnp.float16, 6.0, 32),
    (300, 1000, 4096 + 96, jnp.float32, 6.0, 32),
    (300, 1000, 4096 + 96, jnp.float16, 0.0, 32),
    (17, 14336, 4096, jnp.bfloat16, 6.0, 32),
    (300, 1000, 4096 + 96, jnp.bfloat16, 6.0, 2),  # the overflow kernel
])
def test_gpu_matches_bnb_semantics(m, n, k, dtype, threshold, slots):
  x, weight, bias = _inputs(m, n, k, dtype, threshold, seed=m,
                            outlier_cols=(3, 700, 701, 2048, 4000),
                            bias_dtype=dtype)
  y = _call(x, weight, bias, threshold, interpret=False, slots=slots)
  _check(y, x, weight, bias, threshold)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(128, 128, 128, 8, 8, 3),
                                    (128, 256, 64, 8, 8, 4),
                                    (64, 128, 128, 4, 4, 3)])
def test_gpu_configs(config):
  x, weight, bias = _inputs(1000, 1000, 4096, jnp.bfloat16, 6.0, seed=2,
                            outlier_cols=(3, 700, 701, 2048, 4000),
                            bias_dtype=jnp.float16)
  y = _call(x, weight, bias, 6.0, config=config, interpret=False)
  _check(y, x, weight, bias, 6.0)


@pytest.mark.gpu
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_gpu_matmul_8bit_dispatch(monkeypatch, threshold):
  calls = spy_gemm(monkeypatch)
  x, weight, bias = _inputs(512, 4096, 4096, jnp.bfloat16, threshold,
                            seed=7, outlier_cols=(3, 700, 701, 2048, 4000),
                            bias_dtype=jnp.bfloat16)
  with jaxbnb.kernel_mode("pallas"):
    y = jax.jit(lambda a: F.matmul_8bit(a, weight, bias,
                                        threshold=threshold))(x)
  assert calls == [(False, threshold > 0)]
  _check(y, x, weight, bias, threshold)
