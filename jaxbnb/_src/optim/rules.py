"""Per-leaf update rules of bitsandbytes' optimizers, in pure jnp.

These functions are the specification of every optimizer in
`jaxbnb.optim` and the reference the fused Pallas kernel is tested against.
They follow bnb's CUDA kernels (`csrc/kernels.cu`) operation by operation, in
float32, with `T(x)` (rounding to the parameter dtype) where the kernels
store into a `T` register:

* `update_8bit`: `kOptimizerStatic8bit2StateBlockwise` (adam, ademamix) and
  `kOptimizerStatic8bit1StateBlockwise` (momentum, lion, rmsprop, adagrad),
  256-element blocks, the tail block padded as the kernel's loads pad it
  (gradient 0, parameter 0, signed codes 128, unsigned codes 0);
* `update_32bit`: `kOptimizer32bit2State` / `kOptimizer32bit1State`, with
  the update-norm clipping of LAMB and LARS (`Hyper.max_unorm`) that bnb's
  `kPreconditionOptimizer32bit{2,1}State` computes first. The 8-bit
  blockwise kernels have no such clipping (bnb: "the 8-bit blockwise update
  does not implement update-norm clipping"), so `update_8bit` ignores
  `max_unorm`, as bnb's LAMB8bit / LARS8bit do on their 8-bit leaves.

Differences from bnb, all deliberate:

* bnb compiles with `--use_fast_math` (approximate `/`, `sqrtf`, `__powf`,
  `__fdividef`); we use IEEE operations, so results agree to a few ulp, not
  bit for bit.
* bnb's 1-state 8-bit kernel has no NaN/Inf guard (a non-finite gradient
  poisons the parameter and its block's codes); we apply the 2-state
  kernel's rule to every 8-bit optimizer: a non-finite gradient resets that
  element's state to 0 and leaves its parameter unchanged. The 32-bit rules
  keep bnb's behaviour (no guard).
* `nesterov` momentum: bnb accepts the flag but its kernels ignore it. We
  implement the standard form `p -= lr * (g + momentum * s1)` (with `s1` the
  updated buffer), which is PyTorch's SGD nesterov.

`lr` and `step` are traced scalars (step counts from 1), so changing them
never recompiles. `Hyper.kind` and `Hyper.nesterov` are static; its numbers
are Python numbers (folded into the compiled program) or scalar arrays,
traced when `optax.inject_hyperparams` feeds them from the optimizer state,
in which case the choices that depend on them ("weight decay > 0", "the
AdEMAMix schedules are on") are made per step with `jnp.where`, with the
same results.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src.optim import state as optim_state
from jaxbnb._src.optim.state import Quantized8bit

__all__ = [
    "KINDS",
    "TWO_STATE_KINDS",
    "UNORM_KINDS",
    "Hyper",
    "ademamix_schedule",
    "bias_corrections",
    "num_states",
    "update_32bit",
    "update_8bit",
    "weight_decay_on",
]

KINDS = ("adam", "ademamix", "lion", "momentum", "rmsprop", "adagrad")
TWO_STATE_KINDS = ("adam", "ademamix")
UNORM_KINDS = ("adam", "momentum")  # bnb's "lamb" and "lars"

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Hyper-parameters of one update rule (bnb's kernel arguments).

  `kind` and `nesterov` are static. The numbers are Python numbers or scalar
  arrays (traced under `optax.inject_hyperparams`); see the module docstring.

  Attributes:
    kind: "adam" (Adam and AdamW), "ademamix", "lion", "momentum" (SGD),
      "rmsprop" or "adagrad".
    beta1: first beta (momentum for SGD, alpha for RMSprop).
    beta2: second beta (Adam/AdEMAMix second moment, Lion's state decay).
    beta3: AdEMAMix slow-EMA beta.
    alpha: AdEMAMix mixing coefficient.
    t_alpha: AdEMAMix alpha warm-up steps (None or 0: no schedule).
    t_beta3: AdEMAMix beta3 warm-up steps (None or 0: no schedule).
    eps: epsilon.
    weight_decay: decoupled (adam, ademamix, lion) or coupled (momentum,
      rmsprop, adagrad) weight decay, as in bnb.
    nesterov: momentum only (see the module docstring).
    max_unorm: adam and momentum only, 32-bit rules only (LAMB: 1.0, LARS:
      0.02): when > 0, the step is scaled by `max_unorm ||p|| / ||u||` where
      the update norm `||u||` exceeds `max_unorm ||p||` (bnb's trust ratio;
      `||p||` is the norm of the parameter before the step). 0: off.

  Examples:
    >>> Hyper("adam").beta2
    0.999
  """

  kind: str
  beta1: float = 0.9
  beta2: float = 0.999
  beta3: float = 0.9999
  alpha: float = 5.0
  t_alpha: int | None = None
  t_beta3: int | None = None
  eps: float = 1e-8
  weight_decay: float = 0.0
  nesterov: bool = False
  max_unorm: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
          f"Hyper: unknown kind {self.kind!r}; expected one of {KINDS}.")
    if self.kind not in UNORM_KINDS and _positive(self.max_unorm) is not False:
      raise ValueError(
          f"Hyper: max_unorm (update-norm clipping) applies to kinds "
          f"{UNORM_KINDS} (bnb's LAMB and LARS); got kind={self.kind!r}, "
          f"max_unorm={self.max_unorm!r}.")


