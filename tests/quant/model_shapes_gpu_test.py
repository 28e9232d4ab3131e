"""4-bit matmuls on the layer shapes of real model families, on the GPU.

The kernel tests use small shapes and the decode benchmarks Llama-3-8B's.
The dispatch picks a kernel by rows of x, weight shape, block size, double
quantization and dtype (`kernels.gemv_serves`, `gemv_4bit.lut_serves`,
`gemv_4bit.warp_tma_serves`, `kernels.gemm_serves`), so each family's
shapes take paths of their own: 256-row k/v projections (Qwen2), K = 576
or 8960 (not multiples of 1024), 28672 x 8192 (70B). Each case here runs
the public `F.matmul_4bit` or `F.matmul_4bit_group` under jit in the
default kernel mode and checks every output against `x @ W.T` in float64,
W dequantized exactly (fp32).

The bound is `helpers.matmul_bound` with a per-weight relative term: the
16-bit paths round the code, the absmax and their product to 16 bits (the
byte-permute GEMV, bitsandbytes' own weight) or the dequantized weight once
(dequantize + dot), at most 3 x 2**-8 of |w| in bfloat16; float32 x may
meet XLA's default dot precision (TF32 operands on Hopper) on the
dequantize + dot path, 2 x 2**-11. That catches a wrong row, block,
absmax, code table or routing (errors of the output's own size), not one
wrong code among thousands: the kernel tests pin those down at small
shapes, variant by variant.

Run on a GPU machine: `pytest -m gpu tests/quant/model_shapes_gpu_test.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from tests import helpers

pytestmark = pytest.mark.gpu

# hidden, intermediate, q/o rows, k/v rows (a layer's projections)
FAMILIES = {
    "llama3_8b": (4096, 14336, 4096, 1024),
    "llama2_7b": (4096, 11008, 4096, 4096),
    "llama2_13b": (5120, 13824, 5120, 5120),
    "llama3_70b": (8192, 28672, 8192, 1024),
    "llama32_1b": (2048, 8192, 2048, 512),
    "llama32_3b": (3072, 8192, 3072, 1024),
    "qwen2_1_5b": (1536, 8960, 1536, 256),
    "smollm2_135m": (576, 1536, 576, 192),
    "smollm2_360m": (960, 2560, 960, 320),
}
LAYERS = ("qkv", "o", "gate_up", "down")
# Rows of x: 1 and 8 (batch-1 and batch-8 decode) everywhere, 16 and 128
# (the GEMV's and the wgmma GEMM's edges) where the host's float64 check
# stays small, and one more a (family, layer) from the rest, in turn.
OTHER_M = (2, 3, 5, 12, 24, 64, 100, 256, 300, 17, 9, 65, 129)
# name: (quant_type, double quant, dtype, blocksize)
FORMATS = {
    "nf4_dq_bf16": ("nf4", True, jnp.bfloat16, 64),
    "fp4_fp16": ("fp4", False, jnp.float16, 64),
    "nf4_dq_fp32": ("nf4", True, jnp.float32, 64),
    "nf4_dq_bf16_bs128": ("nf4", True, jnp.bfloat16, 128),
}
WEIGHT_REL = {jnp.dtype(jnp.bfloat16): 3 * 2.0**-8,
              jnp.dtype(jnp.float16): 3 * 2.0**-8,
              jnp.dtype(jnp.float32): 2 * 2.0**-11}


def _shapes(family, layer):
  """(rows of each weight, K): one weight, or a group reading the same x."""
  hidden, inter, q, kv = FAMILIES[family]
  return {"qkv": ((q, kv, kv), hidden), "o": ((hidden,), q),
          "gate_up": ((inter, inter), hidden), "down": ((hidden,), inter)
          }[layer]


def _cases():
  cases, turn = [], 0
  for family in FAMILIES:
    for layer in LAYERS:
      ns, k = _shapes(family, layer)
      big = sum(ns) * k > 100e6  # 70B's gate/up and down: fewer rows of x
      ms = [1, 8] + ([] if big else [16, 128])
      ms.append(OTHER_M[turn % len(OTHER_M)] if not big else 3)
      turn += 1
      cases.append(pytest.param(family, layer, "nf4_dq_bf16", tuple(ms),
                                id=f"{family}-{layer}-nf4_dq_bf16"))
      if layer in ("qkv", "down"):
        cases.append(pytest.param(family, layer, "fp4_fp16", (1, 8),
                                  id=f"{family}-{layer}-fp4_fp16"))
      if layer == "o":
        cases.append(pytest.param(family, layer, "nf4_dq_fp32", (1, 4),
                                  id=f"{family}-{layer}-nf4_dq_fp32"))
      if layer == "gate_up" and not big:
        cases.append(pytest.param(family, layer, "nf4_dq_bf16_bs128", (1, 8),
                                  id=f"{family}-{layer}-nf4_dq_bf16_bs128"))
  return cases


def _weights(ns, k, fmt, seed):
  quant_type, dq, _, blocksize = FORMATS[fmt]
  out = []
  for i, n in enumerate(ns):
    w = jax.random.normal(jax.random.key(seed + i), (n, k), jnp.float32)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize,
                                 quant_type=quant_type,
                                 compress_statistics=dq)
    w_exact = np.asarray(F.dequantize_4bit(packed, qs), np.float64)
    out.append((packed, qs, w_exact))
  return out


@pytest.mark.parametrize("family,layer,fmt,ms", _cases())
def test_layer_shape(family, layer, fmt, ms):
  ns, k = _shapes(family, layer)
  dtype = FORMATS[fmt][2]
  weights = _weights(ns, k, fmt, seed=len(family) * 100 + LAYERS.index(layer))
  pairs = [(p, qs) for p, qs, _ in weights]
  one = jax.jit(F.matmul_4bit)
  group = jax.jit(F.matmul_4bit_group)
  for m in ms:
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(dtype)
    ys = group(x, pairs) if len(ns) > 1 else [one(x, *pairs[0])]
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    for y, (_, _, w), n in zip(ys, weights, ns):
      assert y.shape == (m, n) and y.dtype == dtype, (m, n, y.shape, y.dtype)
      exact, bound = helpers.matmul_bound(
          x64, w, dtype, weight_rel=WEIGHT_REL[jnp.dtype(dtype)])
      helpers.assert_within(y, exact, bound, f"{family} {layer} {fmt} "
                            f"{n}x{k} M={m}")
