"""RMSNorm of a few rows in one kernel (the decode step's norms).

`weight * (x * rsqrt(mean(x**2) + eps))` as Llama's RMSNorm computes it
(float32 statistics, the normalized row rounded to x's dtype, then
multiplied by the weight in that dtype). XLA runs it as two kernels (the
reduction, then the scaling); at decode time each is a launch of about
1.3 us on a handful of rows, twice a layer (docs/benchmarks.md, "Decode
attention in one kernel"). Here one program takes one row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _backend
from pallas_kernels._backend import pl
from pallas_kernels._backend import pltriton

__all__ = ["can_use", "reference", "rms_norm"]

MAX_FEATURES = 32768


def can_use(features: int, dtype) -> bool:
  """Whether the kernel serves rows of `features` values of `dtype`."""
  return (_backend.available() and 1 <= features <= MAX_FEATURES
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16, jnp.float32))


def reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """The model's RMSNorm (`jaxbnb.models.RMSNorm`), in jnp."""
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * h.astype(x.dtype)


def _kernel(x_ref, w_ref, o_ref, *, features, width, eps):
  # One row per program, its block `width` (a power of two) wide: the
  # columns past `features` are masked, never read or written.
  ok = jnp.arange(width, dtype=jnp.int32) < features
  x = pltriton.load(x_ref, mask=ok, other=0).astype(jnp.float32)
  w = pltriton.load(w_ref, mask=ok, other=0)
  mean = jnp.sum(x * x) / jnp.float32(features)
  h = (x * jax.lax.rsqrt(mean + jnp.float32(eps))).astype(o_ref.dtype)
  y = w.astype(o_ref.dtype).astype(jnp.float32) * h.astype(jnp.float32)
  pltriton.store(o_ref, y.astype(o_ref.dtype), mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float,
             num_warps: int = 4, interpret: bool = False) -> jax.Array:
  """RMSNorm over the last axis, one program per row.

  Args:
    x: `[..., H]`, bfloat16, float16 or float32.
    weight: `[H]` scale (any float dtype; cast to `x.dtype` first).
    eps: added to the mean square.
    num_warps: Triton warps per program.
    interpret: Pallas interpret mode (CPU tests).

  Returns:
    `reference(x, weight, eps)`, `x`'s shape and dtype (the mean may sum
    in another order).

  Examples:
    >>> import jax.numpy as jnp
    >>> y = rms_norm(jnp.asarray([[3.0, 4.0]], jnp.bfloat16),
    ...              jnp.ones((2,)), eps=0.0, interpret=True)
    >>> y.dtype, [round(float(v), 2) for v in y[0]]
    (dtype(bfloat16), [0.85, 1.13])
  """
  features = x.shape[-1]
  if weight.shape != (features,):
    raise ValueError(f"rms_norm: weight must be ({features},) for x of shape "
                     f"{x.shape}, got {weight.shape}.")
  if not can_use(features, x.dtype):
    raise ValueError(f"rms_norm: rows of 1 to {MAX_FEATURES} bfloat16, "
                     f"float16 or float32 values, got {features} of "
                     f"{x.dtype}.")
  rows = 1
  for n in x.shape[:-1]:
    rows *= n
  x2 = x.reshape(rows, features)
  width = 1 << (features - 1).bit_length()
  args = _backend.same_vma(x2, weight)
  y = pl.pallas_call(
      functools.partial(_kernel, features=features, width=width,
                        eps=float(eps)),
      out_shape=_backend.out_struct((rows, features), x.dtype, *args),
      grid=(rows,),
      in_specs=[pl.BlockSpec((None, width), lambda i: (i, 0)),
                pl.BlockSpec((width,), lambda i: (0,))],
      out_specs=pl.BlockSpec((None, width), lambda i: (i, 0)),
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=1),
      interpret=interpret,
      name="jaxbnb_rms_norm",
      cost_estimate=pl.CostEstimate(
          flops=4 * rows * features, transcendentals=rows,
          bytes_accessed=2 * x2.size * x2.dtype.itemsize
          + weight.size * weight.dtype.itemsize),
  )(*args)
  return y.reshape(x.shape)
