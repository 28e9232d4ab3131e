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

__all__ = ["QuantState", "to_numpy", "allclose", "bytes_equal"]

def to_numpy(x) -> np.ndarray:
  """`x` (a jax or numpy array) as a host numpy array.

  An array sharded over the devices of several processes is gathered from
  all of them: then every process must call this, in the same order.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def allclose(a, b) -> bool:
  """bitsandbytes' `torch.allclose(a, b, atol=1e-6)`; None only equals None.

  NaNs in the same places compare equal (`equal_nan=True`, unlike torch's
  default), so an array with a NaN still equals itself.
  """
  if a is None or b is None:
    return a is None and b is None
  a, b = to_numpy(a), to_numpy(b)
  if a.shape != b.shape:
    return False
  return bool(np.allclose(a.astype(np.float64), b.astype(np.float64),
                          atol=1e-6, equal_nan=True))


def bytes_equal(a, b) -> bool:
  """Whether two arrays hold the same dtype, shape and raw bytes.

  Floats are compared bit for bit (a bitcast to uint8), not as numbers: a
  NaN pattern equals itself and +0.0 differs from -0.0. This is how packed
  4-bit codes viewed as a float `quant_storage` must be compared.
  """
  a, b = to_numpy(a), to_numpy(b)
  if a.dtype != b.dtype or a.shape != b.shape:
    return False
  a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
  return a.tobytes() == b.tobytes()


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
    match, `absmax` and `code` are allclose (`atol=1e-6`; NaNs in the same
    places are equal, so a state always equals itself), both `offset`s
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

    Every entry is checked against the others, so a broken checkpoint is an
    error here, never a silently wrong model. A state is double-quantized
    when any of its parts says so (a uint8 `absmax`, `nested_absmax`,
    `nested_quant_map`, or `nested_offset`/`nested_blocksize` in the JSON);
    then all of them must be there.

    Args:
      qs_dict: a dict of the state's entries; prefixes before the last dot of
        a key are ignored, as bitsandbytes does (`model.w.weight.absmax` is
        `absmax`). Arrays may be numpy, jax or anything `np.asarray` takes.

    Returns:
      The `QuantState`.

    Raises:
      ValueError: if there is not exactly one packed `quant_state` entry and
        no unpacked `quant_type`, or an entry is missing or malformed: a
        double-quantized state without one of its nested entries (or nested
        entries next to a float absmax), an array of the wrong dtype or
        length (`absmax` `[ceil(n / blocksize)]`, `quant_map` `[16]`,
        `nested_absmax` at least `[ceil(len(absmax) / nested_blocksize)]`
        (a row shard of a larger tensor keeps the whole tensor's),
        `nested_quant_map` `[256]`), or a bad `shape`, `dtype`, `blocksize`,
        `quant_type`, `nested_blocksize` or `nested_offset`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbnb import functional as F
      >>> _, qs = F.quantize_4bit(jnp.ones((8, 8)), quant_type="nf4")
      >>> F.QuantState.from_dict(qs.as_dict(packed=True)).shape
      (8, 8)
    """
    return cls._from_dict(qs_dict, "QuantState.from_dict", "")

  @classmethod
  def _from_dict(cls, qs_dict: Mapping[str, Any], fn: str,
                 key_prefix: str) -> "QuantState":
    """`from_dict`; errors start with `fn` and name keys as `key_prefix + k`.
    """
    qs_dict = dict(qs_dict)
    qs_keys = [k for k in qs_dict if "quant_state" in k]
    if "quant_type" not in qs_dict:
      valid = ("bitsandbytes__nf4", "bitsandbytes__fp4")
      if not qs_keys:
        raise ValueError(
            f"{fn}: expected a packed "
            "'quant_state.bitsandbytes__nf4|fp4' entry or unpacked items, "
            f"found neither among keys "
            f"{sorted(key_prefix + k for k in qs_dict)}."
        )
      if len(qs_keys) != 1 or qs_keys[0].split(".")[-1] not in valid:
        raise ValueError(
            f"{fn}: expected exactly one `quant_state` item "
            f"ending with one of {valid}, got "
            f"{[key_prefix + k for k in qs_keys]}."
        )
    # How each entry is named in errors: its full key, or the JSON blob
    # it came from.
    names: dict[str, str] = {}
    if len(qs_keys) == 1:
      blob_key = key_prefix + qs_keys[0]
      blob = bytes(np.asarray(qs_dict.pop(qs_keys[0])).astype(np.uint8))
      try:
        meta = json.loads(blob.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{fn}: {blob_key!r} is not UTF-8 JSON: {e}"
        ) from e
      if not isinstance(meta, dict):
        raise ValueError(
            f"{fn}: {blob_key!r} must hold a JSON object, got "
            f"{type(meta).__name__} {meta!r}."
        )
      qs_dict.update(meta)
      names.update({k: f"{k!r} (in {blob_key!r})" for k in meta})
    entries: dict[str, Any] = {}
    for k, v in qs_dict.items():
      short = k.split(".")[-1]
      entries[short] = v
      names.setdefault(short, repr(key_prefix + k))

    def name(k: str) -> str:
      return names.get(k, repr(key_prefix + k))

    for key in ("absmax", "quant_map", "quant_type", "blocksize", "dtype",
                "shape"):
      if key not in entries:
        raise ValueError(
            f"{fn}: missing entry {name(key)}; got keys "
            f"{sorted(key_prefix + k for k in entries)}."
        )
    dtype = entries["dtype"]
    if not isinstance(dtype, str) or dtype not in validation.FLOAT_DTYPES:
      raise ValueError(
          f"{fn}: {name('dtype')} must be one of "
          f"{validation.FLOAT_DTYPES}, got {dtype!r}."
      )
    quant_type = entries["quant_type"]
    validation.check_quant_type(quant_type, name("quant_type"), fn)
    validation.check_blocksize(entries["blocksize"],
                               validation.BLOCKSIZES_4BIT, name("blocksize"),
                               fn)
    blocksize = int(entries["blocksize"])
    shape = _shape(entries["shape"], name("shape"), fn)
    n = math.prod(shape)
    nb = -(-n // blocksize)
    absmax_why = (f"ceil(n / blocksize) = ceil({n} / {blocksize}) for shape "
                  f"{shape}")
    absmax = _array(entries["absmax"], name("absmax"), fn)
    code = _float_array(entries["quant_map"], name("quant_map"), fn, 16,
                        "the 4-bit table")
    # Double quantization: any part of it makes the state nested, and then
    # every part must be there (a missing one is never read as "plain").
    parts = [k for k in _NESTED_ENTRIES if k in entries]
    coded = absmax.dtype == np.uint8
    if parts or coded:
      missing = [k for k in _NESTED_REQUIRED if k not in entries]
      if missing or not coded:
        why = ", ".join((["a uint8 absmax"] if coded else []) + parts)
        if missing:
          shown = ", ".join(repr(key_prefix + k) for k in missing)
          raise ValueError(
              f"{fn}: missing {shown}: the state is double-quantized (it "
              f"has {why}), which needs all of {list(_NESTED_REQUIRED)} and "
              "a uint8 absmax."
          )
        raise ValueError(
            f"{fn}: {name('absmax')} of a double-quantized state (it has "
            f"{why}) must hold uint8 codes, got {absmax.dtype.name}."
        )
      validation.check_blocksize(entries["nested_blocksize"],
                                 validation.BLOCKSIZES_8BIT,
                                 name("nested_blocksize"), fn)
      nested_blocksize = int(entries["nested_blocksize"])
      nested_dtype = entries.get("nested_dtype", "float32")
      if nested_dtype not in validation.FLOAT_DTYPES:
        raise ValueError(
            f"{fn}: {name('nested_dtype')} must be one of "
            f"{validation.FLOAT_DTYPES}, got {nested_dtype!r}."
        )
      absmax = _sized(absmax, name("absmax"), fn, nb, absmax_why)
      nnb = -(-nb // nested_blocksize)
      # At least one nested absmax per `nested_blocksize` codes. More is
      # allowed: a row shard of a larger tensor (io.convert's sharded
      # loading) keeps the whole tensor's nested absmax, which its codes
      # index by their global block.
      nested_absmax = _float_array(
          entries["nested_absmax"], name("nested_absmax"), fn, None,
          f"one per {nested_blocksize} absmax codes: ceil({nb} / "
          f"{nested_blocksize})")
      if nested_absmax.size < nnb:
        raise ValueError(
            f"{fn}: {name('nested_absmax')} must have at least {nnb} entries "
            f"(one per {nested_blocksize} absmax codes: ceil({nb} / "
            f"{nested_blocksize})), got {nested_absmax.size}."
        )
      kw = dict(
          offset=jnp.asarray(_offset(entries["nested_offset"],
                                     name("nested_offset"), fn)),
          nested_absmax=jnp.asarray(nested_absmax),
          nested_code=jnp.asarray(_float_array(
              entries["nested_quant_map"], name("nested_quant_map"), fn, 256,
              "the 8-bit dynamic map")),
          nested_blocksize=nested_blocksize,
      )
      absmax = jnp.asarray(absmax)
    else:
      absmax = jnp.asarray(_float_array(absmax, name("absmax"), fn, nb,
                                        absmax_why))
      kw = {}
    return cls(
        absmax=absmax,
        code=jnp.asarray(code),
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        **kw,
    )


# Entries that mark a double-quantized state, and those it needs.
_NESTED_ENTRIES = ("nested_absmax", "nested_quant_map", "nested_offset",
                   "nested_blocksize", "nested_dtype")
_NESTED_REQUIRED = ("nested_absmax", "nested_quant_map", "nested_offset",
                    "nested_blocksize")


def _array(x, name: str, fn: str) -> np.ndarray:
  """`x` as a numpy array (an error naming `name` if it is not one)."""
  try:
    a = np.asarray(to_numpy(x) if isinstance(x, jax.Array) else x)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{fn}: {name} must be an array, got "
                     f"{type(x).__name__}.") from e
  if a.dtype == object:
    raise ValueError(f"{fn}: {name} must be a numeric array, got "
                     f"{type(x).__name__} {x!r:.80}.")
  return a


def _sized(a: np.ndarray, name: str, fn: str, size: int,
           why: str) -> np.ndarray:
  """`a` flattened; it must have `size` entries (`why` says why)."""
  if a.size != size:
    raise ValueError(
        f"{fn}: {name} must have {size} entries ({why}), got {a.size} "
        f"(shape {list(a.shape)})."
    )
  return a.reshape(-1)


def _float_array(x, name: str, fn: str, size: int | None,
                 why: str) -> np.ndarray:
  """`x` as a flat float32 array (any float dtype) of `size` entries (any
  size if None)."""
  a = _array(x, name, fn)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError(
        f"{fn}: {name} must be a float32 array, got {a.dtype.name}."
    )
  if size is not None:
    a = _sized(a, name, fn, size, why)
  return a.reshape(-1).astype(np.float32)


def _shape(x, name: str, fn: str) -> tuple[int, ...]:
  """The original array's shape: a sequence of ints >= 0."""
  try:
    dims = list(x)
  except TypeError:
    dims = None
  if (dims is None or isinstance(x, (str, bytes))
      or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                 and d >= 0 for d in dims)):
    raise ValueError(
        f"{fn}: {name} must be a list of ints >= 0, got {x!r}."
    )
  return tuple(int(d) for d in dims)


def _offset(x, name: str, fn: str) -> np.float32:
  """The nested offset: a real scalar (a Python float in bitsandbytes' JSON)."""
  a = None if isinstance(x, (bool, str, bytes)) else _array(x, name, fn)
  if (a is None or a.size != 1 or a.dtype == np.bool_
      or not (jnp.issubdtype(a.dtype, jnp.floating)
              or jnp.issubdtype(a.dtype, jnp.integer))):
    raise ValueError(
        f"{fn}: {name} must be a float (the mean absmax), got {x!r}."
    )
  return np.float32(float(a.reshape(-1)[0]))


jax.tree_util.register_dataclass(
    QuantState,
    data_fields=["absmax", "code", "offset", "nested_absmax", "nested_code"],
    meta_fields=["shape", "dtype", "blocksize", "quant_type",
                 "nested_blocksize"],
)
