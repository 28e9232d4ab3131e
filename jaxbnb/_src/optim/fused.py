"""A fused, in-place optimizer step: bitsandbytes' `optimizer.step()` for Optax.

The Optax interface takes two passes over the parameters: `tx.update`
returns the updates (for jaxbnb's bnb-style aliases, `new_p - p` in
float32: the 8-bit kernel writes `new_p`, XLA then reads it back with p
and writes the update), and `optax.apply_updates` reads p and the updates
again to write `p + u`. Under one `jax.jit` XLA fuses the last two, but a
step still moves 12 bytes per float32 parameter more than the kernel
alone (read `new_p` and p, write the new p).

`apply_updates_fused(tx, grads, opt_state, params)` returns what
`tx.update` followed by `optax.apply_updates` returns, bit for bit, but
lets the 8-bit kernel write `p + (new_p - p)` (each operation rounded as
XLA rounds it, then cast to p's dtype) directly over p's buffer and the
new state over the old state's (`input_output_aliases`). With `params`
and `opt_state` donated (`fused_step` does that) the step reads p, g and
the state once and writes p and the state once, in place, like bnb's
`optimizer.step()`.

How it works without changing `tx`: while `tx.update` runs inside
`apply_updates_fused`, jaxbnb's aliases also compute the in-place
parameter of each leaf and record it (`StepRecorder`) next to the exact
update they return. A parameter is then taken from the record when the
update that reached the end of `tx.update` is that very array, and the
parameter is the one the alias saw (nothing after the alias changed it:
`optax.chain` passes it through, `optax.inject_hyperparams` too). Any
other leaf is applied as `optax.apply_updates` applies it. The plain
update computed for the record is dead code when its leaf is fused and
`jax.jit` removes it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["StepRecorder", "active_recorder", "apply_updates_fused",
           "fused_step"]

_NOTHING_FUSED = (
    "apply_updates_fused: no parameter's update reached the end of "
    "tx.update as a jaxbnb optimizer returned it, so there is nothing to "
    "write in place. The fused step serves jaxbnb's bnb-style aliases "
    "(adamw8bit, adam8bit, lion8bit, sgd8bit, rmsprop8bit, adagrad8bit, "
    "ademamix8bit, their 32-bit and paged versions) alone, under "
    "optax.inject_hyperparams, or last in an optax.chain (after "
    "optax.clip_by_global_norm, for example). It does not serve the "
    "scale_by_*8bit building blocks (the learning rate comes after them) "
    "nor a wrapper or transformation that changes the updates after the "
    "optimizer (optax.MultiSteps, optax.apply_if_finite, a "
    "transformation chained after it). Use `updates, opt_state = "
    "tx.update(grads, opt_state, params)` and `optax.apply_updates(params, "
    "updates)` for those.")


class StepRecorder:
  """Per-leaf results of jaxbnb's aliases during one fused `tx.update`.

  `add` is called by the aliases (`jaxbnb._src.optim.aliases`) for every
  parameter leaf they update while a recorder is active; `lookup` answers,
  for a final (update, parameter) pair, whether an alias produced it.

  Examples:
    >>> rec = StepRecorder()
    >>> p, u = jnp.ones(3), jnp.zeros(3)
    >>> rec.add(u, p, None)
    >>> rec.lookup(u, p), rec.lookup(jnp.zeros(3), p)
    ((True, None), (False, None))
  """

  def __init__(self):
    self._by_id: dict[int, tuple[Any, Any, Any]] = {}

  def add(self, update, param, written) -> None:
    """Records one leaf.

    Args:
      update: the array the alias returns as this leaf's update.
      param: the parameter leaf the alias read.
      written: `optax.apply_updates(param, update)` as the kernel wrote it
        in place of `param`, or None (no kernel: apply it the plain way).
    """
    # The arrays are kept alive with their ids, so no id is reused.
    self._by_id[id(update)] = (update, param, written)

  def lookup(self, update, param) -> tuple[bool, Any]:
    """(whether an alias returned `update` for `param`, what it wrote)."""
    entry = self._by_id.get(id(update))
    if entry is None or entry[0] is not update or entry[1] is not param:
      return False, None
    return True, entry[2]


_LOCAL = threading.local()


def active_recorder() -> StepRecorder | None:
  """The recorder of the innermost running `apply_updates_fused`, or None.

  Examples:
    >>> active_recorder() is None
    True
  """
  stack = getattr(_LOCAL, "stack", ())
  return stack[-1] if stack else None


@contextlib.contextmanager
def _recording():
  rec = StepRecorder()
  stack = getattr(_LOCAL, "stack", None)
  if stack is None:
    stack = _LOCAL.stack = []
  stack.append(rec)
  try:
    yield rec
  finally:
    stack.pop()


def _apply(p, u):
  """`optax.apply_updates` of one leaf."""
  return None if p is None else jnp.asarray(p + u).astype(
      jnp.asarray(p).dtype)


def apply_updates_fused(tx: optax.GradientTransformation, grads: Any,
                        opt_state: Any, params: Any) -> tuple[Any, Any]:
  """`tx.update` then `optax.apply_updates` in one in-place pass.

  Returns exactly (bit for bit) what

      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)

  returns, but where jaxbnb's 8-bit kernel serves a leaf it writes the new
  parameter and state over the old ones' buffers in the same pass, so
  under a `jax.jit` that donates `params` and `opt_state` the step moves
  each byte once (no update array, no second pass over p). Call it inside
  your jitted train step, or use :func:`fused_step`, which jits and donates
  for you.

  Served: jaxbnb's bnb-style aliases (`adamw8bit`, `adam8bit`, `lion8bit`,
  `sgd8bit`, `rmsprop8bit`, `adagrad8bit`, `ademamix8bit`, their 32-bit and
  paged versions) used alone, under `optax.inject_hyperparams`, or last in
  an `optax.chain` (e.g. after `optax.clip_by_global_norm`); float32,
  bfloat16 and float16 parameters. Leaves with 32-bit state (smaller than
  `min_8bit_size`) and every leaf off the GPU (kernel mode "reference")
  take the plain path inside the same program, with the same results.

  Args:
    tx: the optimizer, an `optax.GradientTransformation`.
    grads: the gradients, a tree like `params`.
    opt_state: `tx`'s state; donate it to update it in place.
    params: the parameters; donate them to update them in place.

  Returns:
    `(new_params, new_opt_state)`.

  Raises:
    NotImplementedError: no leaf's update comes from a jaxbnb alias
      unchanged (the `scale_by_*8bit` blocks, `optax.MultiSteps`, a
      transformation chained after the alias): use `tx.update` and
      `optax.apply_updates`.

  Examples:
    >>> import optax
    >>> from jaxbnb import optim
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  optim.adamw8bit(1e-3))
    >>> params = {"w": jnp.ones((64, 64))}
    >>> grads = {"w": jnp.full((64, 64), 1e-3)}
    >>> state = tx.init(params)
    >>> step = jax.jit(apply_updates_fused, static_argnums=0,
    ...                donate_argnums=(2, 3))
    >>> new_params, state = step(tx, grads, state, params)
    >>> round(float(new_params["w"][0, 0]), 5)
    0.99899
  """
  if not (hasattr(tx, "init") and callable(getattr(tx, "update", None))):
    raise ValueError(
        "apply_updates_fused: tx must be an optax.GradientTransformation, "
        f"got {type(tx).__name__}: {tx!r}.")
  if params is None:
    raise ValueError("apply_updates_fused: params must be the parameter "
                     "tree (the step writes them), got params=None.")
  with _recording() as rec:
    updates, new_state = tx.update(grads, opt_state, params)
  served = 0

  def leaf(p, u):
    nonlocal served
    if p is None:
      return None
    hit, written = rec.lookup(u, p)
    served += hit
    return _apply(p, u) if written is None else written

  new_params = jax.tree.map(leaf, params, updates, is_leaf=lambda x: x is None)
  if not served and jax.tree.leaves(params):
    raise NotImplementedError(_NOTHING_FUSED)
  return new_params, new_state


def fused_step(tx: optax.GradientTransformation, *, donate: bool = True
               ) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  """A jitted in-place optimizer step, like bitsandbytes' `optimizer.step()`.

  `step = fused_step(tx)` then `params, opt_state = step(grads, opt_state,
  params)` is `jax.jit` of :func:`apply_updates_fused` with `opt_state` and
  `params` donated: the 8-bit kernel writes the new parameters and state
  into the old ones' buffers, and the old arrays are deleted (use the
  returned ones). The results are bit-identical to `tx.update` followed by
  `optax.apply_updates`.

  Args:
    tx: the optimizer (see :func:`apply_updates_fused` for what is served).
    donate: donate `opt_state` and `params` (False: keep the inputs alive;
      the step then writes new buffers).

  Returns:
    `step(grads, opt_state, params) -> (new_params, new_opt_state)`.

  Examples:
    >>> from jaxbnb import optim
    >>> tx = optim.adamw8bit(1e-3)
    >>> params = {"w": jnp.ones((64, 64))}
    >>> state = tx.init(params)
    >>> step = fused_step(tx)
    >>> params, state = step({"w": jnp.full((64, 64), 1e-3)}, state, params)
    >>> round(float(params["w"][0, 0]), 5), int(state.count)
    (0.99899, 1)
  """
  fn = functools.partial(apply_updates_fused, tx)
  return jax.jit(fn, donate_argnums=(1, 2) if donate else ())
