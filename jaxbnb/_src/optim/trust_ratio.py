"""bitsandbytes' LAMB and LARS: Adam and SGD with update-norm clipping.

bnb builds both on its Adam and momentum kernels with `max_unorm`: before a
32-bit step, a preconditioning kernel sums the squared update of the whole
parameter, and the step is scaled by `max_unorm ||p|| / ||u||` where
`||u|| > max_unorm ||p||` (a layer-wise trust ratio; `||p||` before the
step). See `rules.update_32bit` for the exact expressions.

The 8-bit blockwise kernels have no update-norm clipping, so, as in bnb, a
leaf with 8-bit states takes a plain 8-bit Adam (LAMB) or momentum (LARS)
step and only leaves under `min_8bit_size` (kept in float32) are clipped.
bnb's `LAMB8bit` therefore accepts only `max_unorm=1.0`, and so does
`lamb8bit`. (bitsandbytes 0.50.2's CUDA build has no "lamb"/"lars" 8-bit
kernel and raises for such leaves; its CPU backend runs them as Adam and
momentum, which is what jaxbnb does.)
"""

from __future__ import annotations

import optax
from jax.typing import ArrayLike

from jaxbnb._src.optim import aliases
from jaxbnb._src.optim import hyper_checks
from jaxbnb._src.optim.rules import Hyper

__all__ = ["lamb8bit", "lamb32bit", "lars8bit", "lars32bit"]


def _lamb(fn, learning_rate, b1, b2, eps, weight_decay, max_unorm,
          optim_bits, min_8bit_size, override, paged):
  hyper_checks.check_beta(fn, "b1", b1)
  hyper_checks.check_beta(fn, "b2", b2)
  hyper_checks.check_nonneg(fn, "eps", eps)
  hyper_checks.check_nonneg(fn, "max_unorm", max_unorm)
  bits = hyper_checks.number(fn, "optim_bits", optim_bits)
  unorm = hyper_checks.number(fn, "max_unorm", max_unorm)
  if bits == 8 and unorm is not None and unorm != 1.0:
    raise ValueError(
        f"{fn}: max_unorm must be 1.0 with optim_bits=8, got "
        f"max_unorm={unorm!r}: the 8-bit blockwise update has no "
        "update-norm clipping (bitsandbytes' LAMB8bit refuses other values "
        "too); use lamb32bit for another max_unorm.")
  hyper = Hyper("adam", beta1=b1, beta2=b2, eps=eps,
                weight_decay=weight_decay, max_unorm=max_unorm)
  return aliases.bnb_alias(fn, hyper, learning_rate, optim_bits,
                           min_8bit_size, override, paged)


def _lars(fn, learning_rate, momentum, dampening, weight_decay, nesterov,
          max_unorm, optim_bits, min_8bit_size, override, paged):
  hyper_checks.check_momentum(fn, momentum)
  hyper_checks.check_bool(fn, "nesterov", nesterov)
  hyper_checks.check_nonneg(fn, "max_unorm", max_unorm)
  damp = hyper_checks.number(fn, "dampening", dampening)
  if damp is not None and damp != 0.0:
    raise ValueError(
        f"{fn}: dampening must be 0, got dampening={damp!r} (bitsandbytes' "
        "LARS accepts it but its momentum kernel ignores it).")
  hyper = Hyper("momentum", beta1=momentum, beta2=0.0, eps=0.0,
                weight_decay=weight_decay, nesterov=nesterov,
                max_unorm=max_unorm)
  return aliases.bnb_alias(fn, hyper, learning_rate, optim_bits,
                           min_8bit_size, override, paged)


def lamb8bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
             b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
             eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 0.0,
             max_unorm: ArrayLike = 1.0, *, optim_bits: int = 8,
             min_8bit_size: int = 4096, override: aliases.Override = None,
             paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `LAMB8bit`: Adam with a trust ratio on float32 leaves.

  A leaf with 8-bit states takes :func:`adam8bit`'s step (bnb's 8-bit
  kernel has no update-norm clipping). A leaf under `min_8bit_size` keeps
  float32 states and takes :func:`lamb32bit`'s clipped step. Weight decay
  is decoupled, after the step, as in bnb (its `adam_w_mode` and
  `bias_correction` flags are ignored there and left out here).

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    max_unorm: the trust-ratio bound; must be 1.0 with `optim_bits=8`
      (bnb's rule).
    optim_bits: 8 or 32 (32: :func:`lamb32bit` for every leaf).
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps, as the `paged_*`
      optimizers do (bnb has no paged LAMB or LARS).

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((64, 64)), "b": jnp.full((4,), 0.5)}
    >>> grads = {"w": jnp.ones((64, 64)), "b": jnp.ones((4,))}
    >>> opt = lamb8bit(learning_rate=1.0)
    >>> u, state = opt.update(grads, opt.init(params), params)
    >>> round(float(u["w"][0, 0]), 3)  # an 8-bit leaf: Adam's whole step
    -1.0
    >>> round(float(u["b"][0]), 3)  # float32: scaled to ||u|| = ||p||
    -0.5
  """
  return _lamb("lamb8bit", learning_rate, b1, b2, eps, weight_decay,
               max_unorm, optim_bits, min_8bit_size, override, paged)


def lamb32bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
              b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
              eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 0.0,
              max_unorm: ArrayLike = 1.0, *, optim_bits: int = 32,
              min_8bit_size: int = 4096, override: aliases.Override = None,
              paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `LAMB32bit` (and `LAMB`): Adam with bnb's trust ratio.

  Per leaf, Adam's moments as in :func:`adam32bit`; bnb's preconditioning
  pass sums `||u||² = Σ (m̂ / (sqrt(v̂) + eps))²` with the bias-corrected
  moments, and the step `lr c2/c1 m / (sqrt(v) + c2 eps)` is scaled by
  `max_unorm ||p|| / ||u||` where `||u|| > max_unorm ||p||` (`||p||`: the
  parameter's norm before the step; a zero parameter therefore never
  moves, as in bnb). Then `p = p (1 - lr wd)`.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    max_unorm: the trust-ratio bound, >= 0 (0: plain Adam).
    optim_bits: 32 (8 gives :func:`lamb8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps, as the `paged_*`
      optimizers do (bnb has no paged LAMB or LARS).

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.full((4,), 2.0)}
    >>> opt = lamb32bit(learning_rate=1.0, max_unorm=0.1)
    >>> u, _ = opt.update({"w": jnp.ones((4,))}, opt.init(params), params)
    >>> [round(v, 4) for v in u["w"].tolist()]  # ||u|| = 0.1 ||p||
    [-0.2, -0.2, -0.2, -0.2]
  """
  return _lamb("lamb32bit", learning_rate, b1, b2, eps, weight_decay,
               max_unorm, optim_bits, min_8bit_size, override, paged)


