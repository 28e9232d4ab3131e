"""Bridges jaxbnb's ops to the Pallas kernels in `pallas_kernels`.

Each function takes `mode`, the resolved kernel mode `dispatch.resolve()`
returns at trace time: "reference" (the pure-jnp reference), "pallas"
(compiled kernels) or "interpret" (Pallas interpret mode). A kernel whose
`can_use` rejects the shape returns None (or runs the reference) after
`dispatch.no_kernel`, the one place that decides whether that is an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dequantize_4bit as dk
from pallas_kernels import gemv_4bit as gk
from pallas_kernels import quantize_4bit as qk

from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant import reference

# The fused GEMV serves M up to here ("reduce" up to 4, then "dot"); larger
# M dequantizes with the kernel and multiplies with XLA's dot (cuBLAS).
GEMV_MAX_M = 64


def current_impl() -> str | None:
  """Deprecated spelling kept for the optimizer bridge until it moves."""
  mode = dispatch.resolve()
  return {"reference": None, "pallas": "gpu"}.get(mode, mode)


def _fallback(what: str) -> None:
  dispatch.no_kernel(what)


def _thresholds(quant_type: str) -> tuple[float, ...]:
  if quant_type == "nf4":
    return tuple(float(t) for t in np.asarray(codebooks.NF4_THRESHOLDS))
  t = codebooks.FP4_THRESHOLDS
  return tuple(float(t[f"t{i}"]) for i in range(1, 8))


def _lut(quant_type: str) -> jax.Array:
  return jnp.asarray(codebooks.code_for(quant_type), jnp.float32)


def quantize_4bit_flat(flat, blocksize, quant_type, mode):
  """(packed uint8, absmax f32) of a flat array."""
  if mode != "reference":
    if qk.can_use(flat.shape[0], blocksize, flat.dtype):
      return qk.quantize_4bit(
          flat, blocksize=blocksize, quant_type=quant_type,
          thresholds=_thresholds(quant_type),
          interpret=mode == "interpret")
    dispatch.no_kernel(
        f"quantize_4bit of {flat.shape[0]} {flat.dtype} elements")
  return reference.quantize_4bit(flat, blocksize, quant_type)


def dequantize_4bit_flat(packed, absmax, nested, n, blocksize, quant_type,
                         dtype, nested_blocksize, mode):
  """Flat dequantized array through the kernel.

  `nested` = (nested_absmax, nested code, offset) for a double-quantized
  absmax (then `absmax` holds its uint8 codes), else None.
  """
  return dk.dequantize_4bit(
      packed, absmax, _lut(quant_type), numel=n, blocksize=blocksize,
      dtype=jnp.dtype(dtype), nested=nested,
      nested_blocksize=nested_blocksize, interpret=mode == "interpret")


def can_dequantize(n, blocksize, dtype) -> bool:
  return dk.can_use(n, blocksize, dtype)


def gemv(x2d, packed, qs, bias, mode):
  """`x2d @ W.T + bias` through the fused kernel, or None if it cannot.

  M above `GEMV_MAX_M` is not the GEMV's work (the caller dequantizes with
  the kernel and multiplies), so it returns None without `no_kernel`.
  """
  m, k = x2d.shape
  n = qs.shape[0]
  if m > GEMV_MAX_M:
    return None
  if not gk.can_use(m, n, k, qs.blocksize, x2d.dtype):
    dispatch.no_kernel(f"the 4-bit GEMV of [{m}, {k}] x [{n}, {k}]")
    return None
  nested = None
  if qs.nested:
    nested = (qs.nested_absmax, qs.nested_code, qs.offset)
  return gk.gemv_4bit(
      x2d, packed, qs.absmax, _lut(qs.quant_type), n=n, k=k,
      blocksize=qs.blocksize, nested=nested,
      nested_blocksize=qs.nested_blocksize if qs.nested else 256,
      bias=bias, interpret=mode == "interpret")


def optimizer_update_8bit(kind, p, g, state1, state2, *, lr, step, hyper,
                          impl):
  """One fused 8-bit blockwise optimizer step, or None if no kernel applies.

  Same contract as `optim_rules.update_8bit` (which it equals bit for bit in
  interpret mode): returns `(new_p, new_state1, new_state2)` with
  `Quantized8bit` states, or None (then the caller uses the reference) when
  `impl` is None (reference mode / no NVIDIA GPU) or the kernel's
  `can_use` rejects the kind, size or dtype.

  Args:
    kind: the rule ("adam", "ademamix", "momentum", "rmsprop", "adagrad",
      "lion").
    p: parameters of any shape (float32, float16 or bfloat16).
    g: gradient, p's shape.
    state1: signed-map `Quantized8bit` (AdEMAMix: stacked [m1; m2]).
    state2: unsigned-map `Quantized8bit` for adam/ademamix, else None.
    lr: learning rate (traced scalar).
    step: step number, 1 for the first update (traced scalar).
    hyper: `optim_rules.Hyper` (static).
    impl: `current_impl()`: None, "gpu" or "interpret".
  """
  if impl is None:
    return None
  from pallas_kernels import optim_8bit as ok  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.optim import rules as optim_rules  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.optim import state as optim_state  # pylint: disable=g-import-not-at-top
  n = int(np.prod(p.shape))
  stacked = kind == "ademamix"
  lead = (2,) if stacked else ()
  two = state2 is not None
  if (not ok.can_use(kind, n, p.dtype) or g.shape != p.shape
      or state1.codes.shape != lead + tuple(p.shape) or not state1.signed
      or two != (ok.num_states(kind) == 2)
      or (two and (state2.codes.shape != p.shape or state2.signed))):
    _fallback(f"optimizer_update_8bit({kind!r}) of {n} {p.dtype} elements")
    return None
  f32 = jnp.float32
  step_f = jnp.asarray(step, f32)
  vals = dict(lr=jnp.asarray(lr, f32), step=step_f, beta1=hyper.beta1,
              beta2=hyper.beta2, eps=hyper.eps,
              weight_decay=hyper.weight_decay)
  if kind in optim_rules.TWO_STATE_KINDS:
    # The reference's own scalar expressions (computed outside the kernel).
    c1, c2 = optim_rules._corrections(hyper, step_f)  # pylint: disable=protected-access
    vals.update(corr1=c1, corr2=c2)
    if kind == "ademamix":
      alpha, beta3 = optim_rules.ademamix_schedule(hyper, step_f)
      vals.update(alpha=alpha, beta3=beta3)
  scalars = ok.pack_scalars(**vals)
  new_p, c1, a1, c2, a2 = ok.optimizer_update_8bit(
      p.reshape(n), g.reshape(n), state1.codes.reshape(lead + (n,)),
      state1.absmax, state2.codes.reshape(n) if two else None,
      state2.absmax if two else None,
      jnp.asarray(optim_state.signed_map()),
      jnp.asarray(optim_state.unsigned_map()) if two else None,
      scalars, kind=kind, nesterov=bool(hyper.nesterov),
      has_wd=hyper.weight_decay > 0, interpret=impl == "interpret")
  new_s1 = optim_state.Quantized8bit(
      codes=c1.reshape(state1.codes.shape), absmax=a1, signed=True)
  new_s2 = None
  if two:
    new_s2 = optim_state.Quantized8bit(
        codes=c2.reshape(state2.codes.shape), absmax=a2, signed=False)
  return new_p.reshape(p.shape), new_s1, new_s2
