"""The "tma" GEMV variant (`pallas_kernels.gemv_4bit_tma`, Mosaic GPU).

Called as users' code reaches it: through `gemv_4bit` with a "tma" config.
On the CPU the jnp twin runs (the wrapper's reshapes, tile padding, split
sums and bias against the documented weight); the kernel's PTX runs under
`pytest -m gpu`, which is the only place its lane map is exercised.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit as gk
from pallas_kernels import gemv_4bit_tma as tg
from tests import helpers
from tests.kernels import _util
from tests.kernels.gemv_4bit_test import (_call_with_config, _check,
                                         _check_compiled, _code)

# (variant, block_n, bytes a row per step, split, warps, stages, table, 0)
CONFIGS = [
    ("tma", 64, 128, 2, 4, 2, "prmt", 0),
    ("tma", 64, 256, 3, 4, 3, "prmt", 0),
    ("tma", 64, 64, 4, 4, 4, "prmt", 0),
]


def _weights(n, k, quant_type, dtype, seed):
  w = jnp.asarray(_util.rng_array((n, k), seed, dtype))
  packed, qs = F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                               compress_statistics=True)
  return packed, qs


@pytest.mark.parametrize("m,n,k,config,dtype,quant_type", [
    (1, 1000, 4608, CONFIGS[0], jnp.bfloat16, "nf4"),   # partial row tile
    (3, 64, 4608, CONFIGS[1], jnp.float16, "fp4"),
    (8, 130, 4608, CONFIGS[2], jnp.bfloat16, "nf4"),
    (5, 200, 1024, ("tma", 64, 128, 1, 4, 2, "prmt", 0), jnp.bfloat16,
     "fp4"),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_interpret_matches_dequant_matmul(m, n, k, config, dtype, quant_type,
                                          with_bias):
  packed, qs = _weights(n, k, quant_type, dtype, n + k)
  x = jnp.asarray(_util.rng_array((m, k), m, dtype))
  bias = jnp.asarray(_util.rng_array((n,), 3, dtype)) if with_bias else None
  y = gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                   jnp.asarray(codebooks.code_for(quant_type)), n=n, k=k,
                   blocksize=64,
                   nested=(qs.nested_absmax, qs.nested_code, qs.offset),
                   bias=bias, config=config, code=_code(quant_type),
                   interpret=True)
  assert y.shape == (m, n) and y.dtype == dtype
  _check(y, x, packed, qs, bias, config)


def test_splits_sum_to_one_pass():
  """K split in 1, 2 or 4 programs gives the same products (fp32 sums in
  another order)."""
  n, k = 96, 2048
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, 1)
  x = jnp.asarray(_util.rng_array((2, k), 2, jnp.bfloat16))
  args = (x, packed.reshape(-1), qs.absmax, qs.nested_absmax, qs.nested_code,
          qs.offset)
  ys = [tg.gemv(*args, code=_code("nf4"), n=n, k=k, bk=128, split=s,
                interpret=True) for s in (1, 2, 4)]
  for y in ys[1:]:
    np.testing.assert_allclose(np.asarray(y), np.asarray(ys[0]), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("m,k,nested,blocksize,dtype,config,match", [
    (9, 1024, True, 64, jnp.bfloat16, CONFIGS[0],
     "x: variant 'tma' takes 1 to 8 rows, got 9"),
    (2, 1024, False, 64, jnp.bfloat16, CONFIGS[0],
     "absmax: variant 'tma' needs double-quantized"),
    (2, 1024, True, 128, jnp.bfloat16, CONFIGS[0],
     "blocksize: variant 'tma' needs 64, got 128"),
    (2, 1024, True, 64, jnp.float32, CONFIGS[0],
     "x: variant 'tma' needs bfloat16 or float16, got float32"),
    (2, 1024, True, 64, jnp.bfloat16, ("tma", 64, 96, 1, 4, 2, "prmt", 0),
     "64, 128 or 256 bytes a row per step, got 96"),
    (2, 1152, True, 64, jnp.bfloat16, ("tma", 64, 128, 2, 4, 2, "prmt", 0),
     r"k: .*\(128 x 2\), got k 1152"),
    (2, 1024, True, 64, jnp.bfloat16, ("tma", 32, 128, 1, 4, 2, "prmt", 0),
     "runs 64 rows with 4 warps, got block_n 32"),
])
def test_config_errors_name_the_argument(m, k, nested, blocksize, dtype,
                                         config, match):
  n = 64
  with pytest.raises(ValueError, match=match):
    _call_with_config(m, n, k, nested, blocksize, dtype, config)


def test_code_is_required():
  with pytest.raises(ValueError, match="code: variant 'tma'"):
    _call_with_config(2, 64, 1024, True, 64, jnp.bfloat16, CONFIGS[0], code=None)


def test_default_config():
  """The variant's own config (the sweep's best at M = 8): about eight
  programs an SM, two steps or more a program; `gemv_4bit`'s default never
  picks it."""
  assert tg.default_config(14336, 4096) == ("tma", 64, 128, 8, 4, 2, "prmt", 0)
  assert tg.default_config(4096, 14336)[3] == 28   # 64 tiles x 28 splits
  assert tg.default_config(4096, 4096)[3] == 8     # two steps a program
  for m in range(1, 65):
    assert gk.default_config(m, 14336, 4096, 64, "bfloat16",
                             mma=True)[0] != "tma"


def test_docstring_example_runs():
  """`gemv`'s example, run as a doctest (its printed result must match)."""
  helpers.assert_docstring_examples_pass(tg.gemv, "gemv")


def test_step_ptx_structure():
  """Per 64-byte chunk: two 16-byte weight loads, four x loads, eight
  decodes and eight tensor-core products; the next step's absmax codes and
  nested values are read from global memory (step 0's own, predicated)."""
  text = tg.step_ptx(_code("nf4"), "bfloat16", 3, 128, 1000, 4096, 4, 63)
  assert text.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 16
  assert text.count("ld.shared.v4.u32 {w") == 4
  assert text.count("ld.shared.v4.u32 {x") == 8
  assert text.count("ld.global.nc.u8") == 8       # 4 ahead + 4 for step 0
  assert text.count("@first ld.global.nc.u8") == 4
  assert "rem.u32 xa, g, 3;" in text             # x row g % M
  assert "mul.rn.f32" in text and "add.rn.f32" in text  # not fused
  fp16 = tg.step_ptx(_code("fp4"), "float16", 1, 64, 64, 1024, 2, 1)
  assert "cvt.rn.f16.f32" in fp16 and ".f16.f16.f32" in fp16


def test_lowers_for_cuda():
  """The kernel lowers to a Mosaic GPU module (needs JAX's CUDA plugin,
  which registers the Mosaic GPU lowering; CPU-only installs skip)."""
  assert "mosaic_gpu" in _util.lowered_gemv_4bit(CONFIGS[0], 3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype,quant_type", [(jnp.bfloat16, "nf4"),
                                              (jnp.float16, "fp4")])
def test_gpu_tma_variant(m, config, dtype, quant_type):
  """The Mosaic GPU kernel compiled: lane map, scales fetched a step ahead,
  partial last row tile (n = 1000), K splits, bias."""
  _check_compiled(m, 1000, 4608, dtype, quant_type, config, seed=31)
