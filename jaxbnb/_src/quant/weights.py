"""Quantized weights: one interface, `QuantizedArray`, and its formats.

A quantized weight is a frozen `[out, in]` matrix stored exactly as
bitsandbytes stores it. Every format implements the same small interface,
so layers, models, converters and checkpoints never ask which format they
hold:

* `from_float(weight, **kwargs)` / `dequantize()`: quantize and back;
* `matmul(x, bias)`: `x @ W.T + bias`, differentiable in `x` and `bias`;
* `state_dict(prefix)` / `from_state_dict(state, prefix)`: bitsandbytes'
  checkpoint entries, bit for bit;
* `shape`, `dtype`, `nbytes`: the logical shape and dtype, the stored bytes;
* `layout()` / `abstract(layout)`: a JSON description of the arrays, from
  which an abstract (`jax.ShapeDtypeStruct`) weight is rebuilt for orbax.

Formats: `Params4bit` (NF4/FP4, bitsandbytes' `Linear4bit`) and `Int8Params`
(LLM.int8 row-wise int8, bitsandbytes' `Linear8bitLt`). A new format
subclasses `QuantizedArray`, registers itself in `FORMATS` and needs no
change elsewhere.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src.quant import matmul as matmul_lib
from jaxbnb._src.quant import ops
from jaxbnb._src.quant.state import QuantState
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.state import allclose
from jaxbnb._src.quant.state import bytes_equal
from jaxbnb._src.quant.state import to_numpy

__all__ = ["QuantizedArray", "Params4bit", "Int8Params", "FORMATS",
           "from_layout"]

_QS_ARRAYS = ("absmax", "code", "offset", "nested_absmax", "nested_code")


def _spec(x) -> list[Any] | None:
  return None if x is None else [list(x.shape), jnp.dtype(x.dtype).name]


def _abstract_array(spec, sharding):
  if spec is None:
    return None
  return jax.ShapeDtypeStruct(tuple(spec[0]), jnp.dtype(spec[1]),
                              sharding=sharding)


class QuantizedArray(abc.ABC):
  """The interface every frozen quantized weight implements.

  Subclasses are frozen dataclasses registered as pytrees (arrays are
  leaves, static layout is metadata), so they pass through `jax.jit`,
  `nnx` variables, orbax and sharding unchanged.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> w = F.Params4bit.from_float(jnp.ones((4, 64)), quant_type="nf4")
    >>> isinstance(w, F.QuantizedArray), w.shape, w.dtype, w.nbytes
    (True, (4, 64), 'float32', 208)
    >>> w.matmul(jnp.ones((2, 64))).shape
    (2, 4)
  """

  format: ClassVar[str]

  @property
  @abc.abstractmethod
  def shape(self) -> tuple[int, ...]:
    """Logical shape of the weight, `[out, in]`."""

  @property
  @abc.abstractmethod
  def dtype(self) -> str:
    """Name of the original (and default compute) float dtype."""

  @property
  def nbytes(self) -> int:
    """Bytes of every stored array (the weight and its statistics)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))

  @classmethod
  @abc.abstractmethod
  def from_float(cls, weight: jax.Array, **kwargs) -> "QuantizedArray":
    """Quantizes a float `[out, in]` weight."""

  @abc.abstractmethod
  def dequantize(self) -> jax.Array:
    """The float weight, in its original dtype and shape."""

  @abc.abstractmethod
  def matmul(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """`x @ W.T + bias` in `x`'s dtype; gradients flow to `x` and `bias`."""

  @abc.abstractmethod
  def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
    """bitsandbytes' checkpoint entries for this weight, as numpy arrays."""

  @classmethod
  @abc.abstractmethod
  def from_state_dict(cls, state: Mapping[str, Any],
                      prefix: str = "") -> "QuantizedArray":
    """Loads a weight from bitsandbytes' checkpoint entries, bit-exactly."""

  @abc.abstractmethod
  def layout(self) -> dict[str, Any]:
    """A JSON-serialisable description (with `"format"`) of the arrays."""

  @classmethod
  @abc.abstractmethod
  def abstract(cls, layout: Mapping[str, Any],
               sharding=None) -> "QuantizedArray":
    """The weight `layout()` describes, with `jax.ShapeDtypeStruct` leaves."""


@dataclasses.dataclass(frozen=True, eq=False)
class Params4bit(QuantizedArray):
  """A 4-bit weight: packed bytes plus their `QuantState`.

  The weight is stored as bitsandbytes stores it: the `[out, in]` matrix
  flattened row-major, two codes per byte (even element in the high nibble),
  shape `[(n + 1) // 2, 1]` of uint8, or the same bytes viewed as
  `quant_storage`.

  Attributes:
    data: packed bytes, `[(n + 1) // 2 // itemsize, 1]` of `quant_storage`.
    quant_state: the `QuantState` (shape, dtype, blocksize, quant_type).
  """

  format: ClassVar[str] = "4bit"

  data: jax.Array
  quant_state: QuantState

  @property
  def dtype(self) -> str:
    """Name of the original float dtype (bitsandbytes' `quant_state.dtype`)."""
    return self.quant_state.dtype

  def __eq__(self, other: object) -> bool:
    """Equal packed bytes and equal `QuantState`s (bitsandbytes' semantics).

    The states compare as `QuantState.__eq__` does (absmax and code within
    `atol=1e-6`); the packed data must have the same `quant_storage` dtype,
    the same shape and identical bytes. A float `quant_storage` is compared
    bit for bit, never as numbers: packed codes that read as a NaN still
    equal themselves, and codes that read as +0.0 and -0.0 differ. Anything
    that is not a `Params4bit` is unequal. Compared on the host (not under
    `jax.jit`).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbnb import functional as F
      >>> a = F.Params4bit.from_float(jnp.ones((4, 8)), quant_type="nf4")
      >>> a == F.Params4bit.from_float(jnp.ones((4, 8)), quant_type="nf4")
      True
      >>> a == F.Params4bit.from_float(jnp.ones((4, 8)), quant_type="fp4")
      False
    """
    if not isinstance(other, Params4bit):
      return False
    return (bytes_equal(self.data, other.data)
            and self.quant_state == other.quant_state)

  __hash__ = None

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the original (unquantized) weight."""
    return self.quant_state.shape

  @property
  def quant_storage(self):
    """dtype of the packed storage."""
    return self.data.dtype

  def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
    """bitsandbytes' checkpoint entries for this weight.

    Args:
      prefix: the module prefix, e.g. `"model.layers.0.mlp.up_proj."`.

    Returns:
      `{prefix + "weight": packed, prefix + "weight.absmax": ..., ...}` as
      numpy arrays, exactly as `bnb.nn.Linear4bit.state_dict()` writes them.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbnb import functional as F
      >>> w = F.Params4bit.from_float(jnp.ones((4, 8)), quant_type="nf4")
      >>> sorted(w.state_dict("fc."))[:2]
      ['fc.weight', 'fc.weight.absmax']
    """
    out = {prefix + "weight": to_numpy(self.data)}
    for k, v in self.quant_state.as_dict(packed=True).items():
      out[prefix + "weight." + k] = v
    return out

  @classmethod
  def from_state_dict(
      cls, state: Mapping[str, Any], prefix: str = ""
  ) -> "Params4bit":
    """Loads a weight from bitsandbytes' checkpoint entries, bit-exactly.

    Args:
      state: a state dict (e.g. from `safetensors.numpy.load_file`).
      prefix: the module prefix the keys start with.

    Returns:
      The `Params4bit`, with the packed storage dtype kept as stored.

    Raises:
      ValueError: if the weight or its quant state is missing or
        inconsistent (see `QuantState.from_dict`: a double-quantized state
        missing a nested entry, an array of the wrong dtype or length), the
        packed weight is not of a `quant_storage` dtype, or its size does not
        match the recorded shape. The message names the key.
    """
    fn = "Params4bit.from_state_dict"
    wkey = prefix + "weight"
    if wkey not in state:
      raise ValueError(f"{fn}: missing {wkey!r}.")
    sub = {k[len(wkey) + 1:]: v for k, v in state.items()
           if k.startswith(wkey + ".")}
    # Keys in errors are named in full (`prefix + "weight.absmax"`).
    qs = QuantState._from_dict(  # pylint: disable=protected-access
        sub, fn, wkey + ".")
    data = np.asarray(state[wkey])
    if data.dtype.name not in validation.QUANT_STORAGE_DTYPES:
      raise ValueError(
          f"{fn}: {wkey!r} must be packed 4-bit codes of a quant_storage "
          f"dtype {validation.QUANT_STORAGE_DTYPES}, got {data.dtype.name}."
      )
    nbytes = data.size * data.dtype.itemsize
    expected = (qs.numel + 1) // 2
    if nbytes != expected:
      raise ValueError(
          f"{fn}: {wkey!r} holds {nbytes} bytes, "
          f"expected (n + 1) // 2 = {expected} for shape {qs.shape}."
      )
    return cls(jnp.asarray(data.reshape(-1, 1)), qs)

  @classmethod
  def from_float(cls, weight, **kwargs) -> "Params4bit":
    """Quantizes a float `[out, in]` weight (see `quantize_4bit` for kwargs).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbnb import functional as F
      >>> F.Params4bit.from_float(jnp.ones((4, 8))).data.shape
      (16, 1)
    """
    packed, qs = ops.quantize_4bit(weight, **kwargs)
    return cls(packed, qs)

  def dequantize(self) -> jax.Array:
    """The float weight in its original dtype and shape."""
    return ops.dequantize_4bit(self.data, self.quant_state)

  def matmul(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """`x @ W.T + bias` through `matmul_4bit` (kernels where they fit)."""
    return matmul_lib.matmul_4bit(x, self.data, self.quant_state, bias)

  def layout(self) -> dict[str, Any]:
    """The packed array, the state's arrays and its static fields."""
    qs = self.quant_state
    return {
        "format": self.format,
        "data": _spec(self.data),
        **{f: _spec(getattr(qs, f)) for f in _QS_ARRAYS},
        "shape": list(qs.shape), "dtype": qs.dtype,
        "blocksize": qs.blocksize, "quant_type": qs.quant_type,
        "nested_blocksize": qs.nested_blocksize,
    }

  @classmethod
  def abstract(cls, layout: Mapping[str, Any], sharding=None) -> "Params4bit":
    """An abstract `Params4bit` (ShapeDtypeStruct leaves) from `layout()`."""
    qs = QuantState(
        **{f: _abstract_array(layout[f], sharding) for f in _QS_ARRAYS},
        shape=tuple(layout["shape"]), dtype=layout["dtype"],
        blocksize=int(layout["blocksize"]), quant_type=layout["quant_type"],
        nested_blocksize=int(layout["nested_blocksize"]))
    return cls(_abstract_array(layout["data"], sharding), qs)


jax.tree_util.register_dataclass(
    Params4bit, data_fields=["data", "quant_state"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Params(QuantizedArray):
  """An LLM.int8 weight: int8 rows `CB` `[out, in]` and fp32 row absmax `SCB`.

  Attributes:
    CB: int8 `[out, in]`.
    SCB: float32 `[out]`; `W ~= CB * SCB[:, None] / 127`.
  """

  format: ClassVar[str] = "int8"

  CB: jax.Array  # pylint: disable=invalid-name
  SCB: jax.Array  # pylint: disable=invalid-name
  dtype: str = "float16"

  @property
  def shape(self) -> tuple[int, ...]:
    """Logical shape `[out, in]`."""
    return tuple(self.CB.shape)

  def __eq__(self, other: object) -> bool:
    """Identical int8 rows and row scales within `atol=1e-6`.

    `SCB` is compared as `QuantState` compares its absmax (NaNs in the same
    places are equal, so a weight always equals itself). `dtype` is not
    compared: bitsandbytes' checkpoint does not store it, and a weight
    equals its own `state_dict` round trip. Compared on the host.
    """
    if not isinstance(other, Int8Params):
      return False
    return (self.shape == other.shape
            and bytes_equal(self.CB, other.CB)
            and allclose(self.SCB, other.SCB))

  __hash__ = None

  @classmethod
  def from_float(cls, weight: jax.Array, **kwargs) -> "Int8Params":
    """Row-wise int8 quantization of a float `[out, in]` weight.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbnb import functional as F
      >>> w = F.Int8Params.from_float(jnp.asarray([[1.0, -2.0], [0.5, 0.25]]))
      >>> w.CB, w.SCB
      (Array([[  64, -127],
             [ 127,   64]], dtype=int8), Array([2. , 0.5], dtype=float32))
    """
    if kwargs:
      raise TypeError(f"Int8Params.from_float: unexpected arguments "
                      f"{sorted(kwargs)}.")
    weight = jnp.asarray(weight)
    if weight.ndim != 2:
      raise ValueError("Int8Params.from_float: `weight` must be 2-D "
                       f"[out, in], got shape {tuple(weight.shape)}.")
    cb, scb, _ = ops.int8_vectorwise_quant(weight)
    return cls(cb, scb, jnp.dtype(weight.dtype).name)

  def dequantize(self) -> jax.Array:
    """`CB * SCB / 127` in the original dtype."""
    return ops.int8_vectorwise_dequant(self.CB, self.SCB).astype(self.dtype)

  def matmul(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """bitsandbytes' `Linear8bitLt` forward with threshold 0.

    `x` is quantized row-wise to int8, multiplied with `CB` in int32 and
    dequantized with both scales; gradients flow to `x` through the
    dequantized weight.
    """
    return matmul_lib.matmul_int8(x, self.CB, self.SCB, bias)

  def layout(self) -> dict[str, Any]:
    """The int8 rows, their scales and the original dtype."""
    return {"format": self.format, "CB": _spec(self.CB),
            "SCB": _spec(self.SCB), "dtype": self.dtype}

  @classmethod
  def abstract(cls, layout: Mapping[str, Any], sharding=None) -> "Int8Params":
    """An abstract `Int8Params` (ShapeDtypeStruct leaves) from `layout()`."""
    return cls(_abstract_array(layout["CB"], sharding),
               _abstract_array(layout["SCB"], sharding), layout["dtype"])

  def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
    """bitsandbytes' `Linear8bitLt` entries: `weight`, `SCB`, `weight_format`.

    Raises:
      ValueError: `CB` is not int8 `[out, in]` or `SCB` not `[out]` (a file
        bitsandbytes could not load).
    """
    fn = "Int8Params.state_dict"
    cb_dtype = jnp.dtype(getattr(self.CB, "dtype", np.float64))
    cb_shape = tuple(np.shape(self.CB))
    if cb_dtype != jnp.int8 or len(cb_shape) != 2:
      raise ValueError(f"{fn}: `CB` must be int8 [out, in], got "
                       f"{cb_dtype.name} {list(cb_shape)}.")
    if tuple(np.shape(self.SCB)) != cb_shape[:1]:
      raise ValueError(f"{fn}: `SCB` must have shape [{cb_shape[0]}] (one "
                       f"scale per row of CB), got {list(np.shape(self.SCB))}.")
    return {
        prefix + "weight": to_numpy(self.CB),
        prefix + "SCB": to_numpy(self.SCB).astype(np.float32),
        prefix + "weight_format": np.asarray(0, np.uint8),
    }

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any], prefix: str = "",
                      dtype: str = "float16") -> "Int8Params":
    """Loads `weight` (int8) and `SCB`; only the row format (0) exists.

    bitsandbytes does not store the original dtype (the module has it);
    `dtype` names it (default float16, as `Linear8bitLt`).
    """
    for k in ("weight", "SCB"):
      if prefix + k not in state:
        raise ValueError(f"Int8Params.from_state_dict: missing {prefix + k!r}.")
    fn = "Int8Params.from_state_dict"
    fmt = np.asarray(state.get(prefix + "weight_format", np.asarray(0)))
    if fmt.dtype.kind in "US":  # bitsandbytes' format names
      if fmt.size != 1 or str(fmt.reshape(-1)[0]) != "row":
        raise ValueError(f"{fn}: only weight_format 'row' (0) is supported, "
                         f"got {fmt.tolist()!r}.")
    elif fmt.size != 1 or int(fmt.reshape(-1)[0]) != 0:
      shown = int(fmt.reshape(-1)[0]) if fmt.size == 1 else fmt.tolist()
      raise ValueError(
          f"{fn}: only weight_format 0 ('row') is supported, got {shown}."
      )
    cb = np.asarray(state[prefix + "weight"])
    if cb.dtype != np.int8:
      raise ValueError(
          f"{fn}: {prefix}weight must be int8, got {cb.dtype}."
      )
    if cb.ndim != 2:
      raise ValueError(f"{fn}: {prefix}weight must be 2-D [out, in], got "
                       f"shape {list(cb.shape)}.")
    scb = np.asarray(state[prefix + "SCB"])
    if scb.dtype != np.float32:
      raise ValueError(f"{fn}: {prefix}SCB must be float32 (bitsandbytes' "
                       f"row scales), got {scb.dtype}.")
    if scb.shape != cb.shape[:1]:
      raise ValueError(
          f"{fn}: {prefix}SCB must have shape [{cb.shape[0]}] (one row "
          f"scale per row of {prefix}weight {list(cb.shape)}), got "
          f"{list(scb.shape)}.")
    bad = ~(np.isfinite(scb) & (scb >= 0))
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(
          f"{fn}: {prefix}SCB must hold finite row absmax values >= 0; "
          f"{int(bad.sum())} do not (row {i}: {scb[i]}).")
    return cls(jnp.asarray(cb), jnp.asarray(scb), jnp.dtype(dtype).name)


jax.tree_util.register_dataclass(
    Int8Params, data_fields=["CB", "SCB"], meta_fields=["dtype"]
)

FORMATS: dict[str, type[QuantizedArray]] = {
    Params4bit.format: Params4bit,
    Int8Params.format: Int8Params,
}


def from_layout(layout: Mapping[str, Any], sharding=None) -> QuantizedArray:
  """The abstract weight of any registered format from its `layout()`.

  A layout without `"format"` (jaxbnb 0.1 checkpoints) is a `Params4bit`.
  """
  fmt = layout.get("format", Params4bit.format)
  if fmt not in FORMATS:
    raise ValueError(f"quantized weight layout: `format` must be one of "
                     f"{sorted(FORMATS)}, got {fmt!r}.")
  return FORMATS[fmt].abstract(layout, sharding)
