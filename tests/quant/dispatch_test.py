"""Kernel dispatch: modes, and the kernels under jit/vmap/grad/remat/shard_map.

On CPU the kernels run in Pallas interpret mode ("interpret"); the same
tests exercise the compiled kernels on a GPU (`pytest -m gpu`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxbnb
from jaxbnb import functional as F
from jaxbnb._src.quant import dispatch
from tests.kernels import _util

KERNEL = "interpret"


def _w(n, k, seed=0, dtype=jnp.float32):
  return jnp.asarray(_util.rng_array((n, k), seed, dtype))


def test_modes_and_errors():
  assert jaxbnb.get_kernel_mode() in jaxbnb.KERNEL_MODES
  with jaxbnb.kernel_mode("reference"):
    assert jaxbnb.get_kernel_mode() == "reference"
    assert dispatch.use_kernels() == (False, False)
  with jaxbnb.kernel_mode("interpret"):
    assert dispatch.use_kernels() == (True, True)
  with pytest.raises(ValueError, match="kernel mode must be one of"):
    jaxbnb.set_kernel_mode("fast")
  with pytest.raises(ValueError, match="'triton'"):
    with jaxbnb.kernel_mode("triton"):
      pass


def test_auto_mode_uses_reference_on_cpu():
  if _util.on_gpu():
    pytest.skip("CPU-only behaviour")
  assert dispatch.use_kernels("auto") == (False, False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_dequantize_kernels_equal_reference(quant_type, nested):
  w = _w(48, 320, 1, jnp.bfloat16)
  with jaxbnb.kernel_mode("reference"):
    p_ref, qs_ref = F.quantize_4bit(w, quant_type=quant_type,
                                    compress_statistics=nested)
    d_ref = F.dequantize_4bit(p_ref, qs_ref)
  with jaxbnb.kernel_mode(KERNEL):
    p, qs = F.quantize_4bit(w, quant_type=quant_type,
                            compress_statistics=nested)
    d = F.dequantize_4bit(p, qs)
  np.testing.assert_array_equal(np.asarray(p), np.asarray(p_ref))
  np.testing.assert_array_equal(np.asarray(qs.absmax), np.asarray(qs_ref.absmax))
  np.testing.assert_array_equal(np.asarray(d), np.asarray(d_ref))


@pytest.mark.parametrize("m", [1, 3, 8, 100])   # gemv reduce/dot, dequant+dot
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_forward_and_grad(m, dtype):
  n, k = 40, 192
  w = _w(n, k, 2)
  x = jnp.asarray(_util.rng_array((m, k), 3, dtype))
  bias = jnp.asarray(_util.rng_array((n,), 4, dtype))
  packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
  g = jnp.asarray(_util.rng_array((m, n), 5, jnp.float32))

  def loss(x, b):
    return jnp.sum(F.matmul_4bit(x, packed, qs, b).astype(jnp.float32) * g)

  with jaxbnb.kernel_mode("reference"):
    y_ref = F.matmul_4bit(x, packed, qs, bias)
    dx_ref, db_ref = jax.grad(loss, argnums=(0, 1))(x, bias)
  with jaxbnb.kernel_mode(KERNEL):
    y = jax.jit(F.matmul_4bit)(x, packed, qs, bias)
    dx, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, bias)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  f = lambda a: np.asarray(a.astype(jnp.float32))
  np.testing.assert_allclose(f(y), f(y_ref), rtol=tol, atol=tol * 4)
  np.testing.assert_allclose(f(dx), f(dx_ref), rtol=tol, atol=tol * 4)
  np.testing.assert_allclose(f(db), f(db_ref), rtol=tol, atol=tol * 4)


def test_matmul_vmap_and_checkpoint():
  n, k = 24, 128
  packed, qs = F.quantize_4bit(_w(n, k, 6), quant_type="fp4")
  xs = jnp.asarray(_util.rng_array((5, 2, k), 7, jnp.float32))
  with jaxbnb.kernel_mode(KERNEL):
    y_v = jax.vmap(lambda x: F.matmul_4bit(x, packed, qs))(xs)
    remat = jax.checkpoint(lambda x: jnp.sum(F.matmul_4bit(x, packed, qs)))
    dx = jax.grad(remat)(xs[0])
  with jaxbnb.kernel_mode("reference"):
    y_ref = F.matmul_4bit(xs, packed, qs)
    dx_ref = jax.grad(lambda x: jnp.sum(F.matmul_4bit(x, packed, qs)))(xs[0])
  np.testing.assert_allclose(np.asarray(y_v), np.asarray(y_ref), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5,
                             atol=1e-5)


def _mesh():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 devices (conftest forces 8 CPU devices)")
  return Mesh(np.asarray(devices[:8]), ("model",))


def _stacked_states(blocks, nested):
  """Quantizes each shard of the weight; stacks them on a leading axis."""
  parts = [F.quantize_4bit(b, quant_type="nf4", compress_statistics=nested)
           for b in blocks]
  packed = jnp.stack([p for p, _ in parts])
  qs = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in parts])
  return packed, qs


def _local(a):
  return jax.tree.map(lambda v: v[0], a)


# Pallas' interpret mode cannot trace its grid loop under shard_map's
# check_vma (JAX 0.11: "Scan carry ... mismatched varying manual axes"), so
# kernels run there with check_vma=False, as JAX's own Pallas collectives
# do; the reference path keeps the default check.
SHARD_MODES = [(KERNEL, False), ("reference", True)]


@pytest.mark.parametrize("mode,check_vma", SHARD_MODES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("m", [2, 40])
def test_shard_map_column_parallel(nested, m, mode, check_vma):
  mesh = _mesh()
  n, k = 8 * 16, 256
  w = _w(n, k, 8)
  x = jnp.asarray(_util.rng_array((m, k), 9, jnp.float32))
  bias = jnp.asarray(_util.rng_array((n,), 10, jnp.float32))
  packed, qs = _stacked_states(jnp.split(w, 8, axis=0), nested)

  def shard(x, p, s, b):
    return F.matmul_4bit(x, _local(p), _local(s), b)

  f = jax.shard_map(shard, mesh=mesh,
                    in_specs=(P(), P("model"), P("model"), P("model")),
                    out_specs=P(None, "model"), check_vma=check_vma)
  with jaxbnb.kernel_mode(mode):
    y = jax.jit(f)(x, packed, qs, bias)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(f(x, packed, qs, bias) ** 2)))(x)
  w_deq = jnp.concatenate([F.dequantize_4bit(packed[i], _local(
      jax.tree.map(lambda v, i=i: v[i:i + 1], qs))) for i in range(8)])
  expected = x @ w_deq.T + bias
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx),
                             np.asarray(2 * expected @ w_deq), rtol=1e-4,
                             atol=1e-3)


@pytest.mark.parametrize("mode,check_vma", SHARD_MODES)
@pytest.mark.parametrize("m", [1, 24])
def test_shard_map_row_parallel(m, mode, check_vma):
  mesh = _mesh()
  n, k = 48, 8 * 128
  w = _w(n, k, 11)
  x = jnp.asarray(_util.rng_array((m, k), 12, jnp.float32))
  packed, qs = _stacked_states(jnp.split(w, 8, axis=1), True)

  def shard(x, p, s):
    return jax.lax.psum(F.matmul_4bit(x, _local(p), _local(s)), "model")

  f = jax.shard_map(shard, mesh=mesh,
                    in_specs=(P(None, "model"), P("model"), P("model")),
                    out_specs=P(), check_vma=check_vma)
  with jaxbnb.kernel_mode(mode):
    y = jax.jit(f)(x, packed, qs)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(f(x, packed, qs))))(x)
  w_deq = jnp.concatenate([F.dequantize_4bit(packed[i], _local(
      jax.tree.map(lambda v, i=i: v[i:i + 1], qs))) for i in range(8)],
                          axis=1)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w_deq.T),
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
      np.asarray(dx), np.asarray(jnp.ones((m, n)) @ w_deq), rtol=1e-5,
      atol=1e-4)


def test_nnx_layer_uses_kernels():
  nnx = pytest.importorskip("flax.nnx")
  from jaxbnb.nnx import Linear4bit  # pylint: disable=g-import-not-at-top
  layer = Linear4bit(128, 32, quant_type="nf4", rngs=nnx.Rngs(0))
  x = jnp.asarray(_util.rng_array((2, 128), 13, jnp.float32))
  with jaxbnb.kernel_mode("reference"):
    y_ref = layer(x)
  with jaxbnb.kernel_mode(KERNEL):
    y = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.gpu
def test_auto_mode_uses_kernels_on_gpu():
  assert dispatch.use_kernels("auto") == (True, False)
  w = _w(512, 1024, 14, jnp.bfloat16)
  x = jnp.asarray(_util.rng_array((1, 1024), 15, jnp.bfloat16))
  packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
  hlo = jax.jit(F.matmul_4bit).lower(x, packed, qs).as_text()
  assert "jaxbnb_gemv_4bit" in hlo or "__gpu$xla.gpu.triton" in hlo
  with jaxbnb.kernel_mode("reference"):
    y_ref = F.matmul_4bit(x, packed, qs)
  y = F.matmul_4bit(x, packed, qs)
  rel = float(jnp.linalg.norm((y - y_ref).astype(jnp.float32))
              / jnp.linalg.norm(y_ref.astype(jnp.float32)))
  assert rel < 1e-2