def lars8bit(learning_rate: optax.ScalarOrSchedule, momentum: ArrayLike,
             dampening: ArrayLike = 0.0, weight_decay: ArrayLike = 0.0,
             nesterov: bool = False, max_unorm: ArrayLike = 0.02, *,
             optim_bits: int = 8, min_8bit_size: int = 4096,
             override: aliases.Override = None,
             paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `LARS8bit`: SGD with momentum and a trust ratio.

  A leaf with 8-bit states takes :func:`sgd8bit`'s step (no clipping, as
  bnb's 8-bit kernels); a leaf under `min_8bit_size` keeps float32 states
  and takes :func:`lars32bit`'s clipped step.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    momentum: in (0, 1); bnb rejects 0.
    dampening: must be 0 (bnb accepts it and ignores it).
    weight_decay: coupled L2 weight decay, >= 0.
    nesterov: the Nesterov form of :func:`sgd8bit` (bnb ignores the flag).
    max_unorm: the trust-ratio bound, >= 0 (0: plain momentum SGD).
    optim_bits: 8 or 32 (32: :func:`lars32bit` for every leaf).
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps, as the `paged_*`
      optimizers do (bnb has no paged LAMB or LARS).

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((64, 64))}
    >>> opt = lars8bit(0.1, momentum=0.9)
    >>> u, _ = opt.update({"w": jnp.ones((64, 64))}, opt.init(params), params)
    >>> round(float(u["w"][0, 0]), 4)  # an 8-bit leaf: not clipped
    -0.1
  """
  return _lars("lars8bit", learning_rate, momentum, dampening, weight_decay,
               nesterov, max_unorm, optim_bits, min_8bit_size, override,
               paged)


def lars32bit(learning_rate: optax.ScalarOrSchedule, momentum: ArrayLike,
              dampening: ArrayLike = 0.0, weight_decay: ArrayLike = 0.0,
              nesterov: bool = False, max_unorm: ArrayLike = 0.02, *,
              optim_bits: int = 32, min_8bit_size: int = 4096,
              override: aliases.Override = None,
              paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `LARS32bit` (and `LARS`): momentum SGD, trust ratio.

  `g' = g + wd p`; `m = g'` at step 1 else `m = momentum m + g'`;
  `p = T(p - s lr m)` with `s = max_unorm ||p|| / ||m₀||` where `||m₀|| >
  max_unorm ||p||`, else 1. As in bnb's preconditioning kernel, `m₀` is the
  momentum update of the gradient *without* the weight decay. Matches
  bnb's `PytorchLARS` when `weight_decay` is 0.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    momentum: in (0, 1); bnb rejects 0.
    dampening: must be 0 (bnb accepts it and ignores it).
    weight_decay: coupled L2 weight decay, >= 0.
    nesterov: the Nesterov form of :func:`sgd8bit` (bnb ignores the flag).
    max_unorm: the trust-ratio bound, >= 0 (0: plain momentum SGD).
    optim_bits: 32 (8 gives :func:`lars8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps, as the `paged_*`
      optimizers do (bnb has no paged LAMB or LARS).

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4,))}
    >>> opt = lars32bit(1.0, momentum=0.9)
    >>> u, _ = opt.update({"w": jnp.ones((4,))}, opt.init(params), params)
    >>> [round(v, 4) for v in u["w"].tolist()]  # ||u|| = 0.02 ||p||
    [-0.02, -0.02, -0.02, -0.02]
  """
  return _lars("lars32bit", learning_rate, momentum, dampening, weight_decay,
               nesterov, max_unorm, optim_bits, min_8bit_size, override,
               paged)
