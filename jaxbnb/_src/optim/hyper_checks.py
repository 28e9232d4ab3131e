"""Checks of the optimizers' hyper-parameters, with messages naming them.

Each check takes the factory's name (`fn`) for the message and accepts what
`optax.inject_hyperparams` passes: Python numbers, concrete scalar arrays
(checked) and tracers (not checked; they are known only per step).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TRACED", "check_ademamix", "check_beta", "check_bool",
           "check_momentum",
           "check_nonneg", "check_rmsprop", "number", "settings",
           "static_int", "steps"]

TRACED = object()  # a static setting that arrived as a tracer


def number(fn: str, name: str, value):
  """A scalar hyper-parameter as a Python number; None if it is traced."""
  if isinstance(value, (bool, int, float)):
    return value
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except (TypeError, ValueError):
    arr = None
  # bfloat16 (ml_dtypes) has numpy kind "V": ask JAX whether it floats.
  if (arr is None or arr.ndim != 0 or not (
      arr.dtype.kind in "biuf" or jnp.issubdtype(arr.dtype, jnp.floating))):
    raise ValueError(f"{fn}: {name} must be a scalar number, got "
                     f"{name}={value!r}.")
  return float(arr) if arr.dtype.kind not in "biu" else arr.item()


def rounded_hint(value) -> str:
  """Why a hyper-parameter given as a float16/bfloat16 array may be off."""
  dtype = getattr(value, "dtype", None)
  if (dtype is None or not jnp.issubdtype(dtype, jnp.floating)
      or jnp.dtype(dtype).itemsize >= 4):
    return ""
  return (f" It arrived as a {jnp.dtype(dtype).name} value: "
          "optax.inject_hyperparams casts float hyper-parameters to the "
          "parameters' dtype (0.999 rounds to 1.0 in bfloat16); pass "
          "hyperparam_dtype=jnp.float32 to optax.inject_hyperparams.")


def check_nonneg(fn: str, name: str, value) -> None:
  if callable(value):  # a schedule
    return
  v = number(fn, name, value)
  if v is not None and not 0.0 <= v < math.inf:
    raise ValueError(f"{fn}: {name} must be a finite number >= 0, got "
                     f"{name}={v!r}.")


def check_beta(fn: str, name: str, value) -> None:
  v = number(fn, name, value)
  if v is not None and not 0.0 <= v < 1.0:
    raise ValueError(f"{fn}: {name} must be in [0, 1), got {name}={v!r}."
                     + rounded_hint(value))


def check_bool(fn: str, name: str, value) -> None:
  """A static flag must be a bool (a truthy string would switch it on)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{fn}: {name} must be a bool, got {name}={value!r}.")


def check_momentum(fn: str, momentum) -> None:
  v = number(fn, "momentum", momentum)
  if v is not None and not 0.0 < v < 1.0:
    raise ValueError(
        f"{fn}: momentum must be in (0, 1) (bnb does not support SGD "
        f"without momentum), got momentum={v!r}." + rounded_hint(momentum))


def check_rmsprop(fn: str, alpha, eps) -> None:
  v = number(fn, "alpha", alpha)
  if v is not None and not 0.0 < v < 1.0:
    raise ValueError(f"{fn}: alpha must be in (0, 1) (bnb rejects alpha=0), "
                     f"got alpha={v!r}." + rounded_hint(alpha))
  check_nonneg(fn, "eps", eps)


def static_int(fn: str, name: str, value):
  """An integer setting as a Python int (concrete arrays too), or TRACED."""
  if isinstance(value, jax.core.Tracer):
    return TRACED
  v = number(fn, name, value)
  if not isinstance(v, int) or isinstance(v, bool) or v < 0:
    raise ValueError(f"{fn}: {name} must be an int >= 0, got {name}={v!r}.")
  return v


def settings(fn: str, optim_bits, min_8bit_size):
  """(optim_bits, min_8bit_size) as Python ints or TRACED."""
  bits = (TRACED if isinstance(optim_bits, jax.core.Tracer)
          else number(fn, "optim_bits", optim_bits))
  if bits is not TRACED and bits not in (8, 32):
    raise ValueError(f"{fn}: optim_bits must be 8 or 32, got "
                     f"optim_bits={bits!r}.")
  return bits, static_int(fn, "min_8bit_size", min_8bit_size)


def steps(fn: str, name: str, value):
  """A scheduler length: None, a Python int, or a traced array (dynamic)."""
  if value is None or isinstance(value, jax.core.Tracer):
    return value
  return static_int(fn, name, value)


def check_ademamix(fn, b1, b2, b3, alpha, t_alpha, t_beta3, eps):
  check_beta(fn, "b1", b1)
  check_beta(fn, "b2", b2)
  check_beta(fn, "b3", b3)
  check_nonneg(fn, "alpha", alpha)
  check_nonneg(fn, "eps", eps)
  t_alpha = steps(fn, "t_alpha", t_alpha)
  t_beta3 = steps(fn, "t_beta3", t_beta3)
  v1, v3 = number(fn, "b1", b1), number(fn, "b3", b3)
  if (isinstance(t_beta3, int) and t_beta3 > 0 and v1 is not None
      and v3 is not None and (v1 == 0.0 or v3 == 0.0)):
    raise ValueError(f"{fn}: the beta3 schedule (t_beta3={t_beta3}) needs "
                     f"b1 > 0 and b3 > 0, got b1={v1!r}, b3={v3!r}.")
  return t_alpha, t_beta3
