"""bitsandbytes' optimizers as Optax gradient transformations.

Two families:

* `scale_by_<name>8bit(...)`: building blocks that output the update
  *direction* (like `optax.scale_by_adam`) and compose in `optax.chain` with
  `optax.scale_by_learning_rate`, `optax.add_decayed_weights`, clipping...
* bnb-exact aliases (`adam8bit`, `adamw8bit`, `lion8bit`, `sgd8bit`,
  `rmsprop8bit`, `adagrad8bit`, `ademamix8bit`, their `*32bit` versions and
  `paged_*`): bnb's hyper-parameters, defaults and update order (decoupled
  weight decay after the step, coupled decay for SGD/RMSprop/Adagrad). They
  need `params` in `update` and return `new_p - p` in float32, so
  `optax.apply_updates` lands on bnb's new parameters.

Every leaf with at least `min_8bit_size` elements keeps its states as uint8
codes + a float32 absmax per 256-block (`Quantized8bit`) when
`optim_bits == 8` and `override` does not pin it to 32 bits; other leaves
keep float32 states, as in bnb. The per-leaf rules live in
`optim_rules`; an 8-bit leaf goes through the fused kernel bridge
(`kernels.optimizer_update_8bit`) when a kernel serves it.

The learning rate may be a float or an optax schedule, evaluated at the
traced step count, so a new learning rate or step never recompiles.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbnb._src.quant import kernels
from jaxbnb._src.optim import rules as optim_rules
from jaxbnb._src.optim.rules import Hyper
from jaxbnb._src.optim.state import Quantized8bit

__all__ = [
    "Optimizer8bitState",
    "scale_by_adam8bit",
    "scale_by_ademamix8bit",
    "scale_by_lion8bit",
    "scale_by_momentum8bit",
    "scale_by_rmsprop8bit",
    "scale_by_adagrad8bit",
    "adam8bit", "adamw8bit", "lion8bit", "sgd8bit", "rmsprop8bit",
    "adagrad8bit", "ademamix8bit",
    "adam32bit", "adamw32bit", "lion32bit", "sgd32bit", "rmsprop32bit",
    "adagrad32bit", "ademamix32bit",
    "paged_adam8bit", "paged_adamw8bit", "paged_lion8bit",
    "paged_ademamix8bit", "paged_adam32bit", "paged_adamw32bit",
    "paged_lion32bit", "paged_ademamix32bit",
]

Override = Any  # None | pytree of bools | Callable[[path, leaf], bool]

_NO_PARAMS = ("{name}: `update` needs `params` (bnb's update reads the "
              "parameters); call `update(grads, state, params)`.")


class Optimizer8bitState(NamedTuple):
  """Optax state of the bitsandbytes optimizers.

  Attributes:
    count: int32 scalar, the number of updates done (bnb's `step` - 1).
    state1: per leaf a `Quantized8bit` (8-bit) or a float32 array (32-bit),
      the params' tree structure (AdEMAMix: leading axis 2, [m1; m2]).
    state2: like `state1` for Adam/AdEMAMix's second moment, None per leaf
      for the 1-state optimizers.
  """

  count: jax.Array
  state1: Any
  state2: Any


# ------------------------------------------------------------- validation


def _check_nonneg(fn: str, name: str, value) -> None:
  if value is None or callable(value):
    return
  if not isinstance(value, (int, float)) and hasattr(value, "ndim"):
    try:  # a concrete array; skip tracers
      value = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
      return
  if not value >= 0.0:
    raise ValueError(f"{fn}: {name} must be >= 0, got {name}={value!r}.")


def _check_beta(fn: str, name: str, value) -> None:
  if not 0.0 <= value < 1.0:
    raise ValueError(
        f"{fn}: {name} must be in [0, 1), got {name}={value!r}.")


def _check_common(fn: str, *, optim_bits, min_8bit_size) -> None:
  if optim_bits not in (8, 32):
    raise ValueError(f"{fn}: optim_bits must be 8 or 32, got "
                     f"optim_bits={optim_bits!r}.")
  if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
    raise ValueError(f"{fn}: min_8bit_size must be an int >= 0, got "
                     f"min_8bit_size={min_8bit_size!r}.")


def _check_steps(fn: str, name: str, value) -> None:
  if value is not None and (not isinstance(value, int) or value < 0):
    raise ValueError(f"{fn}: {name} must be None or an int >= 0, got "
                     f"{name}={value!r}.")


# ----------------------------------------------------------- per-leaf work


def _update_leaf_8bit(kind, p, g, s1, s2, *, lr, step, hyper):
  """One 8-bit leaf: the fused kernel when one serves it, else the rules."""
  bridge = getattr(kernels, "optimizer_update_8bit", None)
  if bridge is not None:
    out = bridge(kind, p, g, s1, s2, lr=lr, step=step, hyper=hyper,
                 impl=kernels.current_impl())
    if out is not None:
      return out
  return optim_rules.update_8bit(kind, p, g, s1, s2, lr=lr, step=step,
                                 hyper=hyper)


def _update_leaf(kind, p, g, s1, s2, *, lr, step, hyper):
  if isinstance(s1, Quantized8bit):
    return _update_leaf_8bit(kind, p, g, s1, s2, lr=lr, step=step,
                             hyper=hyper)
  return optim_rules.update_32bit(kind, p, g, s1, s2, lr=lr, step=step,
                                  hyper=hyper)


def _override_flags(fn: str, override: Override, params) -> list[bool]:
  """Per-leaf "keep 32-bit" flags in the order of `jax.tree.leaves`."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  if override is None:
    return [False] * len(with_path)
  if callable(override):
    return [bool(override(path, leaf)) for path, leaf in with_path]
  try:
    flags = treedef.flatten_up_to(override)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{fn}: override must be None, a callable(path, leaf) -> bool or a "
        f"pytree of bools with the params' structure; got {override!r} "
        f"({e}).") from None
  return [bool(f) for f in flags]


