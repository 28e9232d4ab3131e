"""Shared helpers for the kernel tests."""

from __future__ import annotations

import jax
import numpy as np

from jaxbnb._src.quant import kernels


def on_gpu() -> bool:
  return any(d.platform == "gpu" for d in jax.devices())


def modes():
  """Kernel modes to test here: interpret always, compiled on a GPU."""
  return ["interpret"]


def thresholds(quant_type):
  return kernels.thresholds(quant_type)


def rng_array(shape, seed, dtype, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)
