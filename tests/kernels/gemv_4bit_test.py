"""pallas_kernels.gemv_4bit against x @ dequantize(W).T in float64."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit as gk
from tests.kernels import _util

# bf16/f16 inputs: the kernel decodes codes via a bf16 table and rounds the
# result once; float32 uses the exact fp32 table.
TOL = {jnp.float32: 1e-5, jnp.float16: 8e-3, jnp.bfloat16: 1.5e-2}

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
]


def _expected(x, packed, qs, bias):
  w = np.asarray(F.dequantize_4bit(packed, qs).astype(jnp.float32),
                 np.float64)
  y = np.asarray(x.astype(jnp.float32), np.float64) @ w.T
  if bias is not None:
    y = y + np.asarray(bias.astype(jnp.float32), np.float64)
  return y


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
                   interpret=True)
  assert y.shape == (m, n) and y.dtype == dtype
  expected = _expected(x, packed, qs, bias)
  y = np.asarray(y.astype(jnp.float32), np.float64)
  rel = np.linalg.norm(y - expected) / np.linalg.norm(expected)
  assert rel < TOL[dtype], rel


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
  expected = _expected(x, packed, qs, None)
  y = np.asarray(y.astype(jnp.float32), np.float64)
  rel = np.linalg.norm(y - expected) / np.linalg.norm(expected)
  assert rel < TOL[dtype], rel