def _check_leaf(fn: str, path, leaf) -> None:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{fn}: every parameter leaf must be a floating-point array; "
        f"{jax.tree_util.keystr(path) or 'the leaf'} is "
        f"{type(leaf).__name__} with dtype {dtype}.")


def _init_leaf(kind: str, leaf, use8: bool):
  shape = tuple(leaf.shape)
  stacked = kind == "ademamix"
  two = optim_rules.num_states(kind) == 2
  if use8:
    s1 = Quantized8bit.zeros(shape, True, leading=2 if stacked else None)
    s2 = Quantized8bit.zeros(shape, False) if two else None
  else:
    s1 = jnp.zeros(((2,) if stacked else ()) + shape, jnp.float32)
    s2 = jnp.zeros(shape, jnp.float32) if two else None
  return s1, s2


def _paged():
  from jaxbnb._src.optim import paged as optim_paged  # pylint: disable=g-import-not-at-top
  return optim_paged


def _transform(fn: str, hyper: Hyper, learning_rate, *, optim_bits: int,
               min_8bit_size: int, override: Override, paged: bool,
               direction: bool) -> optax.GradientTransformation:
  """The shared init/update of every optimizer in this module.

  With `direction=True` (the `scale_by_*` blocks) the rule runs with lr=1 on
  zero parameters and returns minus the new "parameters": the update
  direction. Otherwise it runs bnb's full step on `params` and returns
  `new_p - p`.
  """
  kind = hyper.kind

  def init_fn(params):
    with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in with_path:
      _check_leaf(fn, path, leaf)
    keep32 = _override_flags(fn, override, params)
    leaves, treedef = jax.tree.flatten(params)
    s1s, s2s = [], []
    for leaf, k32 in zip(leaves, keep32):
      use8 = (optim_bits == 8 and math.prod(leaf.shape) >= min_8bit_size
              and not k32)
      s1, s2 = _init_leaf(kind, leaf, use8)
      s1s.append(s1)
      s2s.append(s2)
    state1 = jax.tree.unflatten(treedef, s1s)
    state2 = jax.tree.unflatten(treedef, s2s)
    if paged:
      state1, state2 = _paged().to_host((state1, state2))
    return Optimizer8bitState(count=jnp.zeros([], jnp.int32), state1=state1,
                              state2=state2)

  def update_fn(updates, state, params=None):
    if not direction and params is None:
      raise ValueError(_NO_PARAMS.format(name=fn))
    count = state.count
    step = optax.safe_int32_increment(count)
    if direction:
      lr = jnp.float32(1.0)
    elif callable(learning_rate):
      lr = jnp.asarray(learning_rate(count), jnp.float32)
    else:
      lr = jnp.asarray(learning_rate, jnp.float32)
    state1, state2 = state.state1, state.state2
    if paged:
      state1, state2 = _paged().to_device((state1, state2))
    grads, treedef = jax.tree.flatten(updates)
    s1s = treedef.flatten_up_to(state1)
    s2s = treedef.flatten_up_to(state2)
    ps = (treedef.flatten_up_to(params) if not direction
          else [jnp.zeros(g.shape, jnp.float32) for g in grads])
    out_u, out_s1, out_s2 = [], [], []
    for p, g, s1, s2 in zip(ps, grads, s1s, s2s):
      if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"{fn}: gradients must be floating-point arrays, got "
                        f"dtype {g.dtype}.")
      new_p, n1, n2 = _update_leaf(kind, p, g, s1, s2, lr=lr, step=step,
                                   hyper=hyper)
      if direction:
        out_u.append(jnp.float32(0.0) - new_p)  # +0 for no move, not -0
      else:
        out_u.append(new_p.astype(jnp.float32) - p.astype(jnp.float32))
      out_s1.append(n1)
      out_s2.append(n2)
    state1 = jax.tree.unflatten(treedef, out_s1)
    state2 = jax.tree.unflatten(treedef, out_s2)
    if paged:
      state1, state2 = _paged().to_host((state1, state2))
    new_updates = jax.tree.unflatten(treedef, out_u)
    return new_updates, Optimizer8bitState(count=step, state1=state1,
                                           state2=state2)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------- building blocks


