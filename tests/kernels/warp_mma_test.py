"""pallas_kernels.warp_mma: the warp's tensor-core product from registers.

The jnp twin (interpret mode) emulates the warp: which lane holds which
bytes, which accumulator gets which MMA column. Read back with `row_sums`,
a step must give each row's dot product with each row of x; the GPU tests
(tests/kernels/gemv_4bit_test.py, "warp") check the inline PTX itself.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb._src.quant import codebooks
from pallas_kernels import lut_decode
from pallas_kernels import warp_mma


def _code(quant_type):
  return tuple(float(c) for c in codebooks.code_for(quant_type))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 512])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_twin_reads_back_each_rows_dot_product(blocksize, m):
  rng = np.random.default_rng(blocksize + m)
  nb, p = warp_mma.tile_shape(blocksize)
  assert nb * p == warp_mma.BYTES_PER_STEP
  rows = 16
  dtype = jnp.bfloat16
  code = _code("nf4")
  w = rng.integers(0, 256, (2, rows, nb, p), dtype=np.uint8)
  scale = rng.uniform(0.5, 2.0, (2, rows, nb)).astype(np.float32)
  x = rng.standard_normal((m, nb, p, 2)).astype(np.float32)
  x = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))
  # row r of the tile carries x row (r % 8) % m: the MMA's column r % 8
  xrow = (np.arange(rows) % 8) % m
  pairs = np.asarray(jnp.asarray(x[xrow]).astype(dtype)).view(np.uint16)
  xp = (pairs[..., 0].astype(np.uint32)
        | (pairs[..., 1].astype(np.uint32) << 16))
  sw = [lut_decode.scale_words(jnp.asarray(scale[t]), dtype)[:, :, None]
        for t in range(2)]
  acc = jnp.zeros((rows, nb, p), jnp.float32)
  for _ in range(2):  # two steps accumulate
    acc = warp_mma.product(jnp.asarray(w[0]), jnp.asarray(w[1]), sw[0],
                           sw[1], jnp.asarray(xp), acc, code, dtype,
                           interpret=True)
  ya, yb = warp_mma.row_sums(acc, m)
  table = np.asarray(code, np.float32).astype(dtype).astype(np.float32)
  for t, got in ((0, ya), (1, yb)):
    s = scale[t].astype(dtype).astype(np.float32)[:, :, None]
    hi = (table[w[t] >> 4] * s).astype(dtype).astype(np.float32)
    lo = (table[w[t] & 15] * s).astype(dtype).astype(np.float32)
    for n in range(m):
      want = 2 * ((hi * x[n][None, ..., 0]).sum((1, 2))
                  + (lo * x[n][None, ..., 1]).sum((1, 2)))
      np.testing.assert_allclose(np.asarray(got[n]), want, rtol=1e-5,
                                 atol=1e-4, err_msg=f"tile {t}, x row {n}")


@pytest.mark.parametrize("dtype,kind", [("bfloat16", "bf16"),
                                        ("float16", "f16")])
def test_ptx_two_mmas_and_operands_in_range(dtype, kind):
  text = warp_mma.ptx(_code("fp4"), dtype)
  mmas = re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\."
                    rf"{kind}\.{kind}\.f32", text)
  assert len(mmas) == 2
  # 4 outputs, then 2 words, 2 x 4 scale registers, 4 x pairs, 4
  # accumulators and 8 x 4 table-word registers (pack=4)
  operands = {int(v) for v in re.findall(r"\$(\d+)", text)}
  assert max(operands) == 4 + 2 + 8 + 4 + 4 + 32 - 1 - 3
  assert {0, 1, 2, 3, 4, 5, 14, 15, 16, 17, 18, 19, 20, 21} <= operands
