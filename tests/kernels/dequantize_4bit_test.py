"""pallas_kernels.dequantize_4bit against the pure-jnp reference (bit exact)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import ops
from jaxbnb._src.quant import reference
from pallas_kernels import dequantize_4bit as dk
from tests.kernels import _util

CASES = [
    # (numel, blocksize, quant_type, dtype, nested, out_mode, block_rows)
    (64 * 37, 64, "nf4", jnp.bfloat16, False, None, None),
    (64 * 37, 64, "nf4", jnp.bfloat16, True, "join", 16),
    (1001, 64, "fp4", jnp.float16, False, "strided", 4),
    (4096 * 3 + 5, 128, "nf4", jnp.float16, True, "u32", 8),
    (300, 32, "fp4", jnp.bfloat16, True, None, None),
    (8192 + 64, 4096, "nf4", jnp.float32, True, None, 1),
    (64 * 256 * 3 + 64, 64, "nf4", jnp.float32, True, "strided", 64),
]


@pytest.mark.parametrize(
    "numel,blocksize,quant_type,dtype,nested,out_mode,block_rows", CASES)
def test_interpret_matches_reference(numel, blocksize, quant_type, dtype,
                                     nested, out_mode, block_rows):
  x = jnp.asarray(_util.rng_array(numel, numel + 1, dtype, scale=2.0))
  packed, qs = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                               compress_statistics=nested)
  packed = packed.reshape(-1)
  lut = jnp.asarray(codebooks.code_for(quant_type))
  nest = (qs.nested_absmax, qs.nested_code, qs.offset) if nested else None
  out = dk.dequantize_4bit(packed, qs.absmax, lut, numel=numel,
                           blocksize=blocksize, dtype=dtype, nested=nest,
                           out_mode=out_mode, block_rows=block_rows,
                           interpret=True)
  ref = reference.dequantize_4bit(packed, ops.float_absmax(qs), numel,
                                  blocksize, quant_type, dtype)
  assert out.dtype == ref.dtype and out.shape == (numel,)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_u32_needs_16bit_dtype():
  with pytest.raises(ValueError, match="16-bit"):
    dk.dequantize_4bit(jnp.zeros(32, jnp.uint8), jnp.ones(1), jnp.ones(16),
                       numel=64, blocksize=64, dtype=jnp.float32,
                       out_mode="u32", interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("numel,blocksize", [(1 << 22, 64), (12345, 128),
                                             (1 << 16, 4096)])
def test_gpu_matches_reference(nested, dtype, numel, blocksize):
  x = jnp.asarray(_util.rng_array(numel, 3, dtype))
  packed, qs = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4",
                               compress_statistics=nested)
  packed = packed.reshape(-1)
  nest = (qs.nested_absmax, qs.nested_code, qs.offset) if nested else None
  out = dk.dequantize_4bit(packed, qs.absmax,
                           jnp.asarray(codebooks.code_for("nf4")),
                           numel=numel, blocksize=blocksize, dtype=dtype,
                           nested=nest)
  ref = reference.dequantize_4bit(packed, ops.float_absmax(qs), numel,
                                  blocksize, "nf4", dtype)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
