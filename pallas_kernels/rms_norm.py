"""RMSNorm of a few rows in one kernel (the decode step's norms).

At one token a step XLA runs a Llama RMSNorm of `[1, H]` as two kernels:
the sum of squares (a reduction to a scalar) and the multiply that reads
it, about 1.2-1.4 us each on the H200 (docs/benchmarks.md, twenty-eighth
session, "the decode step in launch order"); from a few rows on it makes
one fusion. Here one program a row does both: the row in fp32, its mean
square, `rsqrt(mean + eps)`, the product rounded to x's dtype, times the
weight rounded to it, the product rounded again: the model's formula
(`jaxbnb._src.models.llama.RMSNorm`) and roundings, with the sum of
squares in another order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _backend
from pallas_kernels._backend import pl

__all__ = ["MAX_FEATURES", "can_use", "reference", "rms_norm"]

MAX_FEATURES = 16384  # one program holds a row: up to 16K values, a power
# of two (Triton's blocks; rows of other lengths keep XLA's norm)
_DTYPES = ("bfloat16", "float16", "float32")


def can_use(features: int, dtype) -> bool:
  """Whether the kernel takes rows of `features` values of `dtype`: a
  power of two up to `MAX_FEATURES`."""
  return (_backend.available() and 16 <= features <= MAX_FEATURES
          and features & (features - 1) == 0
          and jnp.dtype(dtype).name in _DTYPES)


def reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """The model's RMSNorm in jnp: `weight * (x * rsqrt(mean(x^2) + eps))`,
  the normalized row and the weight each rounded to x's dtype."""
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * h.astype(x.dtype)


def _kernel(x_ref, w_ref, o_ref, *, features, eps):
  r = pl.program_id(0)
  x = x_ref[r, :].astype(jnp.float32)
  mean = jnp.sum(x * x) / jnp.float32(features)
  h = (x * jax.lax.rsqrt(mean + jnp.float32(eps))).astype(o_ref.dtype)
  w = w_ref[...].astype(o_ref.dtype)
  o_ref[r, :] = (w.astype(jnp.float32) * h.astype(jnp.float32)
                 ).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float,
             num_warps: int | None = None,
             interpret: bool = False) -> jax.Array:
  """`reference(x, weight, eps)` with one program a row.

  Args:
    x: `[rows, features]`, bfloat16, float16 or float32; features a power
      of two from 16 to `MAX_FEATURES`.
    weight: `[features]`, any float dtype (rounded to x's).
    eps: added to the mean square.
    num_warps: warps a program; default one per 512 values of a row, 4
      to 16 (32 values a thread at most).
    interpret: run the kernel in Pallas' interpreter (CPU).

  Returns:
    `[rows, features]` in x's dtype.

  Raises:
    ValueError: naming the argument.

  Example:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels.rms_norm import rms_norm
    >>> x = jnp.full((1, 16), 3.0, jnp.bfloat16)
    >>> y = rms_norm(x, jnp.full((16,), 2.0), eps=0.0, interpret=True)
    >>> y.dtype.name, float(y[0, 0])
    ('bfloat16', 2.0)
  """
  if x.ndim != 2:
    raise ValueError(f"x: needs [rows, features], got shape {x.shape}")
  rows, features = x.shape
  if weight.shape != (features,):
    raise ValueError(f"weight: needs shape ({features},), got "
                     f"{weight.shape}")
  if not can_use(features, x.dtype):
    raise ValueError(
        f"x: the RMSNorm kernel takes a power of two from 16 to "
        f"{MAX_FEATURES} features of {', '.join(_DTYPES)}, got {features} "
        f"of {x.dtype}")
  kernel = functools.partial(_kernel, features=features, eps=float(eps))
  if num_warps is None:
    num_warps = max(4, min(16, features // 512))
  # Inside shard_map: x and the weight agree on the axes they vary over,
  # and so does the output.
  x, weight = _backend.same_vma(x, weight)
  return pl.pallas_call(
      kernel,
      out_shape=_backend.out_struct((rows, features), x.dtype, x, weight),
      grid=(rows,),
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=1),
      interpret=interpret,
      name="jaxbnb_rms_norm",
  )(x, weight)
