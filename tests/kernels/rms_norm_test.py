"""The RMSNorm kernel (`pallas_kernels.rms_norm`) against the model's
formula: interpreted on the CPU, compiled under `pytest -m gpu`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import rms_norm as rn
from tests import helpers


def _inputs(rows, features, dtype, weight_dtype, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, features)).astype(np.float32)
  x *= rng.uniform(0.1, 40, (rows, 1)).astype(np.float32)
  w = 1 + 0.3 * rng.standard_normal(features).astype(np.float32)
  return jnp.asarray(x).astype(dtype), jnp.asarray(w).astype(weight_dtype)


def _check(y, x, w, eps):
  """The reference's value within one unit in the last place of x's dtype
  for a 16-bit x (the sum of squares in another order can move the
  normalized value across a rounding boundary), a few fp32 ones for
  fp32; and most values equal."""
  want = np.asarray(rn.reference(x, w, eps), np.float32)
  got = np.asarray(y, np.float32)
  assert y.dtype == x.dtype and y.shape == x.shape
  if x.dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
  else:
    assert np.all(np.abs(got - want) <= helpers.ulp(want, x.dtype)), (
        np.abs(got - want).max())
  assert np.mean(got == want) > 0.99


@pytest.mark.parametrize("rows,features,dtype,weight_dtype", [
    (1, 4096, jnp.bfloat16, jnp.float32),
    (1, 4096, jnp.bfloat16, jnp.bfloat16),
    (3, 1024, jnp.float16, jnp.float32),
    (2, 16, jnp.float32, jnp.float32),
    (1, 16384, jnp.bfloat16, jnp.float32),
])
def test_interpreted_matches_reference(rows, features, dtype, weight_dtype):
  x, w = _inputs(rows, features, dtype, weight_dtype, features + rows)
  _check(rn.rms_norm(x, w, eps=1e-5, interpret=True), x, w, 1e-5)


def test_eps_counts():
  """A zero row gives zero (no NaN); a tiny one is scaled by `eps`."""
  x = jnp.zeros((2, 64), jnp.bfloat16).at[1].set(1e-3)
  y = rn.rms_norm(x, jnp.ones((64,)), eps=1e-6, interpret=True)
  assert not np.any(np.isnan(np.asarray(y, np.float32)))
  assert float(y[0, 0]) == 0.0
  _check(y, x, jnp.ones((64,)), 1e-6)


@pytest.mark.parametrize("shape,weight,match", [
    ((1, 1000), (1000,), "x: the RMSNorm kernel takes a power of two from "
                         "16 to 16384 features .* got 1000 of bfloat16"),
    ((1, 8), (8,), "got 8 of bfloat16"),
    ((4096,), (4096,), r"x: needs \[rows, features\], got shape \(4096,\)"),
    ((1, 64), (32,), r"weight: needs shape \(64,\), got \(32,\)"),
])
def test_errors_name_the_argument(shape, weight, match):
  with pytest.raises(ValueError, match=match):
    rn.rms_norm(jnp.ones(shape, jnp.bfloat16), jnp.ones(weight), eps=1e-5,
                interpret=True)


def test_can_use():
  assert rn.can_use(4096, jnp.bfloat16)
  assert not rn.can_use(3000, jnp.bfloat16)
  assert not rn.can_use(32768, jnp.bfloat16)
  assert not rn.can_use(4096, jnp.int8)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,features,dtype", [
    (1, 4096, jnp.bfloat16), (1, 16384, jnp.bfloat16), (4, 2048, jnp.float16),
    (1, 4096, jnp.float32), (1, 64, jnp.bfloat16)])
def test_gpu_matches_reference(rows, features, dtype):
  x, w = _inputs(rows, features, dtype, jnp.float32, 7 * features + rows)
  y = rn.rms_norm(x, w, eps=1e-5)
  _check(y, x, w, 1e-5)
  assert "jaxbnb_rms_norm" in jax.jit(
      lambda x, w: rn.rms_norm(x, w, eps=1e-5)).lower(x, w).as_text()


def test_inside_shard_map():
  """Inside `shard_map` over rows with a replicated weight, as a
  data-parallel decode step calls it: each device's rows normalized
  (interpreted, so without the varying-axes check, as
  tests/quant/dispatch_test.py's interpret cases)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  spec = jax.sharding.PartitionSpec
  x, w = _inputs(len(jax.devices()), 256, jnp.bfloat16, jnp.float32, 5)
  fn = jax.shard_map(
      lambda x, w: rn.rms_norm(x, w, eps=1e-5, interpret=True), mesh=mesh,
      in_specs=(spec("data"), spec()), out_specs=spec("data"),
      check_vma=False)
  _check(jax.jit(fn)(x, w), x, w, 1e-5)