def _block(fn, hyper, optim_bits, min_8bit_size, override, paged):
  _check_common(fn, optim_bits=optim_bits, min_8bit_size=min_8bit_size)
  return _transform(fn, hyper, None, optim_bits=optim_bits,
                    min_8bit_size=min_8bit_size, override=override,
                    paged=paged, direction=True)


def scale_by_adam8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                      *, optim_bits: int = 8, min_8bit_size: int = 4096,
                      override: Override = None, paged: bool = False
                      ) -> optax.GradientTransformation:
  """Adam's direction `m_hat / (sqrt(v_hat) + eps)` with 8-bit states.

  bnb's 8-bit blockwise Adam with lr=1 and no weight decay; chain it with
  `optax.scale_by_learning_rate` (and `optax.add_decayed_weights`).

  Args:
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to the denominator (bnb scales it by sqrt(1 - b2^t)).
    optim_bits: 8 (blockwise 8-bit states) or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`
      saying which leaves keep 32-bit states.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation`.

  >>> import optax
  >>> opt = optax.chain(optax.clip_by_global_norm(1.0), scale_by_adam8bit(),
  ...                   optax.scale_by_learning_rate(1e-3))
  >>> params = {"w": jnp.ones((64, 64))}
  >>> state = opt.init(params)
  >>> updates, state = opt.update({"w": jnp.full((64, 64), 0.1)}, state)
  >>> round(float(updates["w"][0, 0]), 6)
  -0.001
  """
  fn = "scale_by_adam8bit"
  _check_beta(fn, "b1", b1)
  _check_beta(fn, "b2", b2)
  _check_nonneg(fn, "eps", eps)
  return _block(fn, Hyper("adam", beta1=b1, beta2=b2, eps=eps), optim_bits,
                min_8bit_size, override, paged)


