"""Quantization state pytrees and their bitsandbytes state-dict format.

`QuantState` mirrors `bitsandbytes.functional.QuantState`: arrays are pytree
leaves, `shape`/`dtype`/`blocksize`/`quant_type` are static metadata, so the
state goes through `jax.jit`, `vmap`, orbax and `jax.tree` utilities.
`Params4bit` bundles the packed weight with its state and converts to and
from bitsandbytes' checkpoint keys (`weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4|fp4`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src.quant import validation

__all__ = ["QuantState", "Params4bit", "Int8Params"]

_JSON_DTYPES = ("float32", "float16", "bfloat16")


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _allclose(a, b) -> bool:
  """bitsandbytes' `torch.allclose(a, b, atol=1e-6)`; None only equals None."""
  if a is None or b is None:
    return a is None and b is None
  a, b = _np(a), _np(b)
  if a.shape != b.shape:
    return False
  return bool(np.allclose(a.astype(np.float64), b.astype(np.float64),
                          atol=1e-6))


@dataclasses.dataclass(frozen=True)
class QuantState:
  """State needed to dequantize a blockwise-quantized array.

  Attributes:
    absmax: float32 per-block absmax, or uint8 codes of `absmax - offset`
      when double-quantized (`nested`).
    code: float32 table; 16 entries (4-bit `quant_map`) or 256 (8-bit).
    offset: float32 scalar mean of the absmax (nested only).
    nested_absmax: float32 absmax of the absmax blocks (nested only).
    nested_code: float32[256] signed dynamic map (nested only).
    shape: shape of the original array (static).
    dtype: name of the original dtype, "float32", "float16" or "bfloat16"
      (static).
    blocksize: elements per block (static).
    quant_type: "nf4", "fp4", or None for 8-bit blockwise states (static).
    nested_blocksize: absmax elements per nested block (static).
  """

  absmax: jax.Array
  code: jax.Array
  offset: jax.Array | None = None
  nested_absmax: jax.Array | None = None
  nested_code: jax.Array | None = None
  shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
  blocksize: int = dataclasses.field(default=64, metadata=dict(static=True))
  quant_type: str | None = dataclasses.field(
      default=None, metadata=dict(static=True)
  )
  nested_blocksize: int = dataclasses.field(
      default=256, metadata=dict(static=True)
  )

  def __eq__(self, other: object) -> bool:
    """Value equality, as bitsandbytes' `QuantState.__eq__` defines it.

    Two states are equal when `quant_type`, `blocksize`, `shape` and `dtype`
    match, `absmax` and `code` are allclose (`atol=1e-6`), both `offset`s
    are None or allclose, and the nested states (`nested_absmax`,
    `nested_code`, `nested_blocksize`; bitsandbytes' `state2`) are both
    absent or equal. Anything that is not a `QuantState` is unequal. The
    arrays are compared on the host, so this does not work on traced
    values inside `jax.jit`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbnb import functional as F
      >>> _, a = F.quantize_4bit(jnp.ones((8, 8)), quant_type="nf4")
      >>> _, b = F.quantize_4bit(jnp.ones((8, 8)), quant_type="nf4")
      >>> _, c = F.quantize_4bit(jnp.ones((8, 8)), quant_type="fp4")
      >>> a == b, a == c, a == "nf4"
      (True, False, False)
    """
    if not isinstance(other, QuantState):
      return False  # as bitsandbytes (NotImplemented lets numpy broadcast)
    if (self.quant_type, self.blocksize, tuple(self.shape),
        str(self.dtype)) != (other.quant_type, other.blocksize,
                             tuple(other.shape), str(other.dtype)):
      return False
    if self.nested != other.nested:
      return False
    if self.nested and self.nested_blocksize != other.nested_blocksize:
      return False
    return all(
        _allclose(a, b) for a, b in (
            (self.absmax, other.absmax),
            (self.code, other.code),
            (self.offset, other.offset),
            (self.nested_absmax, other.nested_absmax),
            (self.nested_code, other.nested_code),
        )
    )

  # `@dataclass(frozen=True)` still generates `__hash__` over all fields
  # (unchanged: it fails on the unhashable arrays; a QuantState is a pytree,
  # never a static argument).

  @property
  def nested(self) -> bool:
    """Whether the absmax is double-quantized."""
    return self.nested_absmax is not None

  @property
  def numel(self) -> int:
    """Number of elements of the original array."""
    return math.prod(self.shape)

  def as_dict(self, packed: bool = False) -> dict[str, Any]:
    """The state as bitsandbytes' `QuantState.as_dict` gives it.

    Args:
      packed: if True, return only numpy arrays (the non-array items are
        packed as UTF-8 JSON under `quant_state.bitsandbytes__<quant_type>`),
        ready for a safetensors state dict.

    Returns:
      A dict with bitsandbytes' keys: `absmax`, `quant_map`, and for nested
      states `nested_absmax`, `nested_quant_map`; unpacked dicts also hold
      `quant_type`, `blocksize`, `dtype`, `shape`, `nested_blocksize`,
      `nested_dtype`, `nested_offset`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbnb import functional as F
      >>> packed, qs = F.quantize_4bit(jnp.ones((8, 8)), quant_type="nf4")
      >>> sorted(qs.as_dict(packed=True))
      ['absmax', 'quant_map', 'quant_state.bitsandbytes__nf4']
    """
    d: dict[str, Any] = {
        "quant_type": self.quant_type,
        "absmax": _np(self.absmax),
        "blocksize": self.blocksize,
        "quant_map": _np(self.code).astype(np.float32),
        "dtype": self.dtype,
        "shape": tuple(self.shape),
    }
    if self.nested:
      d.update({
          "nested_absmax": _np(self.nested_absmax).astype(np.float32),
          "nested_blocksize": self.nested_blocksize,
          "nested_quant_map": _np(self.nested_code).astype(np.float32).copy(),
          "nested_dtype": "float32",
          "nested_offset": float(np.float32(_np(self.offset))),
      })
    if not packed or self.quant_type is None:
      return d
    arrays = {k: v for k, v in d.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in d.items() if not isinstance(v, np.ndarray)}
    blob = json.dumps(meta).encode("utf-8")
    arrays[f"quant_state.bitsandbytes__{self.quant_type}"] = np.frombuffer(
        blob, np.uint8
    ).copy()
    return arrays

  @classmethod
  def from_dict(cls, qs_dict: Mapping[str, Any]) -> "QuantState":
    """Rebuilds a state from a bitsandbytes `as_dict` (packed or not).

    Args:
      qs_dict: a dict of the state's entries; prefixes before the last dot of
        a key are ignored, as bitsandbytes does (`model.w.weight.absmax` is
        `absmax`). Arrays may be numpy, jax or anything `np.asarray` takes.

    Returns:
      The `QuantState`.

    Raises:
      ValueError: if there is not exactly one packed `quant_state` entry and
        no unpacked `quant_type`, or an entry is missing or malformed.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbnb import functional as F
      >>> _, qs = F.quantize_4bit(jnp.ones((8, 8)), quant_type="nf4")
      >>> F.QuantState.from_dict(qs.as_dict(packed=True)).shape
      (8, 8)
    """
    qs_dict = dict(qs_dict)
    qs_keys = [k for k in qs_dict if "quant_state" in k]
    if "quant_type" not in qs_dict:
      valid = ("bitsandbytes__nf4", "bitsandbytes__fp4")
      if not qs_keys:
        raise ValueError(
            "QuantState.from_dict: expected a packed "
            "'quant_state.bitsandbytes__nf4|fp4' entry or unpacked items, "
            f"found neither among keys {sorted(qs_dict)}."
        )
      if len(qs_keys) != 1 or qs_keys[0].split(".")[-1] not in valid:
        raise ValueError(
            "QuantState.from_dict: expected exactly one `quant_state` item "
            f"ending with one of {valid}, got {qs_keys}."
        )
    if len(qs_keys) == 1:
      blob = bytes(np.asarray(qs_dict.pop(qs_keys[0])).astype(np.uint8))
      try:
        qs_dict.update(json.loads(blob.decode("utf-8")))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"QuantState.from_dict: {qs_keys[0]!r} is not UTF-8 JSON: {e}"
        ) from e
    qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
    for key in ("absmax", "quant_map", "quant_type", "blocksize", "dtype",
                "shape"):
      if key not in qs_dict:
        raise ValueError(
            f"QuantState.from_dict: missing entry {key!r}; got keys "
            f"{sorted(qs_dict)}."
        )
    dtype = str(qs_dict["dtype"])
    if dtype not in _JSON_DTYPES:
      raise ValueError(
          f"QuantState.from_dict: dtype must be one of {_JSON_DTYPES}, got "
          f"{dtype!r}."
      )
    quant_type = qs_dict["quant_type"]
    validation.check_quant_type(quant_type, "quant_type")
    blocksize = int(qs_dict["blocksize"])
    validation.check_blocksize(blocksize, validation.BLOCKSIZES_4BIT,
                               "blocksize")
    shape = tuple(int(s) for s in qs_dict["shape"])
    nested = "nested_absmax" in qs_dict
    absmax = jnp.asarray(np.asarray(qs_dict["absmax"]).reshape(-1))
    nb = -(-math.prod(shape) // blocksize)
    if absmax.shape[0] != nb:
      raise ValueError(
          f"QuantState.from_dict: absmax has {absmax.shape[0]} entries, "
          f"expected ceil({math.prod(shape)} / {blocksize}) = {nb} for shape "
          f"{shape}."
      )
    kw = {}
    if nested:
      for key in ("nested_quant_map", "nested_offset", "nested_blocksize"):
        if key not in qs_dict:
          raise ValueError(
              f"QuantState.from_dict: nested state is missing {key!r}."
          )
      if absmax.dtype != jnp.uint8:
        raise ValueError(
            "QuantState.from_dict: a nested absmax must be uint8, got "
            f"{absmax.dtype}."
        )
      kw = dict(
          offset=jnp.asarray(np.float32(float(qs_dict["nested_offset"]))),
          nested_absmax=jnp.asarray(
              np.asarray(qs_dict["nested_absmax"], np.float32).reshape(-1)
          ),
          nested_code=jnp.asarray(
              np.asarray(qs_dict["nested_quant_map"], np.float32).reshape(-1)
          ),
          nested_blocksize=int(qs_dict["nested_blocksize"]),
      )
    elif absmax.dtype != jnp.float32:
      absmax = absmax.astype(jnp.float32)
    return cls(
        absmax=absmax,
        code=jnp.asarray(np.asarray(qs_dict["quant_map"], np.float32)),
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        **kw,
    )


jax.tree_util.register_dataclass(
    QuantState,
    data_fields=["absmax", "code", "offset", "nested_absmax", "nested_code"],
    meta_fields=["shape", "dtype", "blocksize", "quant_type",
                 "nested_blocksize"],
)


@dataclasses.dataclass(frozen=True)
class Params4bit:
  """A 4-bit weight: packed bytes plus their `QuantState`.

  The weight is stored as bitsandbytes stores it: the `[out, in]` matrix
  flattened row-major, two codes per byte (even element in the high nibble),
  shape `[(n + 1) // 2, 1]` of uint8, or the same bytes viewed as
  `quant_storage`.

  Attributes:
    data: packed bytes, `[(n + 1) // 2 // itemsize, 1]` of `quant_storage`.
    quant_state: the `QuantState` (shape, dtype, blocksize, quant_type).
  """

  data: jax.Array
  quant_state: QuantState

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
    out = {prefix + "weight": _np(self.data)}
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
      ValueError: if the weight or its quant state is missing or the packed
        size does not match the recorded shape.
    """
    wkey = prefix + "weight"
    if wkey not in state:
      raise ValueError(f"Params4bit.from_state_dict: missing {wkey!r}.")
    sub = {k[len(wkey) + 1:]: v for k, v in state.items()
           if k.startswith(wkey + ".")}
    qs = QuantState.from_dict(sub)
    data = np.asarray(state[wkey])
    nbytes = data.size * data.dtype.itemsize
    expected = (qs.numel + 1) // 2
    if nbytes != expected:
      raise ValueError(
          f"Params4bit.from_state_dict: {wkey!r} holds {nbytes} bytes, "
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
    from jaxbnb._src.quant import ops  # pylint: disable=g-import-not-at-top

    packed, qs = ops.quantize_4bit(weight, **kwargs)
    return cls(packed, qs)

  def dequantize(self) -> jax.Array:
    """The float weight in its original dtype and shape."""
    from jaxbnb._src.quant import ops  # pylint: disable=g-import-not-at-top

    return ops.dequantize_4bit(self.data, self.quant_state)


jax.tree_util.register_dataclass(
    Params4bit, data_fields=["data", "quant_state"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class Int8Params:
  """An LLM.int8 weight: int8 rows `CB` `[out, in]` and fp32 row absmax `SCB`.

  Attributes:
    CB: int8 `[out, in]`.
    SCB: float32 `[out]`; `W ~= CB * SCB[:, None] / 127`.
  """

  CB: jax.Array  # pylint: disable=invalid-name
  SCB: jax.Array  # pylint: disable=invalid-name

  def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
    """bitsandbytes' `Linear8bitLt` entries: `weight`, `SCB`, `weight_format`."""
    return {
        prefix + "weight": _np(self.CB),
        prefix + "SCB": _np(self.SCB).astype(np.float32),
        prefix + "weight_format": np.asarray(0, np.uint8),
    }

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any], prefix: str = ""):
    """Loads `weight` (int8) and `SCB`; only the row format (0) exists."""
    for k in ("weight", "SCB"):
      if prefix + k not in state:
        raise ValueError(f"Int8Params.from_state_dict: missing {prefix + k!r}.")
    fmt = state.get(prefix + "weight_format", np.asarray(0))
    if int(np.asarray(fmt)) != 0:
      raise ValueError(
          "Int8Params.from_state_dict: only weight_format 0 ('row') is "
          f"supported, got {int(np.asarray(fmt))}."
      )
    cb = np.asarray(state[prefix + "weight"])
    if cb.dtype != np.int8:
      raise ValueError(
          f"Int8Params.from_state_dict: {prefix}weight must be int8, got "
          f"{cb.dtype}."
      )
    return cls(jnp.asarray(cb), jnp.asarray(np.asarray(state[prefix + "SCB"],
                                                       np.float32)))


jax.tree_util.register_dataclass(
    Int8Params, data_fields=["CB", "SCB"], meta_fields=[]
)
