"""Argument checks shared by the public ops: clear errors at the boundary."""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
QUANT_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32")


def dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def as_int(value) -> int | None:
  """`value` as a Python int (numpy integers too), or None: bools, floats
  and anything else that is no integer."""
  if isinstance(value, bool):
    return None
  try:
    return operator.index(value)
  except TypeError:
    return None


def check_positive_int(value, name: str, fn: str) -> int:
  """`value` as a Python int >= 1 (numpy integers accepted); else an error."""
  number = as_int(value)
  if number is None or number < 1:
    raise ValueError(f"{fn}: `{name}` must be a positive int, got {value!r}.")
  return number


def check_dtype(value, name: str, fn: str) -> jnp.dtype:
  """`value` as a `jnp.dtype`; a value that names no dtype is an error."""
  try:
    return jnp.dtype(value)
  except TypeError:
    raise TypeError(f"{fn}: `{name}` must be a dtype (e.g. jnp.bfloat16 or "
                    f"'float32'), got {value!r}.") from None


def float_dtype_name(dtype, name: str, fn: str) -> str:
  """The name of `dtype`, which must be float32, float16 or bfloat16."""
  try:
    got = dtype_name(dtype)
  except TypeError:
    got = None
  if got not in FLOAT_DTYPES:
    raise TypeError(
        f"{fn}: `{name}` must be one of {FLOAT_DTYPES}, got "
        f"{got or repr(dtype)}."
    )
  return got


def check_float_array(a, name: str, fn: str) -> None:
  """`a` must be a non-empty fp32/fp16/bf16 array."""
  if not hasattr(a, "dtype") or not hasattr(a, "shape"):
    raise TypeError(f"{fn}: `{name}` must be an array, got {type(a).__name__}.")
  if dtype_name(a.dtype) not in FLOAT_DTYPES:
    raise TypeError(
        f"{fn}: `{name}` must have dtype float32, float16 or bfloat16, got "
        f"{dtype_name(a.dtype)}."
    )
  if a.size == 0:
    raise ValueError(
        f"{fn}: `{name}` must have at least one element, got shape "
        f"{tuple(a.shape)}."
    )


def check_blocksize(blocksize, allowed, name: str = "blocksize",
                    fn: str = "") -> None:
  if isinstance(blocksize, bool) or blocksize not in allowed:
    prefix = f"{fn}: " if fn else ""
    raise ValueError(
        f"{prefix}`{name}` must be one of {allowed}, got {blocksize!r}."
    )


def check_quant_type(quant_type, name: str = "quant_type",
                     fn: str = "") -> None:
  if quant_type not in QUANT_TYPES:
    prefix = f"{fn}: " if fn else ""
    raise ValueError(
        f"{prefix}`{name}` must be 'nf4' or 'fp4', got {quant_type!r}."
    )


def check_threshold(threshold, fn: str) -> float:
  """An LLM.int8 outlier `threshold`: a static float >= 0.

  Raises:
    TypeError: a traced value, a bool, or not a real number.
    ValueError: negative or NaN.
  """
  if isinstance(threshold, jax.core.Tracer):
    raise TypeError(f"{fn}: `threshold` must be a static Python float, got a "
                    "traced value; pass it as a static argument.")
  if isinstance(threshold, bool) or not isinstance(
      threshold, (int, float, np.integer, np.floating)):
    raise TypeError(f"{fn}: `threshold` must be a float >= 0, got "
                    f"{threshold!r}.")
  threshold = float(threshold)
  if threshold < 0.0 or math.isnan(threshold):
    raise ValueError(f"{fn}: `threshold` must be >= 0, got {threshold}.")
  return threshold