def num_states(kind: str) -> int:
  """2 for adam/ademamix (state1 and state2), 1 for the others.

  Examples:
    >>> num_states("adam"), num_states("lion")
    (2, 1)
  """
  return 2 if kind in TWO_STATE_KINDS else 1


def _c(x):
  """float32 constant of a Python number, float32 scalar of an array."""
  if isinstance(x, (int, float, np.number)):
    return np.float32(x)
  return jnp.asarray(x, _F32)


def _positive(x) -> bool | None:
  """`x > 0` for a Python number (None counts as 0), None for an array."""
  if x is None or isinstance(x, (int, float, np.number)):
    return bool(x is not None and x > 0)
  return None


def _if_positive(x, make, otherwise):
  """`make()` where `x > 0`, else `otherwise`; decided statically if it can.

  With a Python number the branch is chosen while tracing (the compiled
  program holds only one side); with an array (a traced hyper-parameter)
  both sides are computed and `jnp.where` picks per step.
  """
  on = _positive(x)
  if on is False:
    return otherwise
  value = make()
  return value if on else jnp.where(_c(x) > 0, value, otherwise)


def weight_decay_on(hyper: Hyper) -> bool | None:
  """Whether `hyper` decays weights: True/False, or None when it is traced.

  The fused kernel takes this as its static `has_wd` (None: decided per
  step from the scalar, like the reference rules do).

  Args:
    hyper: the rule's hyper-parameters.

  Returns:
    `hyper.weight_decay > 0` for a Python number, None for an array.

  Examples:
    >>> weight_decay_on(Hyper("adam", weight_decay=1e-2))
    True
    >>> weight_decay_on(Hyper("adam", weight_decay=jnp.float32(0.0))) is None
    True
  """
  return _positive(hyper.weight_decay)


