"""Packed 4-bit bytes in a 16-bit float storage, moved between devices as
32-bit words.

bitsandbytes' `quant_storage` may be a float dtype (FSDP-QLoRA stores the
packed bytes as bfloat16 `[n / 4, 1]`). XLA:CPU moves 16-bit floats
between devices (all-gathers, collective permutes) through float32, which
turns every signalling-NaN bit pattern into the quiet NaN: 252 of the
65,536 bfloat16 patterns, i.e. changed 4-bit codes. Moves of such bytes go
through these uint32 words instead (two 16-bit values a word, rows paired),
which every backend moves as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["as_words", "from_words", "with_sharding_constraint", "word_dtype"]


def word_dtype(leaf, shards: int = 1):
  """The 16-bit float dtype of `leaf` when it is packed bytes `[rows, 1]`
  that `as_words` can pair (an even number of rows in each of `shards`),
  else None.

  Examples:
    >>> import jax.numpy as jnp
    >>> word_dtype(jnp.zeros((8, 1), jnp.bfloat16), shards=2)
    dtype(bfloat16)
    >>> word_dtype(jnp.zeros((8, 1), jnp.uint8)) is None
    True
  """
  dtype = getattr(leaf, "dtype", None)
  if (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
      and jnp.dtype(dtype).itemsize == 2 and leaf.ndim == 2
      and leaf.shape[1] == 1 and leaf.shape[0] % (2 * shards) == 0):
    return jnp.dtype(dtype)
  return None


def as_words(data: jax.Array) -> jax.Array:
  """`[rows, 1]` 16-bit values as `[rows / 2, 1]` uint32, the bytes kept.

  Examples:
    >>> import jax.numpy as jnp
    >>> as_words(jnp.zeros((4, 1), jnp.bfloat16)).shape
    (2, 1)
  """
  return jax.lax.bitcast_convert_type(
      data.reshape(-1, 2), jnp.uint32).reshape(-1, 1)


def from_words(words: jax.Array, dtype) -> jax.Array:
  """`as_words` undone: `[rows, 1]` of `dtype`.

  Examples:
    >>> import numpy as np
    >>> import jax.numpy as jnp
    >>> x = jnp.asarray(np.array([0x7f81, 1, 2, 3], np.uint16)
    ...                 .view(jnp.bfloat16)).reshape(4, 1)
    >>> bool((from_words(as_words(x), x.dtype).view(jnp.uint16)
    ...       == x.view(jnp.uint16)).all())
    True
  """
  return jax.lax.bitcast_convert_type(
      words.reshape(-1), dtype).reshape(-1, 1)


def with_sharding_constraint(x: jax.Array, sharding) -> jax.Array:
  """`jax.lax.with_sharding_constraint(x, sharding)`, the move made on
  `as_words`' words where `word_dtype` takes `x` (its bytes kept).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import make_single_device_sharding
    >>> x = jnp.zeros((4, 1), jnp.bfloat16)
    >>> jax.jit(lambda x: with_sharding_constraint(
    ...     x, make_single_device_sharding(jax.devices()[0])))(x).dtype
    dtype(bfloat16)
  """
  dtype = word_dtype(x)
  if dtype is None:
    return jax.lax.with_sharding_constraint(x, sharding)
  return from_words(jax.lax.with_sharding_constraint(as_words(x), sharding),
                    dtype)
