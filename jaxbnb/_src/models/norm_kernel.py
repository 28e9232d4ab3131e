"""The decode step's RMSNorm as one Pallas kernel (`rms_norm`).

At one token a step XLA runs each RMSNorm as two kernels, a reduction to
the sum of squares and the multiply that reads it (docs/benchmarks.md,
twenty-eighth session); `pallas_kernels.rms_norm` does both in one launch.
The model uses it for up to `MAX_ROWS` rows when the kernel mode
(`jaxbnb.kernel_mode`) resolves to the kernels, no tensor parallelism is
active (the kernel is opaque to GSPMD) and the kernel takes the row's
length and dtype; otherwise XLA's norm runs. Gradients flow through the
jnp formula (`custom_vjp`), so training sees the same derivative either way.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax

from pallas_kernels import rms_norm as kernel

from jaxbnb._src.models import tensor_parallel
from jaxbnb._src.quant import dispatch

__all__ = ["MAX_ROWS", "apply", "mode", "rms_norm"]

MAX_ROWS = 1  # from two rows XLA makes one fusion of the norm


def mode(rows: int, features: int, dtype: Any) -> str | None:
  """"pallas" or "interpret" where the kernel serves `rows` rows of
  `features` values, else None."""
  if rows > MAX_ROWS or not kernel.can_use(features, dtype):
    return None
  resolved = dispatch.resolve()
  if resolved == "reference" or tensor_parallel.current() is not None:
    return None
  return resolved


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float, run_mode: str
             ) -> jax.Array:
  """`kernel.reference(x, weight, eps)` over the last axis of `x` by the
  kernel (`run_mode`: `mode(...)`'s answer), differentiated as the
  reference."""
  shape = x.shape
  out = kernel.rms_norm(x.reshape(-1, shape[-1]), weight, eps=eps,
                        interpret=run_mode == "interpret")
  return out.reshape(shape)


def _fwd(x, weight, eps, run_mode):
  return rms_norm(x, weight, eps, run_mode), (x, weight)


def _bwd(eps, run_mode, res, g):
  del run_mode
  x, weight = res
  _, vjp = jax.vjp(lambda a, b: kernel.reference(a, b, eps), x, weight)
  return vjp(g)


rms_norm.defvjp(_fwd, _bwd)


def apply(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """The model's RMSNorm over the last axis of `x`: the kernel where
  `mode` serves these rows, else the jnp formula (`kernel.reference`)."""
  run_mode = mode(math.prod(x.shape[:-1]), x.shape[-1], x.dtype)
  if run_mode is not None:  # a decode step's row: one kernel
    return rms_norm(x, weight, eps, run_mode)
  return kernel.reference(x, weight, eps)