def scale_by_ademamix8bit(b1: float = 0.9, b2: float = 0.999,
                          b3: float = 0.9999, alpha: float = 5.0,
                          t_alpha: int | None = None,
                          t_beta3: int | None = None, eps: float = 1e-8, *,
                          optim_bits: int = 8, min_8bit_size: int = 4096,
                          override: Override = None, paged: bool = False
                          ) -> optax.GradientTransformation:
  """AdEMAMix's direction `(m1_hat + alpha m2) / (sqrt(nu_hat) + eps)`.

  Args: as `ademamix8bit`, without learning rate and weight decay.

  >>> opt = scale_by_ademamix8bit()
  >>> s = opt.init({"w": jnp.ones((8,))})
  >>> u, s = opt.update({"w": jnp.ones((8,))}, s)
  >>> round(float(u["w"][0]), 4)  # m1_hat = 1, m2 = 1e-4, nu_hat = 1
  1.0005
  """
  fn = "scale_by_ademamix8bit"
  _check_ademamix(fn, b1, b2, b3, alpha, t_alpha, t_beta3, eps)
  return _block(fn, Hyper("ademamix", beta1=b1, beta2=b2, beta3=b3,
                          alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                          eps=eps),
                optim_bits, min_8bit_size, override, paged)


def scale_by_lion8bit(b1: float = 0.9, b2: float = 0.99, *,
                      optim_bits: int = 8, min_8bit_size: int = 4096,
                      override: Override = None, paged: bool = False
                      ) -> optax.GradientTransformation:
  """Lion's direction `sign(b1 m + (1 - b1) g)`; m decays with b2.

  >>> opt = scale_by_lion8bit()
  >>> s = opt.init({"w": jnp.ones((3,))})
  >>> u, s = opt.update({"w": jnp.array([0.5, -2.0, 0.0])}, s)
  >>> u["w"].tolist()
  [1.0, -1.0, 0.0]
  """
  fn = "scale_by_lion8bit"
  _check_beta(fn, "b1", b1)
  _check_beta(fn, "b2", b2)
  return _block(fn, Hyper("lion", beta1=b1, beta2=b2), optim_bits,
                min_8bit_size, override, paged)


def scale_by_momentum8bit(momentum: float = 0.9, *, nesterov: bool = False,
                          optim_bits: int = 8, min_8bit_size: int = 4096,
                          override: Override = None, paged: bool = False
                          ) -> optax.GradientTransformation:
  """Heavy-ball momentum `m = momentum m + g` (m = g at the first step).

  With `nesterov`, the direction is `g + momentum m` (bnb ignores nesterov).

  >>> opt = scale_by_momentum8bit(0.5)
  >>> s = opt.init({"w": jnp.ones((2,))})
  >>> u, s = opt.update({"w": jnp.ones((2,))}, s)
  >>> u, s = opt.update({"w": jnp.ones((2,))}, s)
  >>> u["w"].tolist()
  [1.5, 1.5]
  """
  fn = "scale_by_momentum8bit"
  _check_momentum(fn, momentum)
  return _block(fn, Hyper("momentum", beta1=momentum, nesterov=nesterov),
                optim_bits, min_8bit_size, override, paged)


def scale_by_rmsprop8bit(alpha: float = 0.99, eps: float = 1e-8, *,
                         optim_bits: int = 8, min_8bit_size: int = 4096,
                         override: Override = None, paged: bool = False
                         ) -> optax.GradientTransformation:
  """RMSprop's direction `g / (sqrt(v) + eps)`, `v = alpha v + (1-alpha) g²`.

  >>> opt = scale_by_rmsprop8bit(alpha=0.75, eps=0.0)
  >>> s = opt.init({"w": jnp.ones((2,))})
  >>> u, s = opt.update({"w": jnp.ones((2,))}, s)
  >>> u["w"].tolist()
  [2.0, 2.0]
  """
  fn = "scale_by_rmsprop8bit"
  _check_rmsprop(fn, alpha, eps)
  return _block(fn, Hyper("rmsprop", beta1=alpha, beta2=0.0, eps=eps),
                optim_bits, min_8bit_size, override, paged)


