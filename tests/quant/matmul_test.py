"""Tests of matmul_4bit: forward, gradients, compute dtype, errors, sharding.

The accuracy bound follows bitsandbytes' `test_matmul_4bit` (mean absolute
error against the float matmul with B = randn(N, K) / sqrt(K)).

These tests pin the pure-jnp reference path (the Pallas kernels are checked
against it in dispatch_test.py, in every mode), so a comparison with `_ref`,
which performs the same XLA operations eagerly, is bit-exact: no tolerance.
Where the expected value is computed differently (numpy sums, other dtypes,
or under jit/vmap/shard_map, where XLA may fuse and reorder the float32
sums), the bound is derived in `tests/helpers` (`matmul_bound`,
`sum_bound`), never a fixed atol.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxbnb
from jaxbnb import functional as F
from tests import helpers


@pytest.fixture(autouse=True)
def _reference_path():
  with jaxbnb.kernel_mode("reference"):
    yield


@functools.lru_cache(maxsize=None)
def _normal(shape, seed, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


@functools.lru_cache(maxsize=None)
def _weight(n, k, quant_type="nf4", blocksize=64, nested=False,
            dtype=jnp.float32, storage=jnp.uint8, seed=100):
  w = _normal((n, k), seed, dtype) / jnp.sqrt(jnp.asarray(k, dtype))
  packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                               compress_statistics=nested,
                               quant_storage=storage)
  return w, packed, qs


def _ref(x, packed, qs, bias=None, compute=None):
  """x @ W.T (+ bias) with W dequantized to `compute`, fp32 accumulation.

  Like bitsandbytes 0.50, the weight is dequantized straight to the compute
  dtype (fp32 code * absmax, one rounding), not to quant_state.dtype first.
  The product is F.linear's: `[M, K] x [N, K]` contracted on K, so XLA runs
  the same dot as matmul_4bit (bit-identical results).
  """
  compute = jnp.dtype(compute or x.dtype)
  w = F.dequantize_4bit(packed, dataclasses.replace(qs, dtype=compute.name))
  assert w.dtype == compute
  x2 = x.astype(compute).reshape(-1, x.shape[-1])
  y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(compute).astype(jnp.float32)
  y = y.reshape(*x.shape[:-1], w.shape[0])
  return y.astype(compute).astype(x.dtype)


def _dot(g, w):
  """g @ w with float32 accumulation: the backward pass's own product (on
  the flattened `[M, N]` cotangent, as matmul_4bit computes it)."""
  g2 = g.reshape(-1, g.shape[-1])
  out = jnp.dot(g2, w, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(*g.shape[:-1], w.shape[-1])


def _assert_dx(dx, g, w, err_msg):
  """dx = g @ W up to float32 summation order (any order; `matmul_bound`)."""
  g2 = np.asarray(g).reshape(-1, np.shape(g)[-1])
  exact, bound = helpers.matmul_bound(g2, np.asarray(w).T, jnp.float32)
  helpers.assert_within(np.asarray(dx).reshape(exact.shape), exact, bound,
                        err_msg)


# --------------------------------------------------------------------------
# 1. Forward
# --------------------------------------------------------------------------


@pytest.mark.parametrize("lead,quant_type,nested,storage", [
    ((2, 3), "nf4", False, jnp.uint8), ((2, 3), "fp4", True, jnp.uint8),
    ((5,), "nf4", True, jnp.bfloat16), ((), "fp4", False, jnp.uint8)])
def test_forward_matches_dequantized_matmul(lead, quant_type, nested,
                                            storage):
  n, k = 48, 128
  _, packed, qs = _weight(n, k, quant_type, 64, nested, storage=storage)
  x = _normal((*lead, k), 1)
  bias = _normal((n,), 2)
  y0 = F.matmul_4bit(x, packed, qs)
  y = F.matmul_4bit(x, packed, qs, bias)
  assert y.shape == y0.shape == (*lead, n)
  assert y.dtype == y0.dtype == jnp.float32
  helpers.assert_bits_equal(y0, _ref(x, packed, qs), err_msg="no bias")
  helpers.assert_bits_equal(y, _ref(x, packed, qs, bias), err_msg="bias")
  # Bias really is added: y - y0 = bias up to the rounding of the addition
  # and of the subtraction (u * |y| and u * |y - y0|).
  b = np.broadcast_to(np.asarray(bias, np.float64), y.shape)
  helpers.assert_within(
      y - y0, b, helpers.F32_EPS / 2 * (np.abs(np.asarray(y, np.float64))
                                        + np.abs(b)) * 1.01, "bias added")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_forward_half_precision(dtype):
  n, k = 64, 256
  _, packed, qs = _weight(n, k, "nf4", 64, True, dtype=dtype)
  x = _normal((3, k), 3, dtype)
  bias = _normal((n,), 4, dtype)
  y = F.matmul_4bit(x, packed, qs, bias)
  assert y.dtype == dtype and y.shape == (3, n)
  # The same fp32 accumulator, rounded once to the 16-bit dtype: identical.
  helpers.assert_bits_equal(y, _ref(x, packed, qs, bias), err_msg=str(dtype))
  # And within one 16-bit rounding of the float64 product with the
  # dequantized (16-bit) weight.
  w16 = np.asarray(F.dequantize_4bit(packed, qs).astype(jnp.float32))
  exact, bound = helpers.matmul_bound(x, w16, dtype, bias=bias)
  helpers.assert_within(y, exact, bound, "float64")


def _bnb_bound(quant_type, blocksize):
  if quant_type == "nf4" or blocksize <= 64:
    return 0.115
  if blocksize <= 256:
    return 0.13
  return 0.16


@pytest.mark.parametrize("m,n,k,quant_type,blocksize", [
    (1, 256, 128, "nf4", 64), (40, 512, 128, "fp4", 4096),
    (40, 512, 128, "nf4", 128), (9, 640, 128, "nf4", 4096),
    (9, 640, 128, "fp4", 32), (7, 384, 256, "fp4", 256),
    (7, 384, 256, "nf4", 32)])
def test_error_against_float_matmul(m, n, k, quant_type, blocksize):
  w, packed, qs = _weight(n, k, quant_type, blocksize, seed=k)
  x = _normal((m, k), 5)
  y = F.matmul_4bit(x, packed, qs)
  exact = jnp.dot(x, w.T, precision=jax.lax.Precision.HIGHEST)
  err = float(jnp.mean(jnp.abs(y - exact)))
  assert err < _bnb_bound(quant_type, blocksize), err
  assert err > 1e-3  # the weight really was quantized
  helpers.assert_bits_equal(y, _ref(x, packed, qs))


def test_same_result_for_every_quant_storage():
  x = _normal((4, 128), 6)
  ys = []
  for storage in (jnp.uint8, jnp.int8, jnp.float16, jnp.bfloat16, jnp.float32):
    _, packed, qs = _weight(32, 128, "fp4", 128, True, storage=storage)
    assert packed.dtype == storage
    ys.append(np.asarray(F.matmul_4bit(x, packed, qs)))
  for y in ys[1:]:
    np.testing.assert_array_equal(y, ys[0])


# --------------------------------------------------------------------------
# 2. Gradients and transformations
# --------------------------------------------------------------------------

N, K = 48, 128


def _loss(x, bias, packed, qs, g):
  return jnp.sum(F.matmul_4bit(x, packed, qs, bias) * g)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
# A square weight (q_proj, o_proj) is where dx = g @ W.T would look right.
@pytest.mark.parametrize("n", [N, K], ids=["wide", "square"])
def test_grad_x_and_bias(lead, nested, n):
  _, packed, qs = _weight(n, K, "nf4", 64, nested)
  w = F.dequantize_4bit(packed, qs)
  x = _normal((*lead, K), 7)
  bias = _normal((n,), 8)
  g = _normal((*lead, n), 9)
  dx, dbias = jax.grad(_loss, argnums=(0, 1))(x, bias, packed, qs, g)
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
  # dx = g @ W in float32, exactly the backward pass's dot.
  helpers.assert_bits_equal(dx, _dot(g, w), err_msg="dx")
  g2 = np.asarray(g).reshape(-1, n)
  helpers.assert_within(dbias, g2.astype(np.float64).sum(0),
                        helpers.sum_bound(g2, 0), "dbias")
  # Plain sum: dx = ones @ W (a numpy float64 column sum, so the bound).
  dx1 = jax.grad(lambda x: F.matmul_4bit(x, packed, qs).sum())(x)
  wn = np.asarray(w)
  helpers.assert_within(
      dx1, np.broadcast_to(wn.astype(np.float64).sum(0), x.shape),
      helpers.sum_bound(wn, 0), "dx of sum")


def test_grad_under_jit_vmap_and_checkpoint():
  _, packed, qs = _weight(N, K, "fp4", 128, True)
  w = F.dequantize_4bit(packed, qs)
  x = _normal((4, 5, K), 10)
  bias = _normal((N,), 11)
  g = _normal((4, 5, N), 12)
  db_exact = np.asarray(g, np.float64).sum((0, 1))
  db_bound = helpers.sum_bound(np.asarray(g).reshape(-1, N), 0)

  # Every transformation computes g @ W; XLA may sum in another order.
  grad = jax.grad(_loss, argnums=(0, 1))
  dx_j, db_j = jax.jit(grad)(x, bias, packed, qs, g)
  _assert_dx(dx_j, g, w, "jit dx")
  helpers.assert_within(db_j, db_exact, db_bound, "jit dbias")

  # vmap over the leading batch axis of x (and g): per-example gradients.
  per_ex = jax.vmap(grad, in_axes=(0, None, None, None, 0))
  dx_v, db_v = per_ex(x, bias, packed, qs, g)
  assert dx_v.shape == x.shape and db_v.shape == (4, N)
  _assert_dx(dx_v, g, w, "vmap dx")
  helpers.assert_within(db_v, np.asarray(g, np.float64).sum(1),
                        helpers.sum_bound(np.asarray(g), 1), "vmap dbias")
  dx_jv, _ = jax.jit(per_ex)(x, bias, packed, qs, g)
  _assert_dx(dx_jv, g, w, "jit vmap dx")

  # Forward under vmap: x @ W.T against float64, per element.
  y_v = jax.vmap(F.matmul_4bit, in_axes=(0, None, None))(x, packed, qs)
  exact, bound = helpers.matmul_bound(np.asarray(x).reshape(-1, K),
                                      np.asarray(w), jnp.float32)
  helpers.assert_within(np.asarray(y_v).reshape(-1, N), exact, bound,
                        "vmap y")

  # Rematerialization.
  dx_c, db_c = jax.jit(jax.grad(jax.checkpoint(_loss), argnums=(0, 1)))(
      x, bias, packed, qs, g)
  _assert_dx(dx_c, g, w, "remat dx")
  helpers.assert_within(db_c, db_exact, db_bound, "remat dbias")


def test_no_gradient_to_quantized_weight():
  _, packed, qs = _weight(N, K, "nf4", 64, True)
  x = _normal((3, K), 13)
  assert qs.nested_absmax.dtype == jnp.float32

  def loss_of_state(nested_absmax, offset, code):
    st = dataclasses.replace(qs, nested_absmax=nested_absmax, offset=offset,
                             code=code)
    return jnp.sum(F.matmul_4bit(x, packed, st) ** 2)

  grads = jax.grad(loss_of_state, argnums=(0, 1, 2))(
      qs.nested_absmax, qs.offset, qs.code)
  for g, leaf in zip(grads, (qs.nested_absmax, qs.offset, qs.code)):
    assert g.shape == leaf.shape
    assert not np.any(np.asarray(g)), g
  # Differentiating w.r.t. the whole state (integer leaves included) works
  # and gives no gradient either.
  gs = jax.grad(lambda st: jnp.sum(F.matmul_4bit(x, packed, st)),
                allow_int=True)(qs)
  for leaf in jax.tree.leaves(gs):
    if leaf.dtype != jax.dtypes.float0:
      assert not np.any(np.asarray(leaf))


def test_grad_compute_dtype_bf16_on_fp32_input():
  _, packed, qs = _weight(N, K, "nf4", 64, False)
  w16 = F.dequantize_4bit(packed, qs).astype(jnp.bfloat16)
  x = _normal((5, K), 14)
  g = _normal((5, N), 15)
  dx = jax.grad(lambda x: jnp.sum(
      F.matmul_4bit(x, packed, qs, dtype=jnp.bfloat16) * g))(x)
  assert dx.dtype == jnp.float32
  ref = jnp.dot(g.astype(jnp.bfloat16), w16,
                preferred_element_type=jnp.float32,
                precision=jax.lax.Precision.HIGHEST).astype(jnp.bfloat16)
  # The backward pass's own product: bf16 operands, fp32 accumulator, one
  # rounding to bf16 (then exactly to fp32).
  helpers.assert_bits_equal(dx, np.asarray(ref, np.float32))


# --------------------------------------------------------------------------
# 3. The compute dtype argument
# --------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_compute_on_fp32_input(with_bias):
  n, k = 64, 256
  _, packed, qs = _weight(n, k, "nf4", 64, True)
  x = _normal((2, 3, k), 16)
  bias = _normal((n,), 17) if with_bias else None
  y = F.matmul_4bit(x, packed, qs, bias, dtype=jnp.bfloat16)
  assert y.dtype == jnp.float32 and y.shape == (2, 3, n)
  y_np = np.asarray(y)
  # The result was rounded to bf16 before the cast back to fp32.
  np.testing.assert_array_equal(
      np.asarray(y.astype(jnp.bfloat16).astype(jnp.float32)), y_np)
  ref = _ref(x, packed, qs, bias, compute=jnp.bfloat16)
  helpers.assert_bits_equal(y, ref)
  # It differs from the fp32 computation (the argument is not ignored) ...
  y32 = np.asarray(F.matmul_4bit(x, packed, qs, bias))
  assert not np.array_equal(y32, y_np)
  # ... by no more than rounding x and W to bf16 (unit roundoff 2**-8
  # each, relative), the bias (2**-8), and the output (one bf16 ulp).
  w32 = np.asarray(F.dequantize_4bit(packed, qs))
  exact, bound = helpers.matmul_bound(np.asarray(x).reshape(-1, k), w32,
                                      jnp.bfloat16, weight_rel=2 * 2.0**-8,
                                      bias=bias)
  if bias is not None:
    bound = bound + 2.0**-8 * np.abs(np.asarray(bias))
  helpers.assert_within(y_np.reshape(-1, n), exact, bound, "bf16 vs fp32")


def test_fp32_compute_on_bf16_input():
  _, packed, qs = _weight(N, K, "nf4", 64, False, dtype=jnp.bfloat16)
  x = _normal((4, K), 18, jnp.bfloat16)
  y = F.matmul_4bit(x, packed, qs, dtype=jnp.float32)
  assert y.dtype == jnp.bfloat16
  ref = _ref(x.astype(jnp.float32), packed, qs).astype(jnp.bfloat16)
  helpers.assert_bits_equal(y, ref)


# --------------------------------------------------------------------------
# 4. Errors and the deprecated [K, N] weight
# --------------------------------------------------------------------------


def test_wrong_inner_dimension():
  _, packed, qs = _weight(N, K)
  with pytest.raises(ValueError, match=r"A\.shape"):
    F.matmul_4bit(_normal((3, K + 1), 19), packed, qs)


def test_one_dimensional_quant_state():
  w = _normal((N * K,), 20)
  packed, qs = F.quantize_4bit(w, quant_type="nf4")
  with pytest.raises(ValueError, match=r"quant_state\.shape"):
    F.matmul_4bit(_normal((3, K), 19), packed, qs)


@pytest.mark.parametrize("bias_shape", [(N + 1,), (1, N), (K,), ()])
def test_bias_of_wrong_shape(bias_shape):
  _, packed, qs = _weight(N, K)
  with pytest.raises(ValueError, match="bias"):
    F.matmul_4bit(_normal((3, K), 19), packed, qs, jnp.zeros(bias_shape))


def test_bad_activation_and_state_types():
  _, packed, qs = _weight(N, K)
  with pytest.raises(TypeError, match="`A`"):
    F.matmul_4bit(jnp.ones((3, K), jnp.int32), packed, qs)
  with pytest.raises(TypeError, match="quant_state"):
    F.matmul_4bit(_normal((3, K), 19), packed, qs.as_dict())


def test_deprecated_kn_weight_warns_and_computes():
  w_nk, _, _ = _weight(N, K)
  packed, qs = F.quantize_4bit(w_nk.T, quant_type="nf4")  # [K, N]
  assert qs.shape == (K, N)
  x = _normal((2, 3, K), 21)
  bias = _normal((N,), 22)
  with pytest.warns(DeprecationWarning, match=r"quant_state\.shape"):
    y = F.matmul_4bit(x, packed, qs, bias)
  assert y.shape == (2, 3, N)
  w_kn = np.asarray(F.dequantize_4bit(packed, qs))
  # The product with the transposed weight, bounded against float64.
  exact, bound = helpers.matmul_bound(np.asarray(x).reshape(-1, K), w_kn.T,
                                      jnp.float32, bias=bias)
  helpers.assert_within(np.asarray(y).reshape(-1, N), exact, bound, "[K, N]")
  # Gradients take the transposed path too: dx = ones @ W_kn.T.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    dx = jax.grad(lambda x: F.matmul_4bit(x, packed, qs, bias).sum())(x)
  helpers.assert_within(
      dx, np.broadcast_to(w_kn.astype(np.float64).sum(1), x.shape),
      helpers.sum_bound(w_kn, 1), "[K, N] dx")


def test_square_weight_does_not_warn():
  _, packed, qs = _weight(K, K)
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    y = F.matmul_4bit(_normal((2, K), 23), packed, qs)
  assert y.shape == (2, K)


# --------------------------------------------------------------------------
# 5. shard_map over the 8 virtual CPU devices
# --------------------------------------------------------------------------


def _mesh():
  devices = jax.devices()
  assert len(devices) >= 2, (
      "the shard_map tests need several devices (tests/conftest.py sets up "
      f"8 virtual CPU devices); got {devices}")
  return Mesh(np.asarray(devices), ("data",))


@pytest.mark.parametrize("nested", [False, True])
def test_shard_map_batch_sharded(nested):
  mesh = _mesh()
  ndev = mesh.devices.size
  _, packed, qs = _weight(N, K, "nf4", 64, nested)
  x = _normal((2 * ndev, 3, K), 24)
  bias = _normal((N,), 25)

  f = jax.shard_map(
      lambda x, b, p, s: F.matmul_4bit(x, p, s, b), mesh=mesh,
      in_specs=(P("data"), P(), P(), P()), out_specs=P("data"))
  y = jax.jit(f)(x, bias, packed, qs)
  assert y.shape == (2 * ndev, 3, N)
  w = F.dequantize_4bit(packed, qs)
  exact, bound = helpers.matmul_bound(np.asarray(x).reshape(-1, K),
                                      np.asarray(w), jnp.float32, bias=bias)
  helpers.assert_within(np.asarray(y).reshape(-1, N), exact, bound,
                        "sharded y")

  # And its gradient with respect to the sharded activations.
  g = _normal((2 * ndev, 3, N), 26)
  dx = jax.jit(jax.grad(lambda x: jnp.sum(f(x, None, packed, qs) * g)))(x)
  _assert_dx(dx, g, w, "sharded dx")


def test_shard_map_grad_with_replicated_bias():
  mesh = _mesh()
  ndev = mesh.devices.size
  _, packed, qs = _weight(N, K, "nf4", 64, False)
  x = _normal((2 * ndev, K), 27)
  bias = _normal((N,), 28)
  g = _normal((2 * ndev, N), 29)
  f = jax.shard_map(
      lambda x, b: F.matmul_4bit(x, packed, qs, b), mesh=mesh,
      in_specs=(P("data"), P()), out_specs=P("data"))
  dx, db = jax.jit(jax.grad(lambda x, b: jnp.sum(f(x, b) * g),
                            argnums=(0, 1)))(x, bias)
  w = F.dequantize_4bit(packed, qs)
  _assert_dx(dx, g, w, "sharded dx")
  # The replicated bias's gradient: per-device sums, then a psum.
  helpers.assert_within(db, np.asarray(g, np.float64).sum(0),
                        helpers.sum_bound(np.asarray(g), 0), "dbias")
