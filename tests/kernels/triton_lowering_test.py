"""The Triton kernels that have no lowering test of their own, lowered for
CUDA on an abstract H200 (`helpers.lowered_for_h200`: no GPU needed).

The GPU tests run on the device machine's JAX; CI installs the newest one.
A JAX release that breaks a kernel's tracing or lowering (as 0.12.1 broke
the Mosaic GPU kernels' inline PTX, `_backend.ref_type`) then fails here,
on the CPU, rather than first on a user's GPU. The numbers are the
interpret-mode tests' (each kernel's own test file).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.optim import kernels as optim_kernels
from jaxbnb._src.quant import codebooks
from pallas_kernels import code_tables
from pallas_kernels import dequantize_4bit as dk
from pallas_kernels import quantize_nested as nk
from pallas_kernels import rms_norm as rn
from tests import helpers
from tests.kernels import optim_8bit_test

TRITON = "__gpu$xla.gpu.triton"


def _kernels(text: str) -> int:
  return text.count(TRITON)


@pytest.mark.parametrize("kind", ["adam", "ademamix", "lion", "momentum",
                                  "rmsprop", "adagrad"])
def test_optimizer_step_lowers_for_cuda(kind):
  """The 8-bit optimizer step in kernel mode "pallas" (what a GPU runs):
  one Triton kernel for the parameter and its states."""
  rng = np.random.default_rng(0)
  s1, s2 = optim_8bit_test._init_states(kind, (256 * 9 + 5,), rng)
  hyper = optim_8bit_test._hyper(kind, wd=0.01)
  p = jax.ShapeDtypeStruct((256 * 9 + 5,), jnp.bfloat16)

  def step(p, g):
    return optim_kernels.optimizer_update_8bit(
        kind, p, g, s1, s2, lr=jnp.float32(1e-3), step=jnp.int32(2),
        hyper=hyper, mode="pallas")

  assert _kernels(helpers.lowered_for_h200(step, p, p)) == 1


@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_lowers_for_cuda(nested):
  x = jnp.asarray(np.random.default_rng(1).standard_normal(64 * 300),
                  jnp.bfloat16)
  packed, qs = F.quantize_4bit(x, blocksize=64, quant_type="nf4",
                               compress_statistics=nested)
  nest = (qs.nested_absmax, qs.nested_code, qs.offset) if nested else None
  lut = jnp.asarray(codebooks.code_for("nf4"))
  text = helpers.lowered_for_h200(
      lambda p, a: dk.dequantize_4bit(p, a, lut, numel=x.size, blocksize=64,
                                      dtype=jnp.bfloat16, nested=nest),
      packed.reshape(-1), qs.absmax)
  assert _kernels(text) == 1


def test_quantize_nested_lowers_for_cuda():
  lo, aux = (jnp.asarray(t) for t in code_tables.quantize_tables(
      np.asarray(F.create_dynamic_map(signed=True), np.float32)))
  text = helpers.lowered_for_h200(
      lambda a: nk.quantize_nested(a, jnp.float32(0.5), lo, aux),
      jax.ShapeDtypeStruct((256 * 33 + 77,), jnp.float32))
  assert _kernels(text) == 1


def test_rms_norm_lowers_for_cuda():
  text = helpers.lowered_for_h200(
      lambda x, w: rn.rms_norm(x, w, eps=1e-6),
      jax.ShapeDtypeStruct((4, 4096), jnp.bfloat16),
      jax.ShapeDtypeStruct((4096,), jnp.bfloat16))
  assert _kernels(text) == 1