def scale_by_adagrad8bit(eps: float = 1e-10, *, optim_bits: int = 8,
                         min_8bit_size: int = 4096, override: Override = None,
                         paged: bool = False) -> optax.GradientTransformation:
  """Adagrad's direction `g / (sqrt(sum g²) + eps)`.

  >>> opt = scale_by_adagrad8bit()
  >>> s = opt.init({"w": jnp.ones((2,))})
  >>> u, s = opt.update({"w": jnp.full((2,), 3.0)}, s)
  >>> u["w"].tolist()
  [1.0, 1.0]
  """
  fn = "scale_by_adagrad8bit"
  _check_nonneg(fn, "eps", eps)
  return _block(fn, Hyper("adagrad", beta1=0.0, beta2=0.0, eps=eps),
                optim_bits, min_8bit_size, override, paged)


def _check_ademamix(fn, b1, b2, b3, alpha, t_alpha, t_beta3, eps):
  _check_beta(fn, "b1", b1)
  _check_beta(fn, "b2", b2)
  _check_beta(fn, "b3", b3)
  _check_nonneg(fn, "alpha", alpha)
  _check_nonneg(fn, "eps", eps)
  _check_steps(fn, "t_alpha", t_alpha)
  _check_steps(fn, "t_beta3", t_beta3)
  if t_beta3 and (b1 == 0.0 or b3 == 0.0):
    raise ValueError(f"{fn}: the beta3 schedule (t_beta3={t_beta3}) needs "
                     f"b1 > 0 and b3 > 0, got b1={b1!r}, b3={b3!r}.")


def _check_momentum(fn, momentum):
  if not isinstance(momentum, (int, float)) or not 0.0 < momentum < 1.0:
    raise ValueError(
        f"{fn}: momentum must be in (0, 1) (bnb does not support SGD "
        f"without momentum), got momentum={momentum!r}.")


def _check_rmsprop(fn, alpha, eps):
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"{fn}: alpha must be in (0, 1) (bnb rejects alpha=0), "
                     f"got alpha={alpha!r}.")
  _check_nonneg(fn, "eps", eps)


# ----------------------------------------------------------------- aliases


def _alias(fn, hyper, learning_rate, optim_bits, min_8bit_size, override,
           paged, weight_decay):
  _check_nonneg(fn, "learning_rate", learning_rate)
  _check_nonneg(fn, "weight_decay", weight_decay)
  _check_common(fn, optim_bits=optim_bits, min_8bit_size=min_8bit_size)
  return _transform(fn, hyper, learning_rate, optim_bits=optim_bits,
                    min_8bit_size=min_8bit_size, override=override,
                    paged=paged, direction=False)


def _adam(fn, learning_rate, b1, b2, eps, weight_decay, optim_bits,
          min_8bit_size, override, paged):
  _check_beta(fn, "b1", b1)
  _check_beta(fn, "b2", b2)
  _check_nonneg(fn, "eps", eps)
  hyper = Hyper("adam", beta1=b1, beta2=b2, eps=eps,
                weight_decay=weight_decay)
  return _alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged, weight_decay)


