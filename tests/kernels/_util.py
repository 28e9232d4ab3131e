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