def _round_to(x: jax.Array, dtype) -> jax.Array:
  """bnb's `T(x)`: store into a T register, read back as float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return x
  return x.astype(dtype).astype(_F32)


def _sgn(x: jax.Array) -> jax.Array:
  """CUDA `sgn`: (0 < x) - (x < 0); 0 for 0 and NaN."""
  return (x > 0).astype(_F32) - (x < 0).astype(_F32)


def bias_corrections(hyper: Hyper, step) -> tuple[jax.Array, jax.Array]:
  """Adam's bias corrections `(1 - b1^t, sqrt(1 - b2^t))` in float32.

  The reference rules and the fused kernel (which takes them as scalars)
  both use this expression, so they agree bit for bit.

  Args:
    hyper: the rule's hyper-parameters (`beta1`, `beta2`).
    step: the step number t, 1 for the first update (traced scalar).

  Returns:
    `(corr1, corr2)`, float32 scalars.

  Examples:
    >>> c1, c2 = bias_corrections(Hyper("adam"), jnp.float32(1))
    >>> round(float(c1), 6), round(float(c2), 6)
    (0.1, 0.031623)
  """
  step = jnp.asarray(step, _F32)
  c1 = _c(1.0) - jnp.power(_c(hyper.beta1), step)
  c2 = jnp.sqrt(_c(1.0) - jnp.power(_c(hyper.beta2), step))
  return c1, c2


def ademamix_schedule(h: Hyper, step: jax.Array):
  """AdEMAMix's (alpha_t, beta3_t) at `step` (bnb `AdEMAMix.update_step`).

  `alpha_t = min(step*alpha/t_alpha, alpha)`;
  `beta3_t = min(exp(ln b1 ln b3 / ((1-s) ln b3 + s ln b1)), b3)`, `s =
  step/t_beta3`. bnb evaluates these in Python float64 and passes float32;
  we evaluate them in float32 on the traced step (a few ulp apart).

  Args:
    h: the rule's hyper-parameters (`alpha`, `t_alpha`, `beta1`, `beta3`,
      `t_beta3`).
    step: the step number, 1 for the first update (traced scalar).

  Returns:
    `(alpha_t, beta3_t)`, float32 scalars.

  Examples:
    >>> a, b3 = ademamix_schedule(Hyper("ademamix", t_alpha=10),
    ...                           jnp.float32(5))
    >>> float(a), round(float(b3), 4)
    (2.5, 0.9999)
  """
  step = jnp.asarray(step, _F32)
  alpha = jnp.asarray(_c(h.alpha))
  beta3 = jnp.asarray(_c(h.beta3))

  def alpha_t():
    return jnp.minimum(step * _c(h.alpha) / _c(h.t_alpha), _c(h.alpha))

  def beta3_t():
    ln1, ln3 = _log(h.beta1), _log(h.beta3)
    s = step / _c(h.t_beta3)
    return jnp.minimum(
        jnp.exp((ln1 * ln3) / (((_c(1.0) - s) * ln3) + (s * ln1))),
        _c(h.beta3))

  return (_if_positive(h.t_alpha, alpha_t, alpha),
          _if_positive(h.t_beta3, beta3_t, beta3))


def _log(x):
  """float32 ln x: of the float64 log for a Python number, as bnb does."""
  if isinstance(x, (int, float, np.number)):
    return _c(math.log(x))
  return jnp.log(_c(x))


def _check(kind: str, hyper: Hyper) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown optimizer kind {kind!r}; expected one of "
                     f"{KINDS}.")
  if hyper.kind != kind:
    raise ValueError(f"kind {kind!r} does not match hyper.kind "
                     f"{hyper.kind!r}.")


# ---------------------------------------------------------------- 32-bit


def _update_scale(h: Hyper, unorm_sq, pf: jax.Array, slack):
  """bnb's trust ratio: `min(1, (max_unorm ||p|| + slack) / ||u||)`.

  `unorm_sq` is the squared update norm the preconditioning kernel sums,
  `pf` the float32 parameter before the step (bnb: `torch.norm(p.float())`)
  and `slack` the 1-state kernels' `+ eps` (0 for the 2-state ones).
  """
  unorm = jnp.sqrt(unorm_sq)
  limit = (_c(h.max_unorm) * jnp.sqrt(jnp.sum(pf * pf))) + slack
  return jnp.where(unorm > limit, limit / unorm, _c(1.0))


def update_32bit(kind: str, p: jax.Array, g: jax.Array, s1: jax.Array,
                 s2: jax.Array | None, *, lr, step, hyper: Hyper):
  """One bnb 32-bit optimizer step for one leaf.

  Args:
    kind: the rule (see `Hyper.kind`).
    p: parameters (float32, float16 or bfloat16).
    g: gradient, p's shape (any float dtype; read in p's dtype as bnb does).
    s1: float32 state1, p's shape (AdEMAMix: `(2, *p.shape)`, [m1; m2]).
    s2: float32 state2 for adam/ademamix, else None.
    lr: learning rate (traced scalar).
    step: step number, 1 for the first update (traced scalar).
    hyper: static hyper-parameters.

  Returns:
    (new_p in p's dtype, new_s1, new_s2).

  Examples:
    >>> p = jnp.ones((3,)); g = jnp.full((3,), 0.5)
    >>> z = jnp.zeros((3,))
    >>> new_p, s1, s2 = update_32bit("adam", p, g, z, z, lr=0.1, step=1,
    ...                              hyper=Hyper("adam"))
    >>> [round(v, 4) for v in new_p.tolist()]
    [0.9, 0.9, 0.9]
  """
  _check(kind, hyper)
  h = hyper
  dt = p.dtype
  lr = jnp.asarray(lr, _F32)
  step = jnp.asarray(step, _F32)
  pf = p.astype(_F32)
  gf = _round_to(g.astype(_F32), dt)  # g_vals is a T register
  b1, b2, eps, wd = _c(h.beta1), _c(h.beta2), _c(h.eps), _c(h.weight_decay)
  one = _c(1.0)
  if kind in TWO_STATE_KINDS:
    c1, c2 = bias_corrections(h, step)
    if kind == "adam":
      s1 = s1 * b1 + ((one - b1) * gf)
      s2 = s2 * b2 + ((one - b2) * (gf * gf))
      step_size = -lr * c2 / c1

      def lamb_scale():  # kPreconditionOptimizer32bit2State, then the ratio
        u = ((s1 * (one / (one - jnp.power(b1, step))))
             / (jnp.sqrt(s2 * (one / (one - jnp.power(b2, step)))) + eps))
        return _update_scale(h, jnp.sum(u * u), pf, _c(0.0)) * step_size

      step_size = _if_positive(h.max_unorm, lamb_scale, step_size)
      new = _round_to(pf + (step_size * (s1 / (jnp.sqrt(s2) + (eps * c2)))),
                      dt)
    else:
      alpha, b3 = ademamix_schedule(h, step)
      m1 = s1[0] * b1 + ((one - b1) * gf)
      m2 = s1[1] * b3 + ((one - b3) * gf)
      s2 = s2 * b2 + ((one - b2) * gf * gf)
      new = _round_to(
          pf - lr * (((m1 / c1) + (alpha * m2)) / ((jnp.sqrt(s2) / c2) + eps)),
          dt)
      s1 = jnp.stack([m1, m2])
    new = _if_positive(h.weight_decay,
                       lambda: _round_to(new * (one - (lr * wd)), dt), new)
    return new.astype(dt), s1, s2

  g_raw = gf
  if kind != "lion":
    gf = _if_positive(h.weight_decay, lambda: _round_to(gf + (pf * wd), dt),
                      gf)
  if kind == "momentum":
    def lars_scale():
      # kPreconditionOptimizer32bit1State sums the squared momentum update
      # of the gradient *without* the weight decay (bnb's kernel).
      pre = jnp.where(step == 1, g_raw, s1 * b1 + g_raw)
      pre = g_raw + b1 * pre if h.nesterov else pre
      return _update_scale(h, jnp.sum(pre * pre), pf, eps)

    scale = _if_positive(h.max_unorm, lars_scale, one)  # 1 * x == x
    s1 = jnp.where(step == 1, gf, s1 * b1 + gf)
    d = gf + b1 * s1 if h.nesterov else s1
    new = _round_to(pf + (scale * (-lr * d)), dt)
  elif kind == "lion":
    pf = _if_positive(h.weight_decay,
                      lambda: _round_to(pf * (one - lr * wd), dt), pf)
    new = _round_to(pf - (lr * _sgn(s1 * b1 + ((one - b1) * gf))), dt)
    s1 = s1 * b2 + ((one - b2) * gf)
  elif kind == "rmsprop":
    s1 = s1 * b1 + ((one - b1) * gf * gf)
    new = _round_to(pf - lr * (gf / (jnp.sqrt(s1) + eps)), dt)
  else:  # adagrad
    s1 = s1 + gf * gf
    new = _round_to(pf - lr * (gf / (jnp.sqrt(s1) + eps)), dt)
  return new.astype(dt), s1, None


# ----------------------------------------------------------------- 8-bit


def _to_blocks(x: jax.Array, fill) -> jax.Array:
  """[..., n] -> [..., nblocks, 256], padded with `fill`."""
  n = x.shape[-1]
  nb = optim_state.num_blocks(n)
  pad = nb * optim_state.BLOCKSIZE - n
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=fill)
  return x.reshape(x.shape[:-1] + (nb, optim_state.BLOCKSIZE))


def _from_blocks(x: jax.Array, shape) -> jax.Array:
  n = math.prod(shape)
  lead = x.shape[:-2]
  return x.reshape(lead + (-1,))[..., :n].reshape(lead + tuple(shape))


def _load_state(q: Quantized8bit, n: int) -> jax.Array:
  """Dequantized fp32 blocks `[..., nblocks, 256]`, padded like the kernel
  loads (signed codes 128, unsigned codes 0)."""
  lead = q.absmax.shape[:-1]
  codes = q.codes.reshape(lead + (n,)).astype(jnp.int32)
  codes = _to_blocks(codes, 128 if q.signed else 0)
  table = jnp.asarray(q.qmap, _F32)
  return table[codes] * q.absmax.astype(_F32)[..., None]


def _store_state(s: jax.Array, signed: bool, shape) -> Quantized8bit:
  """New absmax from the updated fp32 blocks and the requantized codes."""
  absmax = jnp.max(jnp.abs(s), axis=-1)
  codes = optim_state.requantize_blocks(s, absmax, signed)
  return Quantized8bit(codes=_from_blocks(codes, shape), absmax=absmax,
                       signed=signed)


def update_8bit(kind: str, p: jax.Array, g: jax.Array, state1: Quantized8bit,
                state2: Quantized8bit | None, *, lr, step, hyper: Hyper):
  """One bnb 8-bit blockwise optimizer step for one leaf.

  Dequantize the states, update them and the parameter in float32, compute
  the new per-block absmax from the updated states and requantize (bnb's
  `kOptimizerStatic8bit{2,1}StateBlockwise`, blocksize 256).

  Args:
    kind: the rule (see `Hyper.kind`).
    p: parameters (float32, float16 or bfloat16).
    g: gradient, p's shape.
    state1: signed-map state (AdEMAMix: stacked [m1; m2]).
    state2: unsigned-map state for adam/ademamix, else None.
    lr: learning rate (traced scalar).
    step: step number, 1 for the first update (traced scalar).
    hyper: static hyper-parameters.

  Returns:
    (new_p in p's dtype, new_state1, new_state2).

  Examples:
    >>> p = jnp.ones((512,)); g = jnp.full((512,), 0.5)
    >>> s1 = Quantized8bit.zeros((512,), signed=True)
    >>> s2 = Quantized8bit.zeros((512,), signed=False)
    >>> new_p, s1, s2 = update_8bit("adam", p, g, s1, s2, lr=0.1, step=1,
    ...                             hyper=Hyper("adam"))
    >>> round(float(new_p[0]), 4), round(float(s1.dequantize()[0]), 4)
    (0.9, 0.05)
  """
  _check(kind, hyper)
  if (state2 is None) != (num_states(kind) == 1):
    raise ValueError(f"update_8bit({kind!r}): state2 must be "
                     f"{'None' if num_states(kind) == 1 else 'a Quantized8bit'}"
                     f", got {type(state2).__name__}.")
  h = hyper
  dt = p.dtype
  shape = p.shape
  n = math.prod(shape)
  lr = jnp.asarray(lr, _F32)
  step = jnp.asarray(step, _F32)
  pf = _to_blocks(p.astype(_F32).reshape(n), 0.0)
  gf = _to_blocks(_round_to(g.astype(_F32), dt).reshape(n), 0.0)
  finite = jnp.isfinite(gf)
  b1, b2, eps, wd = _c(h.beta1), _c(h.beta2), _c(h.eps), _c(h.weight_decay)
  one = _c(1.0)
  s1 = _load_state(state1, n)

  if kind in TWO_STATE_KINDS:
    s2 = _load_state(state2, n)
    s2 = jnp.where(finite, (s2 * b2) + (((one - b2) * gf) * gf), 0.0)
    c1, c2 = bias_corrections(h, step)
    if kind == "adam":
      s1 = jnp.where(finite, (s1 * b1) + ((one - b1) * gf), 0.0)
      step_size = (-lr * c2) / c1
      new = _round_to(pf + (step_size * (s1 / (jnp.sqrt(s2) + (c2 * eps)))),
                      dt)
    else:
      alpha, b3 = ademamix_schedule(h, step)
      m1 = jnp.where(finite, (s1[0] * b1) + ((one - b1) * gf), 0.0)
      m2 = jnp.where(finite, (s1[1] * b3) + ((one - b3) * gf), 0.0)
      new = _round_to(
          pf - lr * (((m1 / c1) + (alpha * m2)) / ((jnp.sqrt(s2) / c2) + eps)),
          dt)
      s1 = jnp.stack([m1, m2])
    new = _if_positive(h.weight_decay,
                       lambda: _round_to(new * (one - (lr * wd)), dt), new)
    new = jnp.where(finite, new, pf)
    new_s1 = _store_state(s1, True, shape)
    new_s2 = _store_state(s2, False, shape)
    return _from_blocks(new, shape).astype(dt), new_s1, new_s2

  gv, pf_l = gf, pf
  if kind == "lion":
    pf_l = _if_positive(h.weight_decay,
                        lambda: _round_to(pf * (one - lr * wd), dt), pf)
  else:  # a float register: not rounded to T
    gv = _if_positive(h.weight_decay, lambda: gv + pf * wd, gv)
  if kind == "momentum":
    s1 = jnp.where(step == 1, gv, (s1 * b1) + gv)
  elif kind == "lion":
    upd = _round_to(lr * _sgn((s1 * b1) + ((one - b1) * gv)), dt)
    s1 = s1 * b2 + ((one - b2) * gv)
  elif kind == "rmsprop":
    s1 = s1 * b1 + ((one - b1) * (gv * gv))
  else:  # adagrad
    s1 = s1 + (gv * gv)
  s1 = jnp.where(finite, s1, 0.0)

  if kind == "momentum":
    d = gv + b1 * s1 if h.nesterov else s1
    new = pf - lr * d
  elif kind == "lion":
    new = pf_l - upd
  else:  # rmsprop, adagrad: the numerator is the raw gradient (no decay)
    new = pf - lr * (gf / (jnp.sqrt(s1) + eps))
  new = jnp.where(finite, _round_to(new, dt), pf)
  new_s1 = _store_state(s1, True, shape)
  return _from_blocks(new, shape).astype(dt), new_s1, None
