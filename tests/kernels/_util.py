"""Shared helpers for the kernel tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import kernels
from jaxbnb._src.quant import ops
from jaxbnb._src.quant import reference


def on_gpu() -> bool:
  return any(d.platform == "gpu" for d in jax.devices())


# The kernel modes a test runs in: Pallas interpret mode everywhere (the CPU
# suite), and the compiled kernels ("pallas") on a GPU, selected with
# `pytest -m gpu` (conftest skips `gpu`-marked tests without one).
MODES = [
    pytest.param("interpret", id="interpret"),
    pytest.param("pallas", id="pallas", marks=pytest.mark.gpu),
]


def modes():
  """Kernel modes to test here: interpret always, compiled on a GPU."""
  return MODES


def thresholds(quant_type):
  return kernels.thresholds(quant_type)


def rng_array(shape, seed, dtype, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def kernel_weight(packed, qs, compute_dtype, in_dtype=False) -> np.ndarray:
  """float64 `[N, K]` weight the fused 4-bit GEMV really multiplies with.

  float32 inputs: the fp32 code table times the fp32 absmax (exactly the
  reference's weight before its one rounding). 16-bit inputs: the codes
  rounded to bfloat16 (`gemv_4bit.pair_table`, documented there) times the
  fp32 absmax. The nested absmax is decoded as the reference decodes it.
  `in_dtype` (the byte-permute decode, `lut_decode`: "mma", "prmt"): the
  code and the absmax rounded to the 16-bit compute dtype, their product
  rounded to it once (bitsandbytes' GEMV weight).
  """
  if in_dtype:
    dt = np.dtype(jnp.dtype(compute_dtype))
    lut = np.asarray(codebooks.code_for(qs.quant_type), np.float32)
    codes = np.asarray(reference.unpack_4bit(ops.from_storage(packed),
                                             qs.numel))
    absmax = np.asarray(ops.float_absmax(qs), np.float32)
    scale = np.repeat(absmax.astype(dt).astype(np.float32),
                      qs.blocksize)[:qs.numel]
    w = (lut.astype(dt).astype(np.float32)[codes] * scale).astype(dt)
    return w.astype(np.float64).reshape(qs.shape)
  lut = np.asarray(codebooks.code_for(qs.quant_type), np.float32)
  if jnp.dtype(compute_dtype) != jnp.float32:
    lut = np.asarray(jnp.asarray(lut).astype(jnp.bfloat16), np.float32)
  n = qs.numel
  codes = np.asarray(reference.unpack_4bit(ops.from_storage(packed), n))
  absmax = np.asarray(ops.float_absmax(qs), np.float64)
  scale = np.repeat(absmax, qs.blocksize)[:n]
  return (lut.astype(np.float64)[codes] * scale).reshape(qs.shape)


def lowered_gemv_4bit(config, m: int, n: int = 1000, k: int = 2048) -> str:
  """`gemv_4bit` with `config` for bf16 x `[m, k]` and an NF4 + DQ weight
  `[n, k]`, lowered for CUDA on an abstract H200 (no GPU needed); the
  calling test skips where this JAX has no Mosaic GPU lowering (a
  CPU-only install without the CUDA plugin)."""
  import functools  # pylint: disable=g-import-not-at-top
  from pallas_kernels import gemv_4bit as gk  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  s = jax.ShapeDtypeStruct
  code = tuple(float(c) for c in codebooks.code_for("nf4"))
  fn = functools.partial(gk.gemv_4bit, n=n, k=k, blocksize=64,
                         config=config, code=code)
  try:
    return helpers.lowered_for_h200(
        fn, s((m, k), jnp.bfloat16), s((n * k // 2,), jnp.uint8),
        s((n * k // 64,), jnp.uint8), s((16,), jnp.float32),
        nested=(s((-(-n * k // 64 // 256),), jnp.float32),
                s((256,), jnp.float32), s((), jnp.float32)))
  except AssertionError as e:  # no Mosaic GPU lowering rule registered
    pytest.skip(f"this JAX has no Mosaic GPU lowering (CUDA plugin): {e!r}")