def adam8bit(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8, weight_decay: float = 0.0, *,
             optim_bits: int = 8, min_8bit_size: int = 4096,
             override: Override = None, paged: bool = False
             ) -> optax.GradientTransformation:
  """bitsandbytes' `Adam8bit` (weight decay decoupled, after the step).

  Per element, in float32, with `c1 = 1 - b1^t`, `c2 = sqrt(1 - b2^t)`:
  `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
  p = T(p - lr c2/c1 * m / (sqrt(v) + c2 eps)); p = T(p (1 - lr wd))`,
  with m and v stored as 8-bit blockwise codes (signed / unsigned maps). A
  non-finite gradient element resets its state to 0 and skips its
  parameter.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 8 or 32 (32: bnb's 32-bit kernels for every leaf).
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`;
      True keeps that leaf's states in 32 bits (bnb's GlobalOptimManager).
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params` and
    returns `new_params - params` (float32).

  >>> import optax
  >>> params = {"w": jnp.ones((64, 64))}
  >>> opt = adam8bit(learning_rate=1e-2)
  >>> state = opt.init(params)
  >>> updates, state = opt.update({"w": jnp.ones((64, 64))}, state, params)
  >>> round(float(optax.apply_updates(params, updates)["w"][0, 0]), 4)
  0.99
  """
  return _adam("adam8bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def adamw8bit(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 1e-2, *,
              optim_bits: int = 8, min_8bit_size: int = 4096,
              override: Override = None, paged: bool = False
              ) -> optax.GradientTransformation:
  """bitsandbytes' `AdamW8bit`: `adam8bit` with `weight_decay=1e-2`.

  Args: see `adam8bit`.

  >>> opt = adamw8bit()
  >>> params = {"w": jnp.ones((4,))}
  >>> u, _ = opt.update({"w": jnp.zeros((4,))}, opt.init(params), params)
  >>> round(float(u["w"][0]), 7)  # only the decay: 1 * (1 - 1e-3 * 1e-2) - 1
  -1e-05
  """
  return _adam("adamw8bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def _lion(fn, learning_rate, b1, b2, weight_decay, optim_bits, min_8bit_size,
          override, paged):
  _check_beta(fn, "b1", b1)
  _check_beta(fn, "b2", b2)
  hyper = Hyper("lion", beta1=b1, beta2=b2, weight_decay=weight_decay)
  return _alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged, weight_decay)


