"""The one place that knows which Pallas GPU backend the kernels use.

All kernels here use Pallas' Triton lowering (LUT gathers, masked pointer
loads, uint8 bit ops), selected by passing its `CompilerParams`. The Triton
backend is deprecated in JAX 0.11; if a JAX without it is installed,
`available()` is False and jaxbnb falls back to its pure-jnp reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

try:  # pragma: no cover - depends on the installed JAX
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pl = None
  pltriton = None

__all__ = ["available", "compiler_params", "pl", "pltriton", "add_rn",
           "on_nvidia_gpu"]


def available() -> bool:
  """Whether this JAX has Pallas with the Triton lowering."""
  return pl is not None and pltriton is not None


def compiler_params(num_warps: int = 4, num_stages: int = 3):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.cache
def on_nvidia_gpu() -> bool:
  """Whether the default JAX device is an NVIDIA GPU."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  return dev.platform == "gpu" and "nvidia" in dev.device_kind.lower()


def add_rn(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
  """fp32 `a + b` rounded on its own, never contracted into an FMA.

  `a` is usually a product; bitsandbytes adds the double-quantization
  offset in a separate op, so the sum must be rounded after the product.
  """
  if interpret:  # the barrier keeps XLA from fusing the product into an FMA
    return jax.lax.optimization_barrier(a) + b
  a, b = jnp.broadcast_arrays(a, b)
  return pltriton.elementwise_inline_asm(
      "add.rn.f32 $0, $1, $2;",
      args=[a, b],
      constraints="=r,r,r",
      pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
  )[0]


def _ZERO():  # pylint: disable=invalid-name
  """A traced scalar index 0 (interpret mode's discharge needs an array)."""
  return jnp.int32(0)


def _ONE():  # pylint: disable=invalid-name
  return jnp.int32(1)


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """A kernel output type; inside `shard_map` it varies where `like` does."""
  varying = frozenset()
  for a in like:
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    if mat is not None:
      varying |= frozenset(mat.varying)
  mat_cls = getattr(jax.sharding, "ManualAxisType", None)
  if not varying or mat_cls is None:
    # Outside shard_map (or replicated inputs) an empty type is right.
    if mat_cls is not None and _checking_vma():
      return jax.ShapeDtypeStruct(shape, dtype,
                                  manual_axis_type=mat_cls(varying=varying))
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=mat_cls(varying=varying))


def _checking_vma() -> bool:
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    return bool(jax_config._check_vma.value)  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # pragma: no cover
    return False


def _varying(a) -> frozenset:
  mat = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def same_vma(*args):
  """Inside `shard_map`, casts every input to vary over the same mesh axes.

  A Pallas call (and its interpret-mode loop) needs all its operands to
  agree on the axes they vary over; replicated inputs (a code table, a
  replicated activation) are cast to varying, which is free.
  """
  varying = frozenset().union(*(_varying(a) for a in args))
  if not varying:
    return list(args)
  out = []
  for a in args:
    missing = tuple(sorted(varying - _varying(a)))
    out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
  return out
