"""`KVCache`: the key/value cache of a Llama-family model, a JAX pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxbnb._src.models.config import LlamaConfig

__all__ = ["KVCache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values of every layer for a LEFT-padded batch.

  All rows share one write slot `index`; padding is marked in `mask`. Slot `s`
  of row `b` holds a real token when `mask[b, s]` is True. `positions[b]` is
  the RoPE position the next real token of row `b` gets.

  Example::

    >>> import jax.numpy as jnp
    >>> from jaxbnb.models import KVCache, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
    ...                   num_hidden_layers=2, num_attention_heads=2)
    >>> cache = KVCache.init(cfg, batch=3, max_len=10, dtype=jnp.bfloat16)
    >>> cache.k.shape, cache.k.dtype, int(cache.index)
    ((2, 3, 10, 2, 8), dtype(bfloat16), 0)

  Attributes:
    k: keys `[num_layers, B, max_len, num_kv_heads, head_dim]` (after RoPE).
    v: values, same shape.
    mask: bool `[B, max_len]`, True where the slot holds a real token.
    index: int32 scalar, the next slot to write.
    positions: int32 `[B]`, the next RoPE position per row.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array
  positions: jax.Array

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, max_len: int,
           dtype: Any = jnp.float32) -> "KVCache":
    """An empty cache for `batch` rows of up to `max_len` tokens.

    Args:
      config: the model config.
      batch: rows.
      max_len: slots per row (prompt + generated tokens, padding included).
      dtype: the dtype of keys/values (the model's compute dtype).

    Returns:
      The zero-filled cache.

    Raises:
      ValueError: if `batch` or `max_len` is not a positive int.
    """
    for name, value in (("batch", batch), ("max_len", max_len)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"KVCache.init: `{name}` must be a positive int, got {value!r}.")
    shape = (config.num_hidden_layers, batch, max_len,
             config.num_key_value_heads, config.head_dim)
    return cls(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
        positions=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    """Slots per row."""
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    """Rows."""
    return self.k.shape[1]