def lion8bit(learning_rate=1e-4, b1: float = 0.9, b2: float = 0.99,
             weight_decay: float = 0.0, *, optim_bits: int = 8,
             min_8bit_size: int = 4096, override: Override = None,
             paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `Lion8bit`.

  `p = T(p (1 - lr wd)); p = T(p - T(lr sign(b1 m + (1-b1) g)));
  m = b2 m + (1-b2) g` (decoupled decay first, as bnb's kernel).

  Args: as `adam8bit` (b1 mixes the sign input, b2 decays the state).

  >>> params = {"w": jnp.zeros((2,))}
  >>> opt = lion8bit(learning_rate=0.5)
  >>> u, _ = opt.update({"w": jnp.array([1.0, -3.0])}, opt.init(params), params)
  >>> u["w"].tolist()
  [-0.5, 0.5]
  """
  return _lion("lion8bit", learning_rate, b1, b2, weight_decay, optim_bits,
               min_8bit_size, override, paged)


def _sgd(fn, learning_rate, momentum, nesterov, weight_decay, optim_bits,
         min_8bit_size, override, paged):
  _check_momentum(fn, momentum)
  hyper = Hyper("momentum", beta1=momentum, beta2=0.0, nesterov=nesterov,
                weight_decay=weight_decay)
  return _alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged, weight_decay)


def sgd8bit(learning_rate, momentum: float, nesterov: bool = False,
            weight_decay: float = 0.0, *, optim_bits: int = 8,
            min_8bit_size: int = 4096, override: Override = None,
            paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `SGD8bit` (momentum required, as in bnb).

  `g = g + wd p` (coupled); `m = g` at step 1 else `m = momentum m + g`;
  `p = T(p - lr m)`. With `nesterov=True`: `p = T(p - lr (g + momentum m))`
  (PyTorch's form; bnb accepts the flag but its kernels ignore it).

  Args:
    learning_rate: a float >= 0 or an optax schedule.
    momentum: in (0, 1); bnb rejects 0.
    nesterov: use the Nesterov form above.
    weight_decay: coupled L2 weight decay, >= 0.
    optim_bits, min_8bit_size, override, paged: see `adam8bit`.

  >>> params = {"w": jnp.ones((2,))}
  >>> opt = sgd8bit(0.1, momentum=0.9)
  >>> u, _ = opt.update({"w": jnp.ones((2,))}, opt.init(params), params)
  >>> [round(v, 6) for v in u["w"].tolist()]
  [-0.1, -0.1]
  """
  return _sgd("sgd8bit", learning_rate, momentum, nesterov, weight_decay,
              optim_bits, min_8bit_size, override, paged)


def _rmsprop(fn, learning_rate, alpha, eps, weight_decay, optim_bits,
             min_8bit_size, override, paged):
  _check_rmsprop(fn, alpha, eps)
  hyper = Hyper("rmsprop", beta1=alpha, beta2=0.0, eps=eps,
                weight_decay=weight_decay)
  return _alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged, weight_decay)


def rmsprop8bit(learning_rate=1e-2, alpha: float = 0.99, eps: float = 1e-8,
                weight_decay: float = 0.0, *, optim_bits: int = 8,
                min_8bit_size: int = 4096, override: Override = None,
                paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `RMSprop8bit` (not centered).

  `v = alpha v + (1-alpha) (g + wd p)²; p = T(p - lr g / (sqrt(v) + eps))`.
  bnb's 8-bit kernel puts the raw gradient in the numerator (the 32-bit
  kernel the decayed one); both are reproduced.

  Args: as `adam8bit`, with alpha in (0, 1) the squared-gradient decay.

  >>> params = {"w": jnp.ones((2,))}
  >>> opt = rmsprop8bit(learning_rate=0.1, alpha=0.75, eps=0.0)
  >>> u, _ = opt.update({"w": jnp.ones((2,))}, opt.init(params), params)
  >>> [round(v, 6) for v in u["w"].tolist()]
  [-0.2, -0.2]
  """
  return _rmsprop("rmsprop8bit", learning_rate, alpha, eps, weight_decay,
                  optim_bits, min_8bit_size, override, paged)


def _adagrad(fn, learning_rate, eps, weight_decay, optim_bits, min_8bit_size,
             override, paged):
  _check_nonneg(fn, "eps", eps)
  hyper = Hyper("adagrad", beta1=0.0, beta2=0.0, eps=eps,
                weight_decay=weight_decay)
  return _alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged, weight_decay)


def adagrad8bit(learning_rate=1e-2, eps: float = 1e-10,
                weight_decay: float = 0.0, *, optim_bits: int = 8,
                min_8bit_size: int = 4096, override: Override = None,
                paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `Adagrad8bit` (no lr decay, zero initial accumulator).

  `v = v + (g + wd p)²; p = T(p - lr g / (sqrt(v) + eps))`.

  Args: see `adam8bit`.

  >>> params = {"w": jnp.ones((2,))}
  >>> opt = adagrad8bit(learning_rate=0.1)
  >>> u, _ = opt.update({"w": jnp.full((2,), 2.0)}, opt.init(params), params)
  >>> [round(v, 6) for v in u["w"].tolist()]
  [-0.1, -0.1]
  """
  return _adagrad("adagrad8bit", learning_rate, eps, weight_decay,
                  optim_bits, min_8bit_size, override, paged)


def _ademamix(fn, learning_rate, b1, b2, b3, alpha, t_alpha, t_beta3, eps,
              weight_decay, optim_bits, min_8bit_size, override, paged):
  _check_ademamix(fn, b1, b2, b3, alpha, t_alpha, t_beta3, eps)
  hyper = Hyper("ademamix", beta1=b1, beta2=b2, beta3=b3, alpha=alpha,
                t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                weight_decay=weight_decay)
  return _alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged, weight_decay)


