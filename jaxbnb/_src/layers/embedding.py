"""Flax NNX embeddings from bitsandbytes: 8-bit, 4-bit and stable.

* `Embedding8bit`: the table as LLM.int8 rows (`Int8Params`): one int8 row
  and one float32 absmax per token, `out = CB[ids] * (SCB[ids] / 127)`.
* `Embedding4bit` (`EmbeddingNF4`, `EmbeddingFP4`): the table as a packed
  NF4/FP4 `Params4bit`; a lookup gathers the packed bytes and absmax blocks
  of the requested rows and dequantizes only those.
* `StableEmbedding`: a float table with Xavier-uniform init and a float32
  LayerNorm after the lookup, whose optimizer state stays 32-bit
  (`stable_embedding_override`).
* `quantize_embeddings(model, bits)`: swaps a model's embeddings for the
  8-bit or 4-bit ones, in place.

The quantized tables live in a `QuantizedWeight` variable (never an
`nnx.Param`): they are frozen, and `nnx.state`, `nnx.split`/`nnx.merge`
and orbax carry them like any other state (bitsandbytes cannot save these
layers at all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb._src.layers.common import QuantizedWeight
from jaxbnb._src.layers.common import check_fixed_quant_type
from jaxbnb._src.layers.common import replace_modules
from jaxbnb._src.layers.linear import precision_for
from jaxbnb._src.quant import int8
from jaxbnb._src.quant import ops
from jaxbnb._src.quant import reference
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.state import QuantState
from jaxbnb._src.quant.weights import Int8Params
from jaxbnb._src.quant.weights import Params4bit

__all__ = ["Embedding", "Embedding8bit", "Embedding4bit", "EmbeddingNF4",
           "EmbeddingFP4", "StableEmbedding", "quantize_embeddings",
           "stable_embedding_override"]

# flax's `nnx.Embed` default: normal with variance 1 / embedding_dim.
default_embed_init = nnx.initializers.variance_scaling(
    1.0, "fan_in", "normal", out_axis=0)
# bitsandbytes' `StableEmbedding.reset_parameters`: torch's xavier_uniform_,
# bound sqrt(6 / (num_embeddings + embedding_dim)).
default_stable_init = nnx.initializers.xavier_uniform()


def _check_args(num_embeddings, embedding_dim, dtype, param_dtype,
                fn) -> tuple[int, int]:
  """The sizes as Python ints, after checking them and the dtypes."""
  if dtype is not None:
    validation.check_dtype(dtype, "dtype", fn)
  validation.check_dtype(param_dtype, "param_dtype", fn)
  return (validation.check_positive_int(num_embeddings, "num_embeddings", fn),
          validation.check_positive_int(embedding_dim, "embedding_dim", fn))


def _check_table(table, fn) -> jax.Array:
  """A float `[num_embeddings, embedding_dim]` table to quantize."""
  table = jnp.asarray(table)
  if table.ndim != 2:
    raise ValueError(f"{fn}: `table` must be 2-D [num_embeddings, "
                     f"embedding_dim], got shape {tuple(table.shape)}.")
  validation.check_float_array(table, "table", fn)
  return table


def _check_query(query, embedding_dim, fn) -> jax.Array:
  query = jnp.asarray(query)
  if query.ndim == 0 or query.shape[-1] != embedding_dim:
    raise ValueError(f"{fn}: `query` must have shape [..., embedding_dim="
                     f"{embedding_dim}], got {tuple(query.shape)}.")
  return query


def _check_ids(ids, fn) -> jax.Array:
  """`ids` as an integer array; float ids are an error (as `nnx.Embed`)."""
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{fn}: `ids` must be an integer array, got dtype "
                     f"{ids.dtype}.")
  return ids


def _row_index(ids: jax.Array, n: int) -> jax.Array:
  """Flat int32 rows of `ids`: a row in `[0, n)`, or `n` when out of range.

  Read as `jnp.take` reads them: `-n <= id < 0` counts from the end; any
  other id outside `[0, n)` (below `-n`, past the end, an unsigned id past
  the int32 range) is out of range.
  """
  ids = ids.reshape(-1)
  if ids.dtype.itemsize < 4:
    ids = ids.astype(jnp.int32)
  in_range = ids < n
  if jnp.issubdtype(ids.dtype, jnp.signedinteger):
    in_range &= ids >= -n
    ids = jnp.where(ids < 0, ids + n, ids)
  return jnp.where(in_range, ids, n).astype(jnp.int32)


def _float_table(embed) -> jax.Array:
  """The `[num_embeddings, embedding_dim]` table of an embedding module."""
  if isinstance(embed, nnx.Embed):
    return embed.embedding[...]
  return embed.weight[...]


def _is_embedding(node) -> bool:
  """An `nnx.Embed`, or a module with `attend` and a 2-D `weight` Param.

  The second form is jaxbnb's `models.Embedding` (PyTorch's `.weight`
  `[vocab, hidden]`), which the Llama models use for `embed_tokens`.
  """
  if isinstance(node, nnx.Embed):
    return True
  if (not isinstance(node, nnx.Module) or isinstance(
      node, (_QuantizedEmbedding, Embedding))):
    return False
  weight = getattr(node, "weight", None)
  return (callable(getattr(type(node), "attend", None))
          and isinstance(weight, nnx.Param)
          and len(weight.get_value().shape) == 2)


class _QuantizedEmbedding(nnx.Module):
  """What the quantized embeddings share: checks, attributes, output dtype."""

  def _init_table(self, num_embeddings, embedding_dim, weight, dtype,
                  param_dtype):
    name = type(self).__name__
    if tuple(weight.shape) != (num_embeddings, embedding_dim):
      raise ValueError(
          f"{name}: `weight` must have shape [num_embeddings, embedding_dim]="
          f"[{num_embeddings}, {embedding_dim}], got {list(weight.shape)}.")
    self.num_embeddings = num_embeddings
    self.embedding_dim = embedding_dim
    self.dtype = jnp.dtype(weight.dtype if dtype is None else dtype)
    self.param_dtype = jnp.dtype(param_dtype)
    self.weight = QuantizedWeight(weight)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """The embedding rows of `ids` (any shape), `ids.shape + (dim,)`.

    Only the requested rows are dequantized; an out-of-range id gives NaN
    (as `jnp.take` fills), a negative one counts from the end.
    """
    ids = _check_ids(ids, type(self).__name__)
    flat = _row_index(ids, self.num_embeddings)
    if flat.shape[0] == 0:
      return jnp.zeros(ids.shape + (self.embedding_dim,), self.dtype)
    # Out-of-range rows are NaN whatever the gathers fill (a uint8 nested
    # absmax code filled with 255 would decode to a finite scale).
    rows = self._rows(flat).reshape(flat.shape[0], self.embedding_dim)
    rows = jnp.where((flat == self.num_embeddings)[:, None], jnp.nan, rows)
    return rows.reshape(ids.shape + (self.embedding_dim,)).astype(self.dtype)

  def _rows(self, flat_ids: jax.Array) -> jax.Array:
    raise NotImplementedError


class Embedding8bit(_QuantizedEmbedding):
  """bitsandbytes' `Embedding8bit`: a frozen table of int8 rows.

  Each embedding row (one token's vector) is quantized on its own, as
  LLM.int8 quantizes weight rows, from the table cast to float16 as
  bitsandbytes' `Int8Params` casts it: `CB[r] = rint(W[r] * 127 / SCB[r])`
  with `SCB[r] = max |W[r]|`. A lookup gathers the int8 rows and their scales and
  returns `CB[ids] * (SCB[ids] / 127)` in float32, bit for bit
  bitsandbytes' forward; the whole table is never dequantized.
  The table takes `num_embeddings * (embedding_dim + 4)` bytes, about a
  quarter of float32.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import Embedding8bit
    >>> emb = Embedding8bit(100, 16, rngs=nnx.Rngs(0))
    >>> emb(jnp.array([[1, 2, 3]])).shape
    (1, 3, 16)
    >>> w = emb.weight.get_value()
    >>> w.CB.shape, w.CB.dtype, w.SCB.shape
    ((100, 16), dtype('int8'), (100,))
    >>> emb.attend(jnp.ones((2, 16))).shape
    (2, 100)

  Args:
    num_embeddings: number of rows (vocabulary size).
    embedding_dim: features per row.
    dtype: output (and `attend` compute) dtype; None means the dtype of the
      float table that was quantized (`param_dtype`).
    param_dtype: dtype of the initial float table.
    embedding_init: initializer of the float `[num_embeddings,
      embedding_dim]` table (quantized right away); flax's `nnx.Embed`
      default.
    weight: an existing `Int8Params` of shape `[num_embeddings,
      embedding_dim]` (then nothing is initialized and `rngs` may be None).
    rngs: random number generators.

  Raises:
    ValueError: for non-positive sizes, a missing `rngs`, or a `weight` of
      another shape.
  """

  def __init__(
      self,
      num_embeddings: int,
      embedding_dim: int,
      *,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      embedding_init=default_embed_init,
      weight: Int8Params | None = None,
      rngs: nnx.Rngs | None = None,
  ):
    name = type(self).__name__
    num_embeddings, embedding_dim = _check_args(
        num_embeddings, embedding_dim, dtype, param_dtype, name)
    if weight is None:
      if rngs is None:
        raise ValueError(f"{name}: `rngs` is required unless `weight` is "
                         "given.")
      table = embedding_init(rngs.params(), (num_embeddings, embedding_dim),
                             param_dtype)
      weight = int8.quantize_int8_weight(table)
    elif not isinstance(weight, Int8Params):
      raise TypeError(f"{name}: `weight` must be an Int8Params, got "
                      f"{type(weight).__name__}.")
    self._init_table(num_embeddings, embedding_dim, weight, dtype,
                     param_dtype)

  @classmethod
  def from_float(cls, table: jax.Array, *,
                 dtype: Any = None) -> "Embedding8bit":
    """Quantizes a float `[num_embeddings, embedding_dim]` table.

    Args:
      table: float32, float16 or bfloat16 table.
      dtype: output dtype (default: the table's).

    Returns:
      The 8-bit embedding.
    """
    table = _check_table(table, f"{cls.__name__}.from_float")
    weight = int8.quantize_int8_weight(table)
    return cls(*weight.shape, dtype=dtype, param_dtype=table.dtype,
               weight=weight)

  @classmethod
  def from_embed(cls, embed: nnx.Module, *,
                 dtype: Any = None) -> "Embedding8bit":
    """Quantizes an `nnx.Embed` (or a module with a `[num, dim]` `weight`).

    Args:
      embed: the float embedding.
      dtype: output dtype (default: `embed.dtype`, else the table's).

    Returns:
      The 8-bit embedding.
    """
    if dtype is None:
      dtype = getattr(embed, "dtype", None)
    return cls.from_float(_float_table(embed), dtype=dtype)

  def _rows(self, flat_ids):
    w = self.weight.get_value()
    cb = jnp.take(w.CB, flat_ids, axis=0)
    scb = jnp.take(w.SCB, flat_ids, axis=0)
    # bitsandbytes' `Embedding8bit.forward`: `CB * (SCB / 127.0)` in
    # float32 (not `int8_vectorwise_dequant`'s `CB * SCB * (1 / 127)`). XLA
    # turns a division by a broadcast constant into a multiplication by its
    # rounded reciprocal; the barrier hides that the divisor is one.
    scb, divisor = jax.lax.optimization_barrier(
        (scb.astype(jnp.float32), jnp.full(scb.shape, 127.0, jnp.float32)))
    return cb.astype(jnp.float32) * (scb / divisor)[:, None]

  def attend(self, query: jax.Array) -> jax.Array:
    """Tied output head: float32 logits `query @ W.T`, `[..., num_embeddings]`.

    The int8 codes are cast to `dtype` (exact: every int8 is a float16 and
    a bfloat16 value) and multiplied with `query` accumulating in float32;
    each logit column is then scaled by `SCB / 127`. No dequantized table is
    built, but the cast of all `CB` may be materialized.
    """
    w = self.weight.get_value()
    dtype = self.dtype
    query = _check_query(query, self.embedding_dim,
                         f"{type(self).__name__}.attend")
    acc = jnp.einsum("...h,vh->...v", query.astype(dtype),
                     w.CB.astype(dtype), precision=precision_for(dtype),
                     preferred_element_type=jnp.float32)
    return acc * (w.SCB.astype(jnp.float32) * jnp.float32(1.0 / 127.0))


def _check_4bit(quant_type, blocksize, fn):
  validation.check_quant_type(quant_type, fn=fn)
  validation.check_blocksize(blocksize, validation.BLOCKSIZES_4BIT, fn=fn)


def _gathered_absmax(qs: QuantState, blocks: jax.Array) -> jax.Array:
  """float32 absmax of the blocks `blocks`, nested ones dequantized.

  The same float32 operations as `dequantize_4bit` on the full table
  (`code[q] * nested_absmax[j // nested_blocksize]`, rounded, then
  `+ offset`), applied to the gathered blocks only, so bit-identical.
  """
  if not qs.nested:
    return jnp.take(qs.absmax, blocks).astype(jnp.float32)
  q = jnp.take(qs.absmax, blocks)
  scale = jnp.take(qs.nested_absmax, blocks // qs.nested_blocksize)
  deq = reference.dequantize_blockwise(q, scale, qs.nested_code, 1,
                                       jnp.float32)
  # A separate add after the rounded product (no FMA), as bitsandbytes.
  deq = jax.lax.optimization_barrier(deq)
  return deq + qs.offset.astype(jnp.float32)


class Embedding4bit(_QuantizedEmbedding):
  """bitsandbytes' `Embedding4bit`: a frozen NF4/FP4 table.

  The `[num_embeddings, embedding_dim]` table is stored as a `Params4bit`,
  exactly as `quantize_4bit` stores it (flattened row-major, blockwise
  absmax). When `embedding_dim` is a multiple of `blocksize`, row `r` is
  the packed bytes `[r * dim / 2, (r + 1) * dim / 2)` and the absmax blocks
  `[r * dim / blocksize, ...)`, and a lookup gathers and dequantizes only
  those (nested absmax included); otherwise blocks span rows and, as in
  bitsandbytes, a lookup dequantizes the whole table. Defaults
  follow bitsandbytes: `quant_type="fp4"`, `blocksize=64`, no double
  quantization.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import Embedding4bit
    >>> emb = Embedding4bit(100, 64, quant_type="nf4", rngs=nnx.Rngs(0))
    >>> emb(jnp.array([[1, 2, 3]])).shape
    (1, 3, 64)
    >>> qs = emb.weight.get_value().quant_state
    >>> qs.shape, qs.quant_type, qs.absmax.shape
    ((100, 64), 'nf4', (100,))

  Args:
    num_embeddings: number of rows (vocabulary size).
    embedding_dim: features per row (a multiple of `blocksize` lets a
      lookup dequantize only its rows).
    dtype: output (and `attend` compute) dtype; None means the dtype of the
      float table that was quantized (`param_dtype`).
    param_dtype: dtype of the initial float table.
    quant_type: "nf4" or "fp4".
    blocksize: elements per absmax block (32 ... 4096).
    compress_statistics: double-quantize the absmax.
    quant_storage: dtype the packed bytes are viewed as.
    embedding_init: initializer of the float table (quantized right away).
    weight: an existing `Params4bit` of shape `[num_embeddings,
      embedding_dim]` (then nothing is initialized and `rngs` may be None).
    rngs: random number generators.

  Raises:
    ValueError: for a bad quant_type or blocksize, a missing `rngs`, or a
      `weight`
      of another shape (or, for `EmbeddingNF4`/`EmbeddingFP4`, of the other
      quant_type).
  """

  _default_quant_type = "fp4"
  _fixed_quant_type = None  # "nf4" / "fp4" in EmbeddingNF4 / EmbeddingFP4

  def __init__(
      self,
      num_embeddings: int,
      embedding_dim: int,
      *,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      quant_type: str = "fp4",
      blocksize: int = 64,
      compress_statistics: bool = False,
      quant_storage: Any = jnp.uint8,
      embedding_init=default_embed_init,
      weight: Params4bit | None = None,
      rngs: nnx.Rngs | None = None,
  ):
    name = type(self).__name__
    num_embeddings, embedding_dim = _check_args(
        num_embeddings, embedding_dim, dtype, param_dtype, name)
    if weight is None:
      _check_4bit(quant_type, blocksize, name)
      if rngs is None:
        raise ValueError(f"{name}: `rngs` is required unless `weight` is "
                         "given.")
      table = embedding_init(rngs.params(), (num_embeddings, embedding_dim),
                             param_dtype)
      weight = Params4bit.from_float(
          table, blocksize=blocksize, quant_type=quant_type,
          compress_statistics=compress_statistics,
          quant_storage=quant_storage)
    elif not isinstance(weight, Params4bit):
      raise TypeError(f"{name}: `weight` must be a Params4bit, got "
                      f"{type(weight).__name__}.")
    else:
      qs = weight.quant_state
      _check_4bit(qs.quant_type, qs.blocksize, name)
      if (self._fixed_quant_type is not None
          and qs.quant_type != self._fixed_quant_type):
        raise ValueError(
            f"{name}: `weight` must be quantized with quant_type "
            f"{self._fixed_quant_type!r}, got {qs.quant_type!r}.")
    self._init_table(num_embeddings, embedding_dim, weight, dtype,
                     param_dtype)

  @classmethod
  def from_float(cls, table: jax.Array, *, dtype: Any = None,
                 **kwargs) -> "Embedding4bit":
    """Quantizes a float `[num_embeddings, embedding_dim]` table.

    Args:
      table: float32, float16 or bfloat16 table.
      dtype: output dtype (default: the table's).
      **kwargs: `quant_type` (default: the class's), `blocksize`,
        `compress_statistics` (default False), `quant_storage`.

    Returns:
      The 4-bit embedding.

    Raises:
      ValueError: as the constructor, or for a `quant_type` that conflicts
        with a fixed-type class.
    """
    name = f"{cls.__name__}.from_float"
    unknown = set(kwargs) - {"quant_type", "blocksize", "compress_statistics",
                             "quant_storage"}
    if unknown:
      raise TypeError(f"{name}: unexpected arguments {sorted(unknown)}.")
    quant_type = kwargs.setdefault("quant_type", cls._default_quant_type)
    check_fixed_quant_type(cls._fixed_quant_type, quant_type, name)
    table = _check_table(table, name)
    _check_4bit(quant_type, kwargs.get("blocksize", 64), name)
    weight = Params4bit.from_float(table, **kwargs)
    return cls(*table.shape, dtype=dtype, param_dtype=table.dtype,
               weight=weight)

  @classmethod
  def from_embed(cls, embed: nnx.Module, *, dtype: Any = None,
                 **kwargs) -> "Embedding4bit":
    """Quantizes an `nnx.Embed` (or a module with a `[num, dim]` `weight`).

    Args:
      embed: the float embedding.
      dtype: output dtype (default: `embed.dtype`, else the table's).
      **kwargs: as `from_float`.

    Returns:
      The 4-bit embedding.
    """
    if dtype is None:
      dtype = getattr(embed, "dtype", None)
    return cls.from_float(_float_table(embed), dtype=dtype, **kwargs)

  def _rows(self, flat_ids):
    w = self.weight.get_value()
    qs = w.quant_state
    dim = self.embedding_dim
    if dim % qs.blocksize:
      # Blocks (and, for an odd dim, bytes) span rows: as bitsandbytes
      # (which warns), the whole table is dequantized and the rows taken.
      return jnp.take(w.dequantize(), flat_ids, axis=0)
    packed = ops.from_storage(w.data).reshape(self.num_embeddings, dim // 2)
    rows = jnp.take(packed, flat_ids, axis=0).reshape(-1)
    per_row = dim // qs.blocksize
    blocks = (flat_ids[:, None] * per_row
              + jnp.arange(per_row, dtype=jnp.int32)).reshape(-1)
    sub = QuantState(absmax=_gathered_absmax(qs, blocks), code=qs.code,
                     shape=(flat_ids.shape[0], dim), dtype=qs.dtype,
                     blocksize=qs.blocksize, quant_type=qs.quant_type)
    return ops.dequantize_flat(rows, sub)

  def attend(self, query: jax.Array) -> jax.Array:
    """Tied output head: float32 logits `query @ W.T`, `[..., num_embeddings]`.

    Every row takes part, so this dequantizes the whole table (to `dtype`,
    transiently, on every call) and multiplies in `dtype` accumulating in
    float32.
    """
    dtype = self.dtype
    query = _check_query(query, self.embedding_dim,
                         f"{type(self).__name__}.attend")
    table = self.weight.get_value().dequantize().astype(dtype)
    return jnp.einsum("...h,vh->...v", query.astype(dtype),
                      table, precision=precision_for(dtype),
                      preferred_element_type=jnp.float32)


class EmbeddingNF4(Embedding4bit):
  """`Embedding4bit` with `quant_type="nf4"` (another one is an error)."""

  _default_quant_type = "nf4"
  _fixed_quant_type = "nf4"

  def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs):
    check_fixed_quant_type("nf4", kwargs.get("quant_type", "nf4"),
                           type(self).__name__)
    kwargs["quant_type"] = "nf4"
    super().__init__(num_embeddings, embedding_dim, **kwargs)


class EmbeddingFP4(Embedding4bit):
  """`Embedding4bit` with `quant_type="fp4"` (another one is an error)."""

  _fixed_quant_type = "fp4"

  def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs):
    check_fixed_quant_type("fp4", kwargs.get("quant_type", "fp4"),
                           type(self).__name__)
    kwargs["quant_type"] = "fp4"
    super().__init__(num_embeddings, embedding_dim, **kwargs)


class Embedding(nnx.Module):
  """bitsandbytes' `Embedding`: a float table, Xavier init, 32-bit state.

  A float table (`weight`, an `nnx.Param`, trainable) initialized
  Xavier-uniform; a lookup returns its rows in `dtype`. bitsandbytes keeps
  the table's optimizer state in 32 bits; in jaxbnb pass
  `override=stable_embedding_override(model)` to the 8-bit optimizer.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import Embedding
    >>> emb = Embedding(100, 16, padding_idx=0, rngs=nnx.Rngs(0))
    >>> y = emb(jnp.array([[0, 2, 3]]))
    >>> y.shape, y.dtype, float(abs(y[0, 0]).max())
    ((1, 3, 16), dtype('float32'), 0.0)

  Args:
    num_embeddings: number of rows.
    embedding_dim: features per row.
    dtype: output dtype; None means `param_dtype` (bitsandbytes returns the
      weight's dtype).
    param_dtype: dtype of the table.
    embedding_init: initializer of the table (Xavier uniform).
    padding_idx: as bitsandbytes' (PyTorch's `nn.Embedding`): this row
      starts at zero and gets no gradient; negative counts from the end.
    rngs: random number generators.

  Raises:
    ValueError: for non-positive sizes, a `padding_idx` outside the table
      or float `ids`.
  """

  def __init__(
      self,
      num_embeddings: int,
      embedding_dim: int,
      *,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      embedding_init=default_stable_init,
      padding_idx: int | None = None,
      rngs: nnx.Rngs,
  ):
    num_embeddings, embedding_dim = _check_args(
        num_embeddings, embedding_dim, dtype, param_dtype, type(self).__name__)
    if padding_idx is not None:
      if (isinstance(padding_idx, bool)
          or not isinstance(padding_idx, (int, np.integer))
          or not -num_embeddings <= padding_idx < num_embeddings):
        raise ValueError(
            f"{type(self).__name__}: `padding_idx` must be an int in "
            f"[-{num_embeddings}, {num_embeddings}) (num_embeddings), got "
            f"{padding_idx!r}.")
      padding_idx = int(padding_idx) % num_embeddings
    self.num_embeddings = num_embeddings
    self.embedding_dim = embedding_dim
    self.padding_idx = padding_idx
    self.dtype = jnp.dtype(param_dtype if dtype is None else dtype)
    self.param_dtype = jnp.dtype(param_dtype)
    table = embedding_init(rngs.params(), (num_embeddings, embedding_dim),
                           param_dtype)
    if padding_idx is not None:
      table = table.at[padding_idx].set(0)
    self.weight = nnx.Param(table)

  def rows(self, ids: jax.Array) -> jax.Array:
    """`weight[ids]` in the table's dtype, `ids.shape + (dim,)`; the
    padding row's lookups pass no gradient to the table."""
    ids = _check_ids(ids, type(self).__name__)
    rows = jnp.take(self.weight[...], ids, axis=0)
    if self.padding_idx is not None:
      rows = jnp.where((ids == self.padding_idx)[..., None],
                       jax.lax.stop_gradient(rows), rows)
    return rows

  def __call__(self, ids: jax.Array) -> jax.Array:
    """`weight[ids]` in `dtype`, `ids.shape + (dim,)`."""
    return self.rows(ids).astype(self.dtype)


class StableEmbedding(Embedding):
  """bitsandbytes' `StableEmbedding`: Xavier init, LayerNorm, 32-bit state.

  An `Embedding` whose looked-up rows go through a LayerNorm computed in
  float32 (bitsandbytes' "full precision"; epsilon 1e-5, scale 1, bias 0,
  as `torch.nn.LayerNorm`) and come out in `dtype`. bitsandbytes keeps the
  table's optimizer state in 32 bits; in jaxbnb pass
  `override=stable_embedding_override(model)` to the 8-bit optimizer.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import StableEmbedding
    >>> emb = StableEmbedding(100, 16, rngs=nnx.Rngs(0))
    >>> y = emb(jnp.array([[1, 2, 3]]))
    >>> y.shape, y.dtype
    ((1, 3, 16), dtype('float32'))
    >>> abs(float(y.mean())) < 1e-5  # normalized rows
    True

  Args:
    num_embeddings, embedding_dim, dtype, param_dtype, embedding_init,
      padding_idx, rngs: as `Embedding`'s (the LayerNorm's parameters are
      float32 whatever `param_dtype`).
    epsilon: the LayerNorm's epsilon.

  Raises:
    ValueError: as `Embedding`.
  """

  def __init__(
      self,
      num_embeddings: int,
      embedding_dim: int,
      *,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      embedding_init=default_stable_init,
      epsilon: float = 1e-5,
      padding_idx: int | None = None,
      rngs: nnx.Rngs,
  ):
    super().__init__(num_embeddings, embedding_dim, dtype=dtype,
                     param_dtype=param_dtype, embedding_init=embedding_init,
                     padding_idx=padding_idx, rngs=rngs)
    # The two-pass variance, as torch's LayerNorm: flax's default
    # E[x^2] - E[x]^2 cancels on rows with a large mean and a small spread.
    self.norm = nnx.LayerNorm(self.embedding_dim, epsilon=epsilon,
                              use_fast_variance=False,
                              dtype=jnp.float32, param_dtype=jnp.float32,
                              rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """LayerNorm(float32(weight[ids])) in `dtype`, `ids.shape + (dim,)`."""
    return self.norm(self.rows(ids).astype(jnp.float32)).astype(self.dtype)


def _plain_key(key) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def stable_embedding_override(
    model: nnx.Module) -> Callable[[Any, Any], bool]:
  """The `override=` of `jaxbnb.optim` that keeps `StableEmbedding`s (and
  `Embedding`s) 32-bit.

  bitsandbytes' `StableEmbedding` and `Embedding` register
  `{"optim_bits": 32}` for their weight with `GlobalOptimManager`;
  jaxbnb's optimizers take the same pin as their `override` argument, a
  `callable(path, leaf) -> bool`. The callable returned here is True
  exactly for the `weight` of every `StableEmbedding` and `Embedding` in
  `model` (matched by its path in `nnx.state(model)`, boxed or as a pure
  dict); combine it with another predicate with `or`.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxbnb.optim
    >>> from jaxbnb.nnx import StableEmbedding, stable_embedding_override
    >>> model = StableEmbedding(1000, 16, rngs=nnx.Rngs(0))
    >>> tx = jaxbnb.optim.adamw8bit(
    ...     1e-3, override=stable_embedding_override(model))
    >>> opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> opt.opt_state.state1["weight"].dtype  # 32-bit, not Quantized8bit
    dtype('float32')

  Args:
    model: the NNX model (the embeddings are found by traversal).

  Returns:
    `fn(path, leaf) -> bool` for the optimizer's `override`.
  """
  pinned = {tuple(path) + ("weight",) for path, node in nnx.iter_graph(model)
            if isinstance(node, Embedding)}  # StableEmbedding too

  def override(path, leaf) -> bool:
    del leaf
    keys = [_plain_key(k) for k in path]
    while keys and keys[-1] == "value":  # the nnx.Variable box
      keys.pop()
    return tuple(keys) in pinned

  return override


def quantize_embeddings(model: nnx.Module, bits: int = 8,
                        **kwargs) -> nnx.Module:
  """Swaps every embedding of `model` for an 8-bit or 4-bit one, in place.

  The embeddings are the `nnx.Embed` modules and modules shaped like
  jaxbnb's `models.Embedding` (a 2-D `weight` `nnx.Param` and an `attend`
  method), such as a `LlamaForCausalLM`'s `model.embed_tokens`. Each becomes
  `Embedding8bit.from_embed(old)` (or `Embedding4bit.from_embed(old,
  **kwargs)`), keeping its attribute name and output dtype, and its
  `attend` still serves a tied output head (float32 logits). Nothing is
  changed when an embedding cannot be quantized.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.models import LlamaConfig, LlamaForCausalLM
    >>> from jaxbnb.nnx import Embedding8bit, quantize_embeddings
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=1, num_attention_heads=4,
    ...                   num_key_value_heads=2, tie_word_embeddings=True)
    >>> model = quantize_embeddings(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    >>> isinstance(model.model.embed_tokens, Embedding8bit)
    True
    >>> model(jnp.array([[1, 2, 3]]))[0].shape
    (1, 3, 64)

  Args:
    model: an NNX module (itself an embedding, or holding some).
    bits: 8 (`Embedding8bit`) or 4 (`Embedding4bit`).
    **kwargs: for `bits=4`: `quant_type` (default "fp4"), `blocksize`,
      `compress_statistics`, `quant_storage`; for both: `dtype`.

  Returns:
    `model` with its embeddings replaced (or the new embedding when `model`
    is one).

  Raises:
    ValueError: for `bits` other than 8 or 4, a model without embeddings,
      or (4-bit) an embedding_dim that is not a multiple of the blocksize.
    TypeError: for keyword arguments the chosen class does not take.
  """
  if bits not in (8, 4) or isinstance(bits, bool):
    raise ValueError(
        f"quantize_embeddings: `bits` must be 8 or 4, got {bits!r}.")
  cls = Embedding8bit if bits == 8 else Embedding4bit
  if bits == 8 and set(kwargs) - {"dtype"}:
    raise TypeError(
        "quantize_embeddings: bits=8 takes only `dtype`, got "
        f"{sorted(kwargs)}.")
  if _is_embedding(model):
    return cls.from_embed(model, **kwargs)
  targets = [(path, node) for path, node in nnx.iter_graph(model)
             if path and _is_embedding(node)]
  if not targets:
    raise ValueError(
        "quantize_embeddings: `model` has no embedding (an nnx.Embed or a "
        "module with a 2-D `weight` nnx.Param and an `attend` method).")
  # Quantize all first, so an error leaves the model unchanged; a shared
  # embedding (tied) is quantized once and stays shared.
  replace_modules(model, {id(node): cls.from_embed(node, **kwargs)
                          for _, node in targets})
  return model
