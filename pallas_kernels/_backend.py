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
import numpy as np

try:  # jax's own flag for shard_map's varying-axes check (no public API)
  from jax._src import config as _jax_config
except ImportError:  # pragma: no cover
  _jax_config = None

try:  # pragma: no cover - depends on the installed JAX
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pl = None
  pltriton = None

try:  # pragma: no cover - depends on the installed JAX
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

__all__ = ["available", "compiler_params", "pl", "pltriton", "add_rn",
           "on_nvidia_gpu", "varying_axes", "match_vma", "same_vma"]


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


def _f32_asm(op: str, *args: jax.Array) -> jax.Array:
  """One fp32 PTX instruction `op` (e.g. "add.rn.f32") on `args`,
  elementwise, as inline asm."""
  args = jnp.broadcast_arrays(*args)
  operands = ", ".join(f"${i + 1}" for i in range(len(args)))
  return pltriton.elementwise_inline_asm(
      f"{op} $0, {operands};",
      args=list(args),
      constraints="=r" + ",r" * len(args),
      pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape,
                                                jnp.float32)],
  )[0]


def add_rn(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
  """fp32 `a + b` rounded on its own, never contracted into an FMA.

  `a` is usually a product; bitsandbytes adds the double-quantization
  offset in a separate op, so the sum must be rounded after the product.
  """
  if interpret:  # the barrier keeps XLA from fusing the product into an FMA
    return jax.lax.optimization_barrier(a) + b
  return _f32_asm("add.rn.f32", a, b)


def mul_rn(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
  """fp32 `a * b` rounded on its own, never contracted into an FMA with
  what uses it (`mul.rn.f32`; in interpret mode behind a barrier)."""
  if interpret:
    return jax.lax.optimization_barrier(a * b)
  return _f32_asm("mul.rn.f32", a, b)


def fma_rn(a: jax.Array, b: jax.Array, c: jax.Array,
           interpret: bool) -> jax.Array:
  """fp32 `a * b + c` as one fused multiply-add (one rounding).

  Triton leaves a product and a sum apart (two instructions, two
  roundings); a kernel bound by its instruction count asks for the FMA.
  In interpret mode XLA decides (the product may be rounded first).
  """
  if interpret:
    return a * b + c
  return _f32_asm("fma.rn.f32", a, b, c)


def round_to_float16(x):
  """float32 -> float16 (ties to even) that XLA cannot skip: on the GPU, XLA
  may turn `f32 -> f16 -> bf16` into `f32 -> bf16` (excess precision;
  measured on an H200: 441 of 4096 LLM.int8 outputs one bf16 ulp off).
  Normal values go through `reduce_precision` (which flushes float16
  subnormals), subnormals through rounding on their fixed 2**-24 grid.
  jaxbnb's reference epilogue (`quant.reference.int8_mm_dequant`) and the
  int8 kernel's use it."""
  normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
  subnormal = jnp.round(x * np.float32(2.0**24)) * np.float32(2.0**-24)
  return jnp.where(jnp.abs(x) < np.float32(2.0**-14), subnormal,
                   normal).astype(jnp.float16)


def round_to_dtype(x, dtype):
  """float32 `x` rounded to `dtype`'s precision, kept in float32, in a way
  XLA cannot skip (its excess-precision pass drops `f32 -> bf16 -> f32`
  round trips, and did in the 4-bit GEMV's interpret twin): bfloat16
  through `reduce_precision`, float16 through `round_to_float16`, float32
  unchanged. For jnp code and interpret mode: a compiled Triton kernel
  keeps its conversions."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16:
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
  if dtype == jnp.float16:
    return round_to_float16(x).astype(jnp.float32)
  return x


def zero_index():
  """A traced scalar index 0 (interpret mode's discharge needs an array)."""
  return jnp.int32(0)


def one_index():
  """A traced scalar index 1."""
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
    return bool(_jax_config._check_vma.value)  # pylint: disable=protected-access
  except AttributeError:  # pragma: no cover
    return False


def varying_axes(a) -> frozenset:
  """The mesh axes `a` varies over inside `shard_map` (empty outside)."""
  t = jax.typeof(a)
  mat = getattr(t, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(t, "vma", ()) or ())


def match_vma(args, like):
  """`args` cast to device-varying over every mesh axis `like` varies over.

  The one home of the shard_map varying cast. A Pallas call (and its
  interpret-mode loop) needs all its operands to agree on the axes they vary
  over, and inside jaxbnb's custom VJPs a replicated activation or bias that
  meets a sharded weight must be cast to varying so that its cotangent is
  summed over those axes (the transpose of the cast). The cast is free.
  `None` entries of `args` pass through.
  """
  leaves = [v for v in jax.tree.leaves(like) if hasattr(v, "dtype")]
  varying = frozenset().union(*(varying_axes(v) for v in leaves))
  if not varying:
    return list(args)
  out = []
  for a in args:
    missing = () if a is None else tuple(sorted(varying - varying_axes(a)))
    out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
  return out


def same_vma(*args):
  """`match_vma(args, args)`: every input varies over the same mesh axes."""
  return match_vma(args, args)


# Shared memory a block may use on Hopper (H100/H200): 227 KiB.
HOPPER_SMEM = 227 * 1024


SMS_DEFAULT = 132  # an H100/H200 SXM's SMs: the count the configs were tuned on


@functools.cache
def num_sms() -> int:
  """Streaming multiprocessors of the default device where it is a GPU
  (`Device.core_count`: 132 on an H200, 114 on an H100 PCIe), else
  `SMS_DEFAULT`. The kernels' default configs size their grids by it
  (one wave of programs)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return SMS_DEFAULT
  count = getattr(dev, "core_count", None) if dev.platform == "gpu" else None
  return int(count) if count else SMS_DEFAULT


@functools.cache
def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute 9.0: wgmma, TMA
  and warpgroup register reallocation, which the Mosaic GPU kernels use)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  return (dev.platform == "gpu"
          and str(getattr(dev, "compute_capability", "")) == "9.0")


def ref_type(transforms: tuple = (), *, write: bool = True):
  """`plgpu.RefType` for an `inline_mgpu` argument; `write=False` for a ref
  the inline code only reads. JAX 0.12.1 takes a written ref to be an
  effect, refused on a kernel's inputs (they are arrays, not `Ref`s), so a
  kernel input passed to inline code must be declared read-only; earlier
  JAX has no such field and every ref is passed as it is.

  Example:
    >>> from pallas_kernels import _backend
    >>> type(_backend.ref_type(write=False)).__name__
    'RefType'
  """
  if write or "write" not in getattr(plgpu.RefType,
                                     "__dataclass_fields__", {}):
    return plgpu.RefType(transforms)
  return plgpu.RefType(transforms, write=False)
