"""The decode step's small Pallas kernels: attention and RMSNorm.

At one new token per row, a layer's attention through XLA is about ten
small kernels (cache writes, copies of the layer's cache slice, the two
products and the softmax). `pallas_kernels.decode_attention` applies RoPE,
writes the token's key and value into the stacked cache in place and
attends in one launch. The model uses it when the kernel mode
(`jaxbnb.kernel_mode`) resolves to the kernels, `JAXBNB_ATTENTION` is not
"xla", no tensor parallelism is active (the kernels are opaque to GSPMD)
and the kernel takes the head size and dtypes; otherwise the einsum path
runs.

An RMSNorm of up to `MAX_NORM_ROWS` rows (a decode step's) is one
`pallas_kernels.rms_norm` launch instead of XLA's two, under the same
conditions (16-bit rows); its gradient is the jnp reference's.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import decode_attention as kernel
from pallas_kernels import rms_norm as norm_kernel

from jaxbnb._src.models import tensor_parallel
from jaxbnb._src.quant import dispatch

__all__ = ["MAX_NORM_ROWS", "attend", "mode", "rms_norm"]

MAX_NORM_ROWS = 64


def mode(dtype: Any, head_dim: int, cache_dtype: Any) -> str | None:
  """"pallas" or "interpret" where the kernel serves this layer, else None."""
  if os.environ.get("JAXBNB_ATTENTION", "auto").lower() == "xla":
    return None
  resolved = dispatch.resolve()
  if (resolved == "reference" or tensor_parallel.current() is not None
      or not kernel.can_use(head_dim, dtype, cache_dtype)):
    return None
  return resolved


def attend(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array,
           sin: jax.Array, kv_cache: tuple[jax.Array, jax.Array, int],
           allowed: jax.Array, index: jax.Array, run_mode: str
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Attention of one token per row, RoPE applied, the cache updated.

  Args:
    q: queries `[B, 1, nq, d]` before RoPE.
    k: the token's keys `[B, 1, nkv, d]` before RoPE.
    v: its values, same shape.
    cos: RoPE cosines `[B, 1, d]`.
    sin: RoPE sines `[B, 1, d]`.
    kv_cache: `(k_cache, v_cache, layer)` as `Attention` takes it.
    allowed: bool `[B, 1, S]`, the slots the token sees.
    index: the token's slot.
    run_mode: `mode(...)`'s answer.

  Returns:
    `(out [B, 1, nq * d], (k_cache, v_cache))`.
  """
  ck, cv, layer = kv_cache
  b, _, nq, d = q.shape
  out, ck, cv = kernel.decode_attention(
      q[:, 0], k[:, 0].astype(ck.dtype), v[:, 0].astype(cv.dtype),
      cos[:, 0].astype(q.dtype), sin[:, 0].astype(q.dtype), ck, cv,
      allowed[:, 0], index, layer=int(layer),
      scale=float(np.float32(d ** -0.5)), interpret=run_mode == "interpret")
  return out.reshape(b, 1, nq * d), (ck, cv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _norm(x, weight, eps, interpret):
  return norm_kernel.rms_norm(x, weight, eps=eps, interpret=interpret)


def _norm_fwd(x, weight, eps, interpret):
  return _norm(x, weight, eps, interpret), (x, weight)


def _norm_bwd(eps, interpret, res, g):
  del interpret
  x, weight = res
  _, vjp = jax.vjp(lambda a, w: norm_kernel.reference(a, w, eps), x, weight)
  return vjp(g)


_norm.defvjp(_norm_fwd, _norm_bwd)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float
             ) -> jax.Array | None:
  """The kernel's RMSNorm of `x` where it serves, else None (then the
  caller runs its own): at most `MAX_NORM_ROWS` rows of 16-bit values,
  the kernels on, no tensor parallelism.

  Args:
    x: `[..., H]` activations.
    weight: `[H]` scale.
    eps: added to the mean square.

  Returns:
    `weight * (x * rsqrt(mean(x**2) + eps))` in `x.dtype` (the model's
    roundings), or None.
  """
  resolved = dispatch.resolve()
  if (resolved == "reference" or tensor_parallel.current() is not None
      or jnp.dtype(x.dtype) not in (jnp.bfloat16, jnp.float16)
      or math.prod(x.shape[:-1]) > MAX_NORM_ROWS
      or not norm_kernel.can_use(x.shape[-1], x.dtype)):
    return None
  return _norm(x, weight, float(eps), resolved == "interpret")
