"""The RMSNorm kernel against the model's RMSNorm, and its use in the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb._src.models import decode_kernel
from pallas_kernels import rms_norm as rn
from tests.kernels import _util


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize("shape,dtype,wdtype", [
    ((1, 1, 4096), jnp.bfloat16, jnp.bfloat16),   # a batch-1 decode step
    ((8, 1, 4096), jnp.bfloat16, jnp.float32),    # batch 8, fp32 weight
    ((3, 5, 1000), jnp.float16, jnp.float16),     # H not a power of two
    ((2, 576), jnp.bfloat16, jnp.bfloat16),       # SmolLM2-135M's width
    ((4, 77), jnp.float32, jnp.float32)])
def test_matches_reference(mode, shape, dtype, wdtype):
  rng = np.random.default_rng(shape[-1])
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 3
                  ).astype(dtype)
  w = jnp.asarray(rng.standard_normal(shape[-1]).astype(np.float32)
                  ).astype(wdtype)
  got = rn.rms_norm(x, w, eps=1e-5, interpret=mode == "interpret")
  want = rn.reference(x, w, 1e-5)
  assert got.shape == want.shape and got.dtype == want.dtype
  # The mean of squares may sum in another order: a 16-bit normalized
  # value can round to its neighbour (rarely), then the product differs by
  # one ulp of it; float32 results differ in their last bits (the sum, the
  # reciprocal square root, two products: a few ulps).
  g, r = np.asarray(got, np.float32), np.asarray(want, np.float32)
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(g, r, rtol=(8 if dtype == jnp.float32 else 2)
                             * eps, atol=1e-30)
  if dtype != jnp.float32:
    assert np.mean(g != r) < 0.01


def test_model_routes_few_16bit_rows_and_differentiates():
  """`decode_kernel.rms_norm` serves up to MAX_NORM_ROWS 16-bit rows under
  the kernels (interpreted here); its gradient is the reference's."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 64)),
                  jnp.bfloat16)
  w = jnp.linspace(0.5, 1.5, 64).astype(jnp.bfloat16)
  with jaxbnb.kernel_mode("reference"):
    assert decode_kernel.rms_norm(x, w, 1e-6) is None
  with jaxbnb.kernel_mode("interpret"):
    assert decode_kernel.rms_norm(x.astype(jnp.float32), w, 1e-6) is None
    big = jnp.zeros((decode_kernel.MAX_NORM_ROWS + 1, 64), jnp.bfloat16)
    assert decode_kernel.rms_norm(big, w, 1e-6) is None
    y = decode_kernel.rms_norm(x, w, 1e-6)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(
        rn.reference(x, w, 1e-6), np.float32))

    def loss(fn):
      return lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) ** 2)
    got = jax.grad(loss(lambda a, b: decode_kernel.rms_norm(a, b, 1e-6)),
                   argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda a, b: rn.reference(a, b, 1e-6)),
                  argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32),
                                  np.asarray(r, np.float32))


def test_bad_arguments_name_what_is_wrong():
  x = jnp.ones((2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"weight must be \(8,\).*got \(4,\)"):
    rn.rms_norm(x, jnp.ones((4,)), eps=1e-6, interpret=True)
  with pytest.raises(ValueError, match="got 8 of int32"):
    rn.rms_norm(x.astype(jnp.int32), jnp.ones((8,)), eps=1e-6,
                interpret=True)
  assert not rn.can_use(rn.MAX_FEATURES + 1, jnp.bfloat16)
