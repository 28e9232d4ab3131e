"""Flax serialization of the quantized weights: `Params4bit`, `Int8Params`
and `QuantState` registered with `flax.serialization`.

Registered once, when the layers are imported (`layers/common.py` calls
`register()`), so that Flax's own
serializer handles variables that hold quantized weights:
`flax.serialization.to_bytes(Dense4bit(8).init(...))`, `from_bytes`,
`to_state_dict` / `from_state_dict`, and NNX's
`nnx.to_pure_dict(nnx.state(layer))` through them. (The numerics in
`jaxbnb._src.quant` import no Flax, so the registration lives here.)

A weight's state dict holds its arrays and its static layout:

* `Params4bit`: `{"data": packed, "quant_state": {...}}`;
* `QuantState`: `{"absmax", "code", "offset", "nested_absmax",
  "nested_code"}` (arrays, None where absent) and `{"shape", "dtype",
  "blocksize", "quant_type", "nested_blocksize"}`;
* `Int8Params`: `{"CB", "SCB", "dtype"}`.

Restoring needs a target (Flax's rule), e.g. the variables `init` makes:
the restored weight has the state dict's arrays, bit for bit, and must match
the target's layout (the same static fields, array shapes and dtypes, the
same arrays absent); anything else is a `ValueError` naming the path and the
field, never a weight quietly read with another layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxbnb._src.quant.state import QuantState
from jaxbnb._src.quant.weights import Int8Params
from jaxbnb._src.quant.weights import Params4bit

__all__ = ["register"]

_QS_ARRAYS = ("absmax", "code", "offset", "nested_absmax", "nested_code")
_QS_STATIC = ("shape", "dtype", "blocksize", "quant_type", "nested_blocksize")


def _where() -> str:
  path = serialization.current_path()
  path = path[2:] if path.startswith("./") else path.lstrip(".")
  return f" at {path!r}" if path else ""


def _a(kind: str) -> str:
  return ("an " if kind[0] in "AEIOU" else "a ") + kind


def _check_keys(kind: str, state: Any, keys: tuple[str, ...]) -> None:
  if not isinstance(state, dict):
    raise ValueError(
        f"flax.serialization: restoring {_a(kind)}{_where()}: expected its "
        f"state dict (a dict with keys {sorted(keys)}), got "
        f"{type(state).__name__}."
    )
  if set(state) != set(keys):
    raise ValueError(
        f"flax.serialization: restoring {_a(kind)}{_where()}: the state dict "
        f"must have the keys {sorted(keys)}, got {sorted(state)}."
    )


def _static(x: Any) -> Any:
  """A static field as msgpack stores it (lists, ints, strings, None)."""
  if isinstance(x, tuple):
    return [int(d) for d in x]
  if isinstance(x, np.integer):
    return int(x)
  return x


def _restore_static(kind: str, field: str, target: Any, got: Any) -> None:
  if _static(target) != _static(got):
    raise ValueError(
        f"flax.serialization: restoring {_a(kind)}{_where()}: `{field}` is "
        f"{got!r} in the state dict, expected {_static(target)!r} (the "
        "target's)."
    )


def _check_present(kind: str, field: str, target: Any, got: Any) -> None:
  """An array is in the state dict exactly where the target has one."""
  if (target is None) != (got is None):
    raise ValueError(
        f"flax.serialization: restoring {_a(kind)}{_where()}: `{field}` is "
        f"{'absent' if got is None else 'an array'} in the state dict, "
        f"expected {'none' if target is None else 'an array'} (as the "
        "target).")


def _restore_array(kind: str, field: str, target: Any, got: Any):
  """`got` as a jax array, with `target`'s shape and dtype (and sharding)."""
  _check_present(kind, field, target, got)
  if target is None:
    return None
  try:
    arr = np.asarray(got)
  except (TypeError, ValueError):
    arr = None
  want = (tuple(target.shape), jnp.dtype(target.dtype))
  if (arr is None or arr.dtype == object
      or (tuple(arr.shape), jnp.dtype(arr.dtype)) != want):
    shown = (type(got).__name__ if arr is None or arr.dtype == object
             else f"{jnp.dtype(arr.dtype).name}{list(arr.shape)}")
    raise ValueError(
        f"flax.serialization: restoring {_a(kind)}{_where()}: `{field}` is "
        f"{shown} in the state dict, expected {want[1].name}"
        f"{list(want[0])} (the target's).")
  if isinstance(target, jax.Array) and target.is_fully_addressable:
    return jax.device_put(arr, target.sharding)
  return jnp.asarray(arr)


def _quant_state_to_state_dict(qs: QuantState) -> dict[str, Any]:
  out = {f: getattr(qs, f) for f in _QS_ARRAYS}
  out.update({f: _static(getattr(qs, f)) for f in _QS_STATIC})
  return out


def _quant_state_from_state_dict(target: QuantState,
                                 state: dict[str, Any]) -> QuantState:
  kind = "QuantState"
  _check_keys(kind, state, _QS_ARRAYS + _QS_STATIC)
  for f in _QS_STATIC:
    _restore_static(kind, f, getattr(target, f), state[f])
  for f in _QS_ARRAYS:  # double quantization or not, before any shape
    _check_present(kind, f, getattr(target, f), state[f])
  arrays = {f: _restore_array(kind, f, getattr(target, f), state[f])
            for f in _QS_ARRAYS}
  return QuantState(**arrays, shape=tuple(target.shape), dtype=target.dtype,
                    blocksize=target.blocksize, quant_type=target.quant_type,
                    nested_blocksize=target.nested_blocksize)


def _params4bit_to_state_dict(w: Params4bit) -> dict[str, Any]:
  return {"data": w.data,
          "quant_state": serialization.to_state_dict(w.quant_state)}


def _params4bit_from_state_dict(target: Params4bit,
                                state: dict[str, Any]) -> Params4bit:
  kind = "Params4bit"
  _check_keys(kind, state, ("data", "quant_state"))
  data = _restore_array(kind, "data", target.data, state["data"])
  qs = serialization.from_state_dict(target.quant_state, state["quant_state"],
                                     name="quant_state")
  return Params4bit(data, qs)


def _int8_to_state_dict(w: Int8Params) -> dict[str, Any]:
  return {"CB": w.CB, "SCB": w.SCB, "dtype": w.dtype}


def _int8_from_state_dict(target: Int8Params,
                          state: dict[str, Any]) -> Int8Params:
  kind = "Int8Params"
  _check_keys(kind, state, ("CB", "SCB", "dtype"))
  _restore_static(kind, "dtype", target.dtype, state["dtype"])
  return Int8Params(_restore_array(kind, "CB", target.CB, state["CB"]),
                    _restore_array(kind, "SCB", target.SCB, state["SCB"]),
                    target.dtype)


def register() -> None:
  """Registers the three types with `flax.serialization` (once; a type
  already registered, by this or by the user, is left as it is)."""
  for ty, to_state, from_state in (
      (QuantState, _quant_state_to_state_dict, _quant_state_from_state_dict),
      (Params4bit, _params4bit_to_state_dict, _params4bit_from_state_dict),
      (Int8Params, _int8_to_state_dict, _int8_from_state_dict)):
    if not serialization.is_serializable(ty):
      serialization.register_serialization_state(ty, to_state, from_state)
