"""Which implementation serves an op: a Pallas kernel or the jnp reference.

The mode is read when an op is traced, and it is part of `jax.jit`'s cache
key (a `jax.make_user_context`): a jitted function called under another
mode is traced again, as it is under another `jax.default_matmul_precision`.

Modes:

* ``"auto"`` (default): Pallas kernels on NVIDIA GPUs where their `can_use`
  accepts the shape, the pure-jnp reference everywhere else.
* ``"reference"``: always the pure-jnp reference (the switch that forces it).
* ``"pallas"``: always the kernels, compiled for the GPU; an op whose kernel
  cannot run raises instead of falling back.
* ``"interpret"``: the kernels in Pallas interpret mode (any backend, slow;
  this is how CPU tests exercise the kernels).

The environment variable ``JAXBNB_KERNELS`` sets the initial mode.
"""

from __future__ import annotations

import contextlib
import os

import jax

import pallas_kernels

__all__ = ["MODES", "kernel_mode", "get_kernel_mode", "set_kernel_mode",
           "use_kernels", "resolve", "no_kernel"]

MODES = ("auto", "reference", "pallas", "interpret")


def _check(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(
        f"kernel mode must be one of {MODES}, got {mode!r}.")
  return mode


def _initial_mode() -> str:
  mode = os.environ.get("JAXBNB_KERNELS", "auto")
  if mode not in MODES:
    raise ValueError(
        f"environment variable JAXBNB_KERNELS must be one of {MODES}, got "
        f"{mode!r}.")
  return mode


# The mode: a thread's own value where set (`kernel_mode`, `set_kernel_mode`),
# else the initial one; in jit's cache key, so a function traced under one
# mode is not reused under another.
_MODE = jax.make_user_context(default_value=_initial_mode())


def get_kernel_mode() -> str:
  """The current kernel mode (see the module docstring).

  Examples:
    >>> import jaxbnb
    >>> jaxbnb.get_kernel_mode() in jaxbnb.KERNEL_MODES
    True
  """
  return _MODE.value


def set_kernel_mode(mode: str) -> None:
  """Sets the kernel mode for this thread: auto, reference, pallas, interpret.

  Examples:
    >>> import jaxbnb
    >>> old = jaxbnb.get_kernel_mode()
    >>> jaxbnb.set_kernel_mode("reference")
    >>> jaxbnb.set_kernel_mode(old)
  """
  # The context entered and never left: the thread's value from now on.
  _MODE(_check(mode)).__enter__()


@contextlib.contextmanager
def kernel_mode(mode: str):
  """Context manager that sets the kernel mode inside its block.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbnb
    >>> from jaxbnb import functional as F
    >>> with jaxbnb.kernel_mode("reference"):  # never a Pallas kernel
    ...   packed, qs = F.quantize_4bit(jnp.ones((64, 64)))
  """
  with _MODE(_check(mode)):
    yield


def use_kernels(mode: str | None = None) -> tuple[bool, bool]:
  """(use a kernel, in interpret mode) for `mode` (default: the current)."""
  mode = _MODE.value if mode is None else mode
  if mode == "reference":
    return False, False
  if mode == "interpret":
    return True, True
  if mode == "pallas":
    return True, False
  return pallas_kernels.available() and pallas_kernels.on_nvidia_gpu(), False


def resolve(mode: str | None = None) -> str:
  """The mode that serves an op traced now: "reference", "pallas" or "interpret".

  "auto" resolves to "pallas" on an NVIDIA GPU with the Pallas backend and to
  "reference" everywhere else; the other modes resolve to themselves. Every
  kernel bridge (`quant.kernels`, `optim.kernels`) takes this resolved mode
  as its static `mode` argument.
  """
  use, interpret = use_kernels(mode)
  if not use:
    return "reference"
  return "interpret" if interpret else "pallas"


def no_kernel(what: str) -> None:
  """The one place that decides what happens when no kernel fits an op.

  Under mode "pallas" it raises `NotImplementedError` (the user asked for the
  kernels only); under "auto" and "interpret" it returns and the caller runs
  the pure-jnp reference.
  """
  if get_kernel_mode() == "pallas":
    raise NotImplementedError(
        f"kernel mode 'pallas': no Pallas kernel serves {what}; use mode "
        "'auto' to fall back to the reference.")
