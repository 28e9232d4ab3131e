"""Bridges the 8-bit optimizer rules to the fused Pallas kernel.

`optimizer_update_8bit` runs one leaf's 8-bit step through
`pallas_kernels.optim_8bit` when a kernel serves it and returns None
otherwise, so the caller runs the pure-jnp rules (`rules.update_8bit`).
Which one serves is decided at trace time from the resolved kernel mode
(`dispatch.resolve()`: "reference", "pallas" or "interpret");
`dispatch.no_kernel` decides what happens when the kernel cannot take a
leaf (raise under mode "pallas", else fall back).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxbnb._src.optim import rules
from jaxbnb._src.optim import state as optim_state
from jaxbnb._src.quant import dispatch
from pallas_kernels import code_tables
from pallas_kernels import optim_8bit

__all__ = ["optimizer_update_8bit"]


def _fits(kind, p, g, state1, state2) -> bool:
  """Whether the kernel takes this leaf (kind, size, dtype, state layout)."""
  lead = (2,) if kind == "ademamix" else ()
  two = state2 is not None
  return (optim_8bit.can_use(kind, math.prod(p.shape), p.dtype)
          and g.shape == p.shape
          and state1.codes.shape == lead + tuple(p.shape) and state1.signed
          and two == (optim_8bit.num_states(kind) == 2)
          and (not two or (state2.codes.shape == p.shape
                           and not state2.signed)))


def _scalars(kind: str, hyper: rules.Hyper, lr, step) -> jax.Array:
  """The kernel's float32 scalar array, with the reference's expressions."""
  f32 = jnp.float32
  step_f = jnp.asarray(step, f32)
  vals = dict(lr=jnp.asarray(lr, f32), step=step_f, beta1=hyper.beta1,
              beta2=hyper.beta2, eps=hyper.eps,
              weight_decay=hyper.weight_decay)
  if kind in rules.TWO_STATE_KINDS:
    corr1, corr2 = rules.bias_corrections(hyper, step_f)
    vals.update(corr1=corr1, corr2=corr2)
    if kind == "ademamix":
      alpha, beta3 = rules.ademamix_schedule(hyper, step_f)
      vals.update(alpha=alpha, beta3=beta3)
  return optim_8bit.pack_scalars(**vals)


def optimizer_update_8bit(kind: str, p: jax.Array, g: jax.Array,
                          state1: optim_state.Quantized8bit,
                          state2: optim_state.Quantized8bit | None, *, lr,
                          step, hyper: rules.Hyper, mode: str,
                          apply_updates: bool = False):
  """One fused 8-bit blockwise optimizer step, or None if no kernel serves it.

  Same contract as `rules.update_8bit` (which it equals bit for bit in
  interpret mode), or, with `apply_updates`, the in-place variant of the
  fused step (`jaxbnb.optim.apply_updates_fused`).

  Args:
    kind: the rule ("adam", "ademamix", "lion", "momentum", "rmsprop",
      "adagrad").
    p: parameters of any shape (float32, float16 or bfloat16).
    g: gradient, p's shape.
    state1: signed-map `Quantized8bit` (AdEMAMix: stacked [m1; m2]).
    state2: unsigned-map `Quantized8bit` for adam/ademamix, else None.
    lr: learning rate (traced scalar).
    step: step number, 1 for the first update (traced scalar).
    hyper: the rule's hyper-parameters (`rules.Hyper`).
    mode: the resolved kernel mode, `dispatch.resolve()`: "reference",
      "pallas" or "interpret".
    apply_updates: return `optax.apply_updates(p, new_p - p)` (computed
      in the kernel) in place of `new_p`, and write it and the states over
      their inputs (`input_output_aliases`: in place when the caller
      donates p and the state).

  Returns:
    `(new_p, new_state1, new_state2)` with `Quantized8bit` states, or None
    (then the caller runs `rules.update_8bit`) in mode "reference" or when
    the kernel does not take the kind, size, dtype or state layout (under
    kernel mode "pallas" that raises instead, see `dispatch.no_kernel`).

  Examples:
    >>> import jax.numpy as jnp
    >>> p = jnp.ones((512,))
    >>> s1 = optim_state.Quantized8bit.zeros((512,), signed=True)
    >>> out = optimizer_update_8bit("momentum", p, p, s1, None, lr=0.1,
    ...                             step=1, hyper=rules.Hyper("momentum"),
    ...                             mode="interpret")
    >>> out[0].shape, out[1].codes.dtype
    ((512,), dtype('uint8'))
  """
  if mode == "reference":
    return None
  if not _fits(kind, p, g, state1, state2):
    dispatch.no_kernel(
        f"optimizer_update_8bit({kind!r}) of {math.prod(p.shape)} "
        f"{p.dtype} elements")
    return None
  n = math.prod(p.shape)
  lead = (2,) if kind == "ademamix" else ()
  two = state2 is not None
  # Lookup tables for the requantization (two lookups instead of the
  # binary search's five); None for both if either map has none.
  tables = [code_tables.quantize_tables(optim_state.signed_map())]
  if two:
    tables.append(code_tables.quantize_tables(optim_state.unsigned_map()))
  if any(t is None for t in tables):
    tables = [None]
  new_p, c1, a1, c2, a2 = optim_8bit.optimizer_update_8bit(
      p.reshape(n), g.reshape(n), state1.codes.reshape(lead + (n,)),
      state1.absmax, state2.codes.reshape(n) if two else None,
      state2.absmax if two else None,
      jnp.asarray(optim_state.signed_map()),
      jnp.asarray(optim_state.unsigned_map()) if two else None,
      _scalars(kind, hyper, lr, step), *tables, kind=kind,
      nesterov=bool(hyper.nesterov), has_wd=rules.weight_decay_on(hyper),
      alias=apply_updates, apply_updates=apply_updates,
      interpret=mode == "interpret")
  new_s1 = optim_state.Quantized8bit(
      codes=c1.reshape(state1.codes.shape), absmax=a1, signed=True)
  new_s2 = None
  if two:
    new_s2 = optim_state.Quantized8bit(
        codes=c2.reshape(state2.codes.shape), absmax=a2, signed=False)
  return new_p.reshape(p.shape), new_s1, new_s2
