"""Quantization state pytrees and their bitsandbytes state-dict format.

`QuantState` mirrors `bitsandbytes.functional.QuantState`: arrays are pytree
leaves, `shape`/`dtype`/`blocksize`/`quant_type` are static metadata, so the
state goes through `jax.jit`, `vmap`, orbax and `jax.tree` utilities.
The quantized weights built on it (`Params4bit`, `Int8Params`) live in
`weights.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxbnb._src.quant import validation

__all__ = ["QuantState", "to_numpy", "allclose"]

def to_numpy(x) -> np.ndarray:
  """`x` (a jax or numpy array) as a host numpy array.

  An array sharded over the devices of several processes is gathered from
  all of them: then every process must call this, in the same order.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def allclose(a, b) -> bool:
  """bitsandbytes' `torch.allclose(a, b, atol=1e-6)`; None only equals None."""
  if a is None or b is None:
    return a is None and b is None
  a, b = to_numpy(a), to_numpy(b)
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
        allclose(a, b) for a, b in (
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
        "absmax": to_numpy(self.absmax),
        "blocksize": self.blocksize,
        "quant_map": to_numpy(self.code).astype(np.float32),
        "dtype": self.dtype,
        "shape": tuple(self.shape),
    }
    if self.nested:
      d.update({
          "nested_absmax": to_numpy(self.nested_absmax).astype(np.float32),
          "nested_blocksize": self.nested_blocksize,
          "nested_quant_map": to_numpy(self.nested_code).astype(np.float32).copy(),
          "nested_dtype": "float32",
          "nested_offset": float(np.float32(to_numpy(self.offset))),
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
    if dtype not in validation.FLOAT_DTYPES:
      raise ValueError(
          f"QuantState.from_dict: dtype must be one of {validation.FLOAT_DTYPES}, got "
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