def ademamix8bit(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.999,
                 b3: float = 0.9999, alpha: float = 5.0,
                 t_alpha: int | None = None, t_beta3: int | None = None,
                 eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 optim_bits: int = 8, min_8bit_size: int = 4096,
                 override: Override = None, paged: bool = False
                 ) -> optax.GradientTransformation:
  """bitsandbytes' `AdEMAMix8bit`.

  `m1 = b1 m1 + (1-b1) g; m2 = b3_t m2 + (1-b3_t) g; nu = b2 nu + (1-b2) g²;
  p = T(p - lr (m1/c1 + alpha_t m2) / (sqrt(nu)/c2 + eps));
  p = T(p (1 - lr wd))`, state1 = [m1; m2] (signed map), state2 = nu.
  `alpha_t`/`b3_t` follow bnb's schedulers when `t_alpha`/`t_beta3` are set.

  Args: as `adam8bit`, plus b3 (slow EMA decay), alpha (its weight) and the
  scheduler lengths t_alpha, t_beta3 (None: constant).

  >>> params = {"w": jnp.ones((3,))}
  >>> opt = ademamix8bit(learning_rate=0.1, weight_decay=0.0)
  >>> u, _ = opt.update({"w": jnp.ones((3,))}, opt.init(params), params)
  >>> round(float(u["w"][0]), 5)  # -0.1 * (1 + 5 * 1e-4) / (1 + 1e-8)
  -0.10005
  """
  return _ademamix("ademamix8bit", learning_rate, b1, b2, b3, alpha, t_alpha,
                   t_beta3, eps, weight_decay, optim_bits, min_8bit_size,
                   override, paged)


# -------------------------------------------------- 32-bit and paged aliases


def _variant(base: Callable, name: str, optim_bits: int, paged: bool,
             summary: str) -> Callable:
  def make(*args, **kwargs):
    kwargs.setdefault("optim_bits", optim_bits)
    kwargs.setdefault("paged", paged)
    try:
      return base(*args, **kwargs)
    except ValueError as e:  # name the function the user called
      raise ValueError(str(e).replace(f"{base.__name__}:", f"{name}:", 1)
                       ) from None
  make.__name__ = make.__qualname__ = name
  make.__doc__ = (f"{summary}\n\n  Same arguments as `{base.__name__}` "
                  f"(optim_bits={optim_bits}, paged={paged} by default).\n")
  return make


adam32bit = _variant(adam8bit, "adam32bit", 32, False,
                     "bitsandbytes' `Adam32bit`: float32 states.")
adamw32bit = _variant(adamw8bit, "adamw32bit", 32, False,
                      "bitsandbytes' `AdamW32bit`: float32 states.")
lion32bit = _variant(lion8bit, "lion32bit", 32, False,
                     "bitsandbytes' `Lion32bit`: float32 states.")
sgd32bit = _variant(sgd8bit, "sgd32bit", 32, False,
                    "bitsandbytes' `SGD32bit`: float32 states.")
rmsprop32bit = _variant(rmsprop8bit, "rmsprop32bit", 32, False,
                        "bitsandbytes' `RMSprop32bit`: float32 states.")
adagrad32bit = _variant(adagrad8bit, "adagrad32bit", 32, False,
                        "bitsandbytes' `Adagrad32bit`: float32 states.")
ademamix32bit = _variant(ademamix8bit, "ademamix32bit", 32, False,
                         "bitsandbytes' `AdEMAMix32bit`: float32 states.")
paged_adam8bit = _variant(adam8bit, "paged_adam8bit", 8, True,
                          "bitsandbytes' `PagedAdam8bit`: host-memory states.")
paged_adamw8bit = _variant(adamw8bit, "paged_adamw8bit", 8, True,
                           "bitsandbytes' `PagedAdamW8bit`: host-memory "
                           "states.")
paged_lion8bit = _variant(lion8bit, "paged_lion8bit", 8, True,
                          "bitsandbytes' `PagedLion8bit`: host-memory states.")
paged_ademamix8bit = _variant(ademamix8bit, "paged_ademamix8bit", 8, True,
                              "bitsandbytes' `PagedAdEMAMix8bit`: host-memory "
                              "states.")
paged_adam32bit = _variant(adam8bit, "paged_adam32bit", 32, True,
                           "bitsandbytes' `PagedAdam32bit`.")
paged_adamw32bit = _variant(adamw8bit, "paged_adamw32bit", 32, True,
                            "bitsandbytes' `PagedAdamW32bit`.")
paged_lion32bit = _variant(lion8bit, "paged_lion32bit", 32, True,
                           "bitsandbytes' `PagedLion32bit`.")
paged_ademamix32bit = _variant(ademamix8bit, "paged_ademamix32bit", 32, True,
                               "bitsandbytes' `PagedAdEMAMix32bit`.")
