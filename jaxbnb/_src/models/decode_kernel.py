"""The decode step's attention as one Pallas kernel (`decode_attention`).

At one new token per row, a layer's attention through XLA is about ten
small kernels (cache writes, copies of the layer's cache slice, the two
products and the softmax). `pallas_kernels.decode_attention` writes the
token's key and value into the stacked cache in place and attends in one
launch. The model uses it when the kernel mode (`jaxbnb.kernel_mode`)
resolves to the kernels, `JAXBNB_ATTENTION` is not "xla", no tensor
parallelism is active (the kernel is opaque to GSPMD) and the kernel takes
the head size and dtypes; otherwise the einsum path runs.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from pallas_kernels import decode_attention as kernel

from jaxbnb._src.models import tensor_parallel
from jaxbnb._src.quant import dispatch

__all__ = ["attend", "attention_choice", "mode"]


def attention_choice() -> str:
  """`JAXBNB_ATTENTION`, checked: "auto" (the default), "cudnn" or "xla".

  Raises:
    ValueError: for any other value.
  """
  choice = os.environ.get("JAXBNB_ATTENTION", "auto").lower()
  if choice not in ("auto", "cudnn", "xla"):
    raise ValueError("JAXBNB_ATTENTION must be 'auto', 'cudnn' or 'xla', "
                     f"got {choice!r}.")
  return choice


def mode(dtype: Any, head_dim: int, cache_dtype: Any, groups: int
         ) -> str | None:
  """"pallas" or "interpret" where the kernel serves this layer (`groups`
  query heads per key/value head), else None."""
  if attention_choice() == "xla":
    return None
  resolved = dispatch.resolve()
  if (resolved == "reference" or tensor_parallel.current() is not None
      or not kernel.can_use(head_dim, dtype, cache_dtype, groups)):
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
