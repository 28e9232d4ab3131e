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
keep float32 states, as in bnb. The per-leaf rules live in `rules`; an 8-bit
leaf goes through the fused kernel bridge (`kernels.optimizer_update_8bit`)
when a kernel serves it.

The learning rate may be a float or an optax schedule, evaluated at the
traced step count, so a new learning rate or step never recompiles. Under
`optax.inject_hyperparams` every float hyper-parameter (learning rate,
betas, eps, weight decay...) arrives as an array and may be changed between
steps. `optim_bits` and `min_8bit_size` decide the state's layout in `init`
(they are unused by `update`): they may be concrete arrays, but not traced
ones.

A paged state (`paged=True`) lives in host memory between steps; an update
keeps it in the memory space it arrived in (see `paged`), so a state
restored into device memory stays there, with a warning.

Parameters may be boxed, as in `nnx.state(model)` (`nnx.Param`) or linen's
`nn.Partitioned`: a state with the parameter's shape and dtype kind keeps
its box (and so its sharding metadata), an 8-bit state is not boxed (a box
holds one array). A None in the tree is an empty subtree, as in optax (no
state, None in the updates). `update` checks the updates against the tree
the state was initialized for by key paths (boxes left out), so a renamed
leaf of the same shape is refused, while optax's wrappers (`MaskedNode`
leaves, `nnx.Optimizer`'s unboxed arrays) pass.
"""

from __future__ import annotations

import math
from typing import Any
import warnings

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from jaxbnb._src.optim import fused as optim_fused
from jaxbnb._src.optim import hyper_checks
from jaxbnb._src.optim import kernels as optim_kernels
from jaxbnb._src.optim import paged as optim_paged
from jaxbnb._src.optim import rules as optim_rules
from jaxbnb._src.optim import state as optim_state
from jaxbnb._src.optim.rules import Hyper
from jaxbnb._src.optim.state import Optimizer8bitState
from jaxbnb._src.optim.state import Quantized8bit
from jaxbnb._src.quant import dispatch

__all__ = [
    "Optimizer8bitState",
    "bnb_alias",
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
_TRACED_SETTING = (
    "{name}: {args} arrived as traced arrays in `init`, but they decide "
    "which leaves keep 8-bit state. optax.inject_hyperparams turns every "
    "number into an array: call init outside jax.jit / jax.eval_shape, or "
    "pass static_args={args!r} to optax.inject_hyperparams.")
_PAGED_ON_DEVICE = (
    "{name}: the paged optimizer state arrived typed as device memory and "
    "stays there (an update keeps the memory space, which is part of the "
    "state's type under jit). Orbax restores arrays typed as device memory "
    "and jax.eval_shape drops memory kinds: after a restore, move the "
    "state's `state1` and `state2` back with jax.device_put(x, "
    "jax.memory.Space.Host).")


# ------------------------------------------------------------ boxed leaves


_is_box = optim_state.is_box


def _unbox(item):
  return jax.tree.leaves(item)[0] if _is_box(item) else item


def _rebox(item, state, leaf):
  """`state` in `item`'s box where it is an array like the parameter.

  A box holds one array (flax's `nnx.Optimizer` copies a parameter's
  metadata, e.g. its sharding, to a boxed state), so a `Quantized8bit`, a
  stacked AdEMAMix state or None stays unboxed.
  """
  if (_is_box(item) and isinstance(state, jax.Array)
      and state.shape == leaf.shape):
    return jax.tree.structure(item).unflatten([state])
  return state


def _is_quantized(x) -> bool:
  return isinstance(x, Quantized8bit)


def _is_entry(x) -> bool:
  """One parameter's entry in a state tree: a `Quantized8bit` or a box."""
  return isinstance(x, Quantized8bit) or _is_box(x)


def _entry_paths(tree, is_leaf=_is_box) -> list[str]:
  """The key path of every parameter entry of `tree`, boxes left out.

  Boxes (`nnx.Param`, nnx's `OptVariable`, `nn.Partitioned`) end a path, so
  a boxed tree and its unboxed arrays (`nnx.as_pure`) give the same paths;
  None and optax's `MaskedNode` hold no entry.
  """
  return [jax.tree_util.keystr(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def _check_structure(fn: str, updates, state1) -> None:
  """The updates must be the tree the state was initialized for.

  The leaf count alone would let a renamed layer (same shapes) take
  another layer's state; optax's own optimizers refuse such updates too.
  Compared by key paths, boxes left out, so containers of another type
  with the same keys (an `nnx.State` and a dict) match.
  """
  got = _entry_paths(updates)
  want = _entry_paths(state1, _is_entry)
  if got == want:
    return
  show = lambda keys: ", ".join(keys[:5]) or "nothing"
  extra = [k for k in got if k not in want]
  missing = [k for k in want if k not in got]
  if extra or missing:
    detail = f"the updates have {show(extra)} where the state has " + show(
        missing)
  else:
    detail = f"the updates come in the order {show(got)}, the state in " + (
        show(want))
  raise ValueError(
      f"{fn}: the updates do not have the structure the optimizer state was "
      f"initialized for: {detail} ({len(got)} and {len(want)} leaves). Init "
      "the optimizer with parameters of the updates' structure.")


# ----------------------------------------------------------- per-leaf work


def _update_leaf(kind, p, g, s1, s2, *, lr, step, hyper, mode):
  """One leaf: the fused kernel when one serves it, else the rules."""
  if isinstance(s1, Quantized8bit):
    out = optim_kernels.optimizer_update_8bit(
        kind, p, g, s1, s2, lr=lr, step=step, hyper=hyper, mode=mode)
    if out is not None:
      return out
    return optim_rules.update_8bit(kind, p, g, s1, s2, lr=lr, step=step,
                                   hyper=hyper)
  return optim_rules.update_32bit(kind, p, g, s1, s2, lr=lr, step=step,
                                  hyper=hyper)


def _explicit_axes(*arrays) -> bool:
  """Whether any of `arrays` is sharded over an Explicit mesh axis."""
  for x in jax.tree.leaves(arrays):
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ()):
      return True
  return False


def _update_leaf_auto(kind, p, g, s1, s2, *, lr, step, hyper, mode):
  """`_update_leaf` on a mesh whose axes are Explicit (sharding in types).

  The rules flatten each leaf into blocks, a reshape that explicit sharding
  cannot type; inside `auto_axes` the compiler places the intermediates as
  on an Auto mesh, and the results come back typed like their inputs: the
  new parameter like the gradient, each state like itself.
  """
  def sharding(x):
    return jax.typeof(x).sharding

  out = (sharding(g), jax.tree.map(sharding, s1), jax.tree.map(sharding, s2))

  def leaf(p, g, s1, s2, lr, step):
    return _update_leaf(kind, p, g, s1, s2, lr=lr, step=step, hyper=hyper,
                        mode=mode)

  return jax.sharding.auto_axes(leaf, out_sharding=out)(p, g, s1, s2, lr,
                                                        step)


def _fused_leaf(kind, p, g, s1, s2, *, lr, step, hyper, mode):
  """One leaf of a fused step (`optim_fused.apply_updates_fused`).

  Returns `(new_p, s1, s2, written)`. Where the kernel serves the leaf,
  `written` is `optax.apply_updates(p, new_p - p)` computed by the kernel
  over p's (donated) buffer, and the states come from that same call;
  `new_p` then comes from a second, plain update that only exists to give
  `update` its exact return value: it is dead code (removed by jit) unless
  a transformation after this one uses the updates. Elsewhere `written` is
  None and the step applies the update as `optax.apply_updates` does.
  """
  if isinstance(s1, Quantized8bit):
    out = optim_kernels.optimizer_update_8bit(
        kind, p, g, s1, s2, lr=lr, step=step, hyper=hyper, mode=mode,
        apply_updates=True)
    if out is not None:
      written, n1, n2 = out
      new_p = _update_leaf(kind, p, g, s1, s2, lr=lr, step=step,
                           hyper=hyper, mode=mode)[0]
      return new_p, n1, n2, written
  return (*_update_leaf(kind, p, g, s1, s2, lr=lr, step=step, hyper=hyper,
                        mode=mode), None)


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


def _where(path) -> str:
  return jax.tree_util.keystr(path) or "the leaf"


def _check_leaf(fn: str, path, leaf) -> None:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{fn}: every parameter leaf must be a floating-point array; "
        f"{_where(path)} is {type(leaf).__name__} with dtype {dtype}.")


def _check_update(fn: str, kind: str, path, g, p, s1) -> None:
  """The gradient of one leaf against its parameter and its state."""
  if not jnp.issubdtype(g.dtype, jnp.floating):
    raise TypeError(f"{fn}: gradients must be floating-point arrays, got "
                    f"dtype {g.dtype} for {_where(path)}.")
  if p is not None and tuple(g.shape) != tuple(p.shape):
    raise ValueError(
        f"{fn}: the gradient of {_where(path)} has shape {tuple(g.shape)}, "
        f"but the parameter has shape {tuple(p.shape)}.")
  lead = 1 if kind == "ademamix" else 0
  want = tuple(s1.shape)[lead:]
  if tuple(g.shape) != want:
    raise ValueError(
        f"{fn}: the gradient of {_where(path)} has shape {tuple(g.shape)}, "
        f"but the optimizer state was initialized for shape {want}.")


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


def _transform(fn: str, hyper: Hyper, learning_rate, *, optim_bits,
               min_8bit_size, override: Override, paged: bool,
               direction: bool) -> optax.GradientTransformation:
  """The shared init/update of every optimizer in this module.

  With `direction=True` (the `scale_by_*` blocks) the rule runs with lr=1 on
  zero parameters and returns minus the new "parameters": the update
  direction. Otherwise it runs bnb's full step on `params` and returns
  `new_p - p`.
  """
  kind = hyper.kind
  optim_bits, min_8bit_size = hyper_checks.settings(fn, optim_bits,
                                                    min_8bit_size)

  def init_fn(params):
    traced = tuple(name for name, v in (("optim_bits", optim_bits),
                                        ("min_8bit_size", min_8bit_size))
                   if v is hyper_checks.TRACED)
    if traced:
      raise ValueError(_TRACED_SETTING.format(name=fn, args=traced))
    items, treedef = jax.tree_util.tree_flatten_with_path(params,
                                                          is_leaf=_is_box)
    keep32 = _override_flags(fn, override, params)
    s1s, s2s = [], []
    for (path, item), k32 in zip(items, keep32):
      leaf = _unbox(item)
      _check_leaf(fn, path, leaf)
      use8 = (optim_bits == 8 and math.prod(leaf.shape) >= min_8bit_size
              and not k32)
      s1, s2 = _init_leaf(kind, leaf, use8)
      # to_host keeps the sharding: first where the leaf is. On a mesh of
      # Explicit axes the sharding is part of the type: the states take
      # the parameter's, as optax's zeros_like states do.
      if paged or _explicit_axes(leaf):
        s1, s2 = optim_paged.place_like((s1, s2), leaf)
      s1s.append(_rebox(item, s1, leaf))
      s2s.append(_rebox(item, s2, leaf))
    state1 = treedef.unflatten(s1s)
    state2 = treedef.unflatten(s2s)
    count = jnp.zeros([], jnp.int32)
    if paged:
      state1, state2 = optim_paged.to_host((state1, state2))
      # Committed like the host states, or a jitted step would compile
      # again once its outputs (all committed) come back as inputs.
      count = optim_paged.commit_beside(count, (state1, state2))
    return Optimizer8bitState(count=count, state1=state1, state2=state2)

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
    on_host = paged and optim_paged.in_host_memory((state1, state2))
    if paged and not on_host:
      warnings.warn(_PAGED_ON_DEVICE.format(name=fn), stacklevel=2)
    if paged:
      state1, state2 = optim_paged.to_device((state1, state2))
    # None and optax's MaskedNode hold no gradient and no state.
    grads, treedef = jax.tree_util.tree_flatten_with_path(updates)
    _check_structure(fn, updates, state1)
    # The states keep their own structure (init's: boxes, masked nodes),
    # one entry per gradient leaf in the same order. A 1-state optimizer's
    # state2 holds None per leaf, and passes through.
    two = optim_rules.num_states(kind) == 2
    s1s, def1 = jax.tree.flatten(state1, is_leaf=_is_quantized)
    if two:
      s2s, def2 = jax.tree.flatten(state2, is_leaf=_is_quantized)
    else:
      s2s, def2 = [None] * len(s1s), None
    if not len(s1s) == len(s2s) == len(grads):
      raise ValueError(
          f"{fn}: the updates have {len(grads)} leaves but the optimizer "
          f"state holds {len(s1s)} (state1) and {len(s2s)} (state2); init "
          "the optimizer with parameters of the updates' structure.")
    if direction:
      ps = [None] * len(grads)
    else:
      try:
        ps = treedef.flatten_up_to(params)
      except (ValueError, TypeError) as e:
        raise ValueError(
            f"{fn}: params must have the structure of the updates "
            f"({treedef}): {e}") from None
    mode = dispatch.resolve()
    # Inside `apply_updates_fused`, a full step (not a direction block)
    # also writes each parameter in place and says so to the recorder.
    recorder = None if direction else optim_fused.active_recorder()
    out_u, out_s1, out_s2 = [], [], []
    for (path, g), p, s1, s2 in zip(grads, ps, s1s, s2s):
      _check_update(fn, kind, path, g, p, s1)
      if direction:
        p = jnp.zeros(g.shape, jnp.float32)
      if recorder is None:
        leaf_update = (_update_leaf_auto if _explicit_axes(p, g, s1, s2)
                       else _update_leaf)
        new_p, n1, n2 = leaf_update(kind, p, g, s1, s2, lr=lr, step=step,
                                    hyper=hyper, mode=mode)
      else:
        new_p, n1, n2, written = _fused_leaf(
            kind, p, g, s1, s2, lr=lr, step=step, hyper=hyper, mode=mode)
      if direction:
        out_u.append(jnp.float32(0.0) - new_p)  # +0 for no move, not -0
      else:
        out_u.append(new_p.astype(jnp.float32) - p.astype(jnp.float32))
        if recorder is not None:
          recorder.add(out_u[-1], p, written)
      out_s1.append(n1)
      out_s2.append(n2)
    state1 = def1.unflatten(out_s1)
    if two:
      state2 = def2.unflatten(out_s2)
    if on_host:  # the memory space is part of the state's type: keep it
      state1, state2 = optim_paged.to_host((state1, state2))
    new_updates = treedef.unflatten(out_u)
    return new_updates, Optimizer8bitState(count=step, state1=state1,
                                           state2=state2)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------- building blocks


def _block(fn, hyper, optim_bits, min_8bit_size, override, paged):
  return _transform(fn, hyper, None, optim_bits=optim_bits,
                    min_8bit_size=min_8bit_size, override=override,
                    paged=paged, direction=True)


def scale_by_adam8bit(b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                      eps: ArrayLike = 1e-8, *, optim_bits: int = 8,
                      min_8bit_size: int = 4096, override: Override = None,
                      paged: bool = False) -> optax.GradientTransformation:
  """Adam's direction `m_hat / (sqrt(v_hat) + eps)` with 8-bit states.

  bnb's 8-bit blockwise Adam with lr=1 and no weight decay; chain it with
  `optax.scale_by_learning_rate` (and `optax.add_decayed_weights`). See
  :func:`jaxbnb.optim.adam8bit` for the bnb-exact alias.

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

  Examples:
    >>> import optax
    >>> opt = optax.chain(optax.clip_by_global_norm(1.0),
    ...                   scale_by_adam8bit(),
    ...                   optax.scale_by_learning_rate(1e-3))
    >>> params = {"w": jnp.ones((64, 64))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.full((64, 64), 0.1)}, state)
    >>> updates["w"].shape, round(float(updates["w"][0, 0]), 6)
    ((64, 64), -0.001)
  """
  fn = "scale_by_adam8bit"
  hyper_checks.check_beta(fn, "b1", b1)
  hyper_checks.check_beta(fn, "b2", b2)
  hyper_checks.check_nonneg(fn, "eps", eps)
  return _block(fn, Hyper("adam", beta1=b1, beta2=b2, eps=eps), optim_bits,
                min_8bit_size, override, paged)


def scale_by_ademamix8bit(b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                          b3: ArrayLike = 0.9999, alpha: ArrayLike = 5.0,
                          t_alpha: int | None = None,
                          t_beta3: int | None = None, eps: ArrayLike = 1e-8,
                          *, optim_bits: int = 8, min_8bit_size: int = 4096,
                          override: Override = None, paged: bool = False
                          ) -> optax.GradientTransformation:
  """AdEMAMix's direction `(m1_hat + alpha m2) / (sqrt(nu_hat) + eps)`.

  See :func:`jaxbnb.optim.ademamix8bit` for the bnb-exact alias.

  Args:
    b1: fast EMA decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    b3: slow EMA decay, in [0, 1).
    alpha: weight of the slow EMA, >= 0.
    t_alpha: alpha warm-up steps (None: constant alpha).
    t_beta3: b3 warm-up steps (None: constant b3).
    eps: epsilon, >= 0.
    optim_bits: 8 (blockwise 8-bit states) or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`
      saying which leaves keep 32-bit states.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> opt = scale_by_ademamix8bit()
    >>> s = opt.init({"w": jnp.ones((8,))})
    >>> u, s = opt.update({"w": jnp.ones((8,))}, s)
    >>> round(float(u["w"][0]), 4)  # m1_hat = 1, m2 = 1e-4, nu_hat = 1
    1.0005
  """
  fn = "scale_by_ademamix8bit"
  t_alpha, t_beta3 = hyper_checks.check_ademamix(
      fn, b1, b2, b3, alpha, t_alpha, t_beta3, eps)
  return _block(fn, Hyper("ademamix", beta1=b1, beta2=b2, beta3=b3,
                          alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                          eps=eps),
                optim_bits, min_8bit_size, override, paged)


def scale_by_lion8bit(b1: ArrayLike = 0.9, b2: ArrayLike = 0.99, *,
                      optim_bits: int = 8, min_8bit_size: int = 4096,
                      override: Override = None, paged: bool = False
                      ) -> optax.GradientTransformation:
  """Lion's direction `sign(b1 m + (1 - b1) g)`; m decays with b2.

  See :func:`jaxbnb.optim.lion8bit` for the bnb-exact alias.

  Args:
    b1: mixes the state and the gradient inside the sign, in [0, 1).
    b2: decay of the state, in [0, 1).
    optim_bits: 8 (blockwise 8-bit states) or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`
      saying which leaves keep 32-bit states.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> opt = scale_by_lion8bit()
    >>> s = opt.init({"w": jnp.ones((3,))})
    >>> u, s = opt.update({"w": jnp.array([0.5, -2.0, 0.0])}, s)
    >>> u["w"].tolist()
    [1.0, -1.0, 0.0]
  """
  fn = "scale_by_lion8bit"
  hyper_checks.check_beta(fn, "b1", b1)
  hyper_checks.check_beta(fn, "b2", b2)
  return _block(fn, Hyper("lion", beta1=b1, beta2=b2), optim_bits,
                min_8bit_size, override, paged)


def scale_by_momentum8bit(momentum: ArrayLike = 0.9, *,
                          nesterov: bool = False, optim_bits: int = 8,
                          min_8bit_size: int = 4096, override: Override = None,
                          paged: bool = False
                          ) -> optax.GradientTransformation:
  """Heavy-ball momentum `m = momentum m + g` (m = g at the first step).

  With `nesterov`, the direction is `g + momentum m` (bnb ignores nesterov).
  See :func:`jaxbnb.optim.sgd8bit` for the bnb-exact alias.

  Args:
    momentum: in (0, 1).
    nesterov: use the Nesterov direction above.
    optim_bits: 8 (blockwise 8-bit states) or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`
      saying which leaves keep 32-bit states.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> opt = scale_by_momentum8bit(0.5)
    >>> s = opt.init({"w": jnp.ones((2,))})
    >>> u, s = opt.update({"w": jnp.ones((2,))}, s)
    >>> u, s = opt.update({"w": jnp.ones((2,))}, s)
    >>> u["w"].tolist()
    [1.5, 1.5]
  """
  fn = "scale_by_momentum8bit"
  hyper_checks.check_momentum(fn, momentum)
  return _block(fn, Hyper("momentum", beta1=momentum, nesterov=nesterov),
                optim_bits, min_8bit_size, override, paged)


def scale_by_rmsprop8bit(alpha: ArrayLike = 0.99, eps: ArrayLike = 1e-8, *,
                         optim_bits: int = 8, min_8bit_size: int = 4096,
                         override: Override = None, paged: bool = False
                         ) -> optax.GradientTransformation:
  """RMSprop's direction `g / (sqrt(v) + eps)`, `v = alpha v + (1-alpha) g²`.

  See :func:`jaxbnb.optim.rmsprop8bit` for the bnb-exact alias.

  Args:
    alpha: squared-gradient decay, in (0, 1).
    eps: epsilon, >= 0.
    optim_bits: 8 (blockwise 8-bit states) or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`
      saying which leaves keep 32-bit states.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> opt = scale_by_rmsprop8bit(alpha=0.75, eps=0.0)
    >>> s = opt.init({"w": jnp.ones((2,))})
    >>> u, s = opt.update({"w": jnp.ones((2,))}, s)
    >>> u["w"].tolist()
    [2.0, 2.0]
  """
  fn = "scale_by_rmsprop8bit"
  hyper_checks.check_rmsprop(fn, alpha, eps)
  return _block(fn, Hyper("rmsprop", beta1=alpha, beta2=0.0, eps=eps),
                optim_bits, min_8bit_size, override, paged)


def scale_by_adagrad8bit(eps: ArrayLike = 1e-10, *, optim_bits: int = 8,
                         min_8bit_size: int = 4096, override: Override = None,
                         paged: bool = False) -> optax.GradientTransformation:
  """Adagrad's direction `g / (sqrt(sum g²) + eps)`.

  See :func:`jaxbnb.optim.adagrad8bit` for the bnb-exact alias.

  Args:
    eps: epsilon, >= 0.
    optim_bits: 8 (blockwise 8-bit states) or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`
      saying which leaves keep 32-bit states.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> opt = scale_by_adagrad8bit()
    >>> s = opt.init({"w": jnp.ones((2,))})
    >>> u, s = opt.update({"w": jnp.full((2,), 3.0)}, s)
    >>> u["w"].tolist()
    [1.0, 1.0]
  """
  fn = "scale_by_adagrad8bit"
  hyper_checks.check_nonneg(fn, "eps", eps)
  return _block(fn, Hyper("adagrad", beta1=0.0, beta2=0.0, eps=eps),
                optim_bits, min_8bit_size, override, paged)


# ------------------------------------------------- shared alias builders


def bnb_alias(fn, hyper, learning_rate, optim_bits, min_8bit_size, override,
              paged):
  """An alias's transformation: its checks, then `_transform`'s full step.

  Args:
    fn: the alias's name, for error messages.
    hyper: the rule and its hyper-parameters.
    learning_rate: a float >= 0 or an optax schedule.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`.
    paged: keep the states in host memory between steps.

  Returns:
    The `optax.GradientTransformation` (see :func:`adam8bit`).

  Examples:
    >>> tx = bnb_alias("mine", Hyper("adam"), 1e-3, 8, 4096, None, False)
    >>> type(tx).__name__
    'GradientTransformation'
  """
  hyper_checks.check_nonneg(fn, "learning_rate", learning_rate)
  hyper_checks.check_nonneg(fn, "weight_decay", hyper.weight_decay)
  return _transform(fn, hyper, learning_rate, optim_bits=optim_bits,
                    min_8bit_size=min_8bit_size, override=override,
                    paged=paged, direction=False)


def _adam(fn, learning_rate, b1, b2, eps, weight_decay, optim_bits,
          min_8bit_size, override, paged):
  hyper_checks.check_beta(fn, "b1", b1)
  hyper_checks.check_beta(fn, "b2", b2)
  hyper_checks.check_nonneg(fn, "eps", eps)
  hyper = Hyper("adam", beta1=b1, beta2=b2, eps=eps,
                weight_decay=weight_decay)
  return bnb_alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged)


def _lion(fn, learning_rate, b1, b2, weight_decay, optim_bits, min_8bit_size,
          override, paged):
  hyper_checks.check_beta(fn, "b1", b1)
  hyper_checks.check_beta(fn, "b2", b2)
  hyper = Hyper("lion", beta1=b1, beta2=b2, weight_decay=weight_decay)
  return bnb_alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged)


def _sgd(fn, learning_rate, momentum, nesterov, weight_decay, optim_bits,
         min_8bit_size, override, paged):
  hyper_checks.check_momentum(fn, momentum)
  hyper_checks.check_bool(fn, "nesterov", nesterov)
  hyper = Hyper("momentum", beta1=momentum, beta2=0.0, nesterov=nesterov,
                weight_decay=weight_decay)
  return bnb_alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged)


def _rmsprop(fn, learning_rate, alpha, eps, weight_decay, optim_bits,
             min_8bit_size, override, paged):
  hyper_checks.check_rmsprop(fn, alpha, eps)
  hyper = Hyper("rmsprop", beta1=alpha, beta2=0.0, eps=eps,
                weight_decay=weight_decay)
  return bnb_alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged)


def _adagrad(fn, learning_rate, eps, weight_decay, optim_bits, min_8bit_size,
             override, paged):
  hyper_checks.check_nonneg(fn, "eps", eps)
  hyper = Hyper("adagrad", beta1=0.0, beta2=0.0, eps=eps,
                weight_decay=weight_decay)
  return bnb_alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged)


def _ademamix(fn, learning_rate, b1, b2, b3, alpha, t_alpha, t_beta3, eps,
              weight_decay, optim_bits, min_8bit_size, override, paged):
  t_alpha, t_beta3 = hyper_checks.check_ademamix(
      fn, b1, b2, b3, alpha, t_alpha, t_beta3, eps)
  hyper = Hyper("ademamix", beta1=b1, beta2=b2, beta3=b3, alpha=alpha,
                t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                weight_decay=weight_decay)
  return bnb_alias(fn, hyper, learning_rate, optim_bits, min_8bit_size,
                override, paged)


# ------------------------------------------------------------ 8-bit aliases


def adam8bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
             b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
             eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 0.0, *,
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
    optim_bits: 8 or 32 (32: bnb's 32-bit rules for every leaf).
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`;
      True keeps that leaf's states in 32 bits (bnb's GlobalOptimManager).
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params` and
    returns `new_params - params` (float32).

  References:
    Dettmers et al., 8-bit Optimizers via Block-wise Quantization, 2022.

  Examples:
    >>> import optax
    >>> params = {"w": jnp.ones((64, 64))}
    >>> opt = adam8bit(learning_rate=1e-2)
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((64, 64))}, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> new["w"].shape, new["w"].dtype, round(float(new["w"][0, 0]), 4)
    ((64, 64), dtype('float32'), 0.99)
  """
  return _adam("adam8bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def adamw8bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
              b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
              eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 1e-2, *,
              optim_bits: int = 8, min_8bit_size: int = 4096,
              override: Override = None, paged: bool = False
              ) -> optax.GradientTransformation:
  """bitsandbytes' `AdamW8bit`: :func:`adam8bit` with `weight_decay=1e-2`.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 8 or 32 (32: bnb's 32-bit rules for every leaf).
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`;
      True keeps that leaf's states in 32 bits.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params` and
    returns `new_params - params` (float32).

  Examples:
    >>> opt = adamw8bit()
    >>> params = {"w": jnp.ones((4,))}
    >>> u, _ = opt.update({"w": jnp.zeros((4,))}, opt.init(params), params)
    >>> round(float(u["w"][0]), 7)  # only the decay: 1 * (1 - 1e-3 * 1e-2) - 1
    -1e-05
  """
  return _adam("adamw8bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def lion8bit(learning_rate: optax.ScalarOrSchedule = 1e-4,
             b1: ArrayLike = 0.9, b2: ArrayLike = 0.99,
             weight_decay: ArrayLike = 0.0, *, optim_bits: int = 8,
             min_8bit_size: int = 4096, override: Override = None,
             paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `Lion8bit`.

  `p = T(p (1 - lr wd)); p = T(p - T(lr sign(b1 m + (1-b1) g)));
  m = b2 m + (1-b2) g` (decoupled decay first, as bnb's kernel).

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: mixes the state and the gradient inside the sign, in [0, 1).
    b2: decay of the state, in [0, 1).
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`;
      True keeps that leaf's states in 32 bits.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> params = {"w": jnp.zeros((2,))}
    >>> opt = lion8bit(learning_rate=0.5)
    >>> u, _ = opt.update({"w": jnp.array([1.0, -3.0])}, opt.init(params),
    ...                   params)
    >>> u["w"].tolist()
    [-0.5, 0.5]
  """
  return _lion("lion8bit", learning_rate, b1, b2, weight_decay, optim_bits,
               min_8bit_size, override, paged)


def sgd8bit(learning_rate: optax.ScalarOrSchedule, momentum: ArrayLike,
            nesterov: bool = False, weight_decay: ArrayLike = 0.0, *,
            optim_bits: int = 8, min_8bit_size: int = 4096,
            override: Override = None, paged: bool = False
            ) -> optax.GradientTransformation:
  """bitsandbytes' `SGD8bit` (momentum required, as in bnb).

  `g = g + wd p` (coupled); `m = g` at step 1 else `m = momentum m + g`;
  `p = T(p - lr m)`. With `nesterov=True`: `p = T(p - lr (g + momentum m))`
  (PyTorch's form; bnb accepts the flag but its kernels ignore it).

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    momentum: in (0, 1); bnb rejects 0.
    nesterov: use the Nesterov form above.
    weight_decay: coupled L2 weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`;
      True keeps that leaf's states in 32 bits.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> params = {"w": jnp.ones((2,))}
    >>> opt = sgd8bit(0.1, momentum=0.9)
    >>> u, _ = opt.update({"w": jnp.ones((2,))}, opt.init(params), params)
    >>> [round(v, 6) for v in u["w"].tolist()]
    [-0.1, -0.1]
  """
  return _sgd("sgd8bit", learning_rate, momentum, nesterov, weight_decay,
              optim_bits, min_8bit_size, override, paged)


def rmsprop8bit(learning_rate: optax.ScalarOrSchedule = 1e-2,
                alpha: ArrayLike = 0.99, eps: ArrayLike = 1e-8,
                weight_decay: ArrayLike = 0.0, *, optim_bits: int = 8,
                min_8bit_size: int = 4096, override: Override = None,
                paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `RMSprop8bit` (not centered).

  `v = alpha v + (1-alpha) (g + wd p)²; p = T(p - lr g / (sqrt(v) + eps))`.
  bnb's 8-bit kernel puts the raw gradient in the numerator (the 32-bit
  kernel the decayed one); both are reproduced.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    alpha: squared-gradient decay, in (0, 1).
    eps: epsilon, >= 0.
    weight_decay: coupled L2 weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`;
      True keeps that leaf's states in 32 bits.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> params = {"w": jnp.ones((2,))}
    >>> opt = rmsprop8bit(learning_rate=0.1, alpha=0.75, eps=0.0)
    >>> u, _ = opt.update({"w": jnp.ones((2,))}, opt.init(params), params)
    >>> [round(v, 6) for v in u["w"].tolist()]
    [-0.2, -0.2]
  """
  return _rmsprop("rmsprop8bit", learning_rate, alpha, eps, weight_decay,
                  optim_bits, min_8bit_size, override, paged)


def adagrad8bit(learning_rate: optax.ScalarOrSchedule = 1e-2,
                eps: ArrayLike = 1e-10, weight_decay: ArrayLike = 0.0, *,
                optim_bits: int = 8, min_8bit_size: int = 4096,
                override: Override = None, paged: bool = False
                ) -> optax.GradientTransformation:
  """bitsandbytes' `Adagrad8bit` (no lr decay, zero initial accumulator).

  `v = v + (g + wd p)²; p = T(p - lr g / (sqrt(v) + eps))`.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    eps: epsilon, >= 0.
    weight_decay: coupled L2 weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`;
      True keeps that leaf's states in 32 bits.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> params = {"w": jnp.ones((2,))}
    >>> opt = adagrad8bit(learning_rate=0.1)
    >>> u, _ = opt.update({"w": jnp.full((2,), 2.0)}, opt.init(params),
    ...                   params)
    >>> [round(v, 6) for v in u["w"].tolist()]
    [-0.1, -0.1]
  """
  return _adagrad("adagrad8bit", learning_rate, eps, weight_decay,
                  optim_bits, min_8bit_size, override, paged)


def ademamix8bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
                 b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                 b3: ArrayLike = 0.9999, alpha: ArrayLike = 5.0,
                 t_alpha: int | None = None, t_beta3: int | None = None,
                 eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 1e-2, *,
                 optim_bits: int = 8, min_8bit_size: int = 4096,
                 override: Override = None, paged: bool = False
                 ) -> optax.GradientTransformation:
  """bitsandbytes' `AdEMAMix8bit`.

  `m1 = b1 m1 + (1-b1) g; m2 = b3_t m2 + (1-b3_t) g; nu = b2 nu + (1-b2) g²;
  p = T(p - lr (m1/c1 + alpha_t m2) / (sqrt(nu)/c2 + eps));
  p = T(p (1 - lr wd))`, state1 = [m1; m2] (signed map), state2 = nu.
  `alpha_t`/`b3_t` follow bnb's schedulers when `t_alpha`/`t_beta3` are set.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: fast EMA decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    b3: slow EMA decay, in [0, 1).
    alpha: weight of the slow EMA, >= 0.
    t_alpha: alpha warm-up steps (None: constant alpha).
    t_beta3: b3 warm-up steps (None: constant b3).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: None, a pytree of bools or `callable(path, leaf) -> bool`;
      True keeps that leaf's states in 32 bits.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  References:
    Pagliardini et al., The AdEMAMix Optimizer: Better, Faster, Older, 2024.

  Examples:
    >>> params = {"w": jnp.ones((3,))}
    >>> opt = ademamix8bit(learning_rate=0.1, weight_decay=0.0)
    >>> u, _ = opt.update({"w": jnp.ones((3,))}, opt.init(params), params)
    >>> round(float(u["w"][0]), 5)  # -0.1 * (1 + 5 * 1e-4) / (1 + 1e-8)
    -0.10005
  """
  return _ademamix("ademamix8bit", learning_rate, b1, b2, b3, alpha, t_alpha,
                   t_beta3, eps, weight_decay, optim_bits, min_8bit_size,
                   override, paged)


# ----------------------------------------------------------- 32-bit aliases


def adam32bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
              b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
              eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 0.0, *,
              optim_bits: int = 32, min_8bit_size: int = 4096,
              override: Override = None, paged: bool = False
              ) -> optax.GradientTransformation:
  """bitsandbytes' `Adam32bit`: :func:`adam8bit` with float32 states.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`adam8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = adam32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].shape, state.state1["w"].dtype
    ((64, 64), dtype('float32'))
  """
  return _adam("adam32bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def adamw32bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
               b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
               eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 1e-2, *,
               optim_bits: int = 32, min_8bit_size: int = 4096,
               override: Override = None, paged: bool = False
               ) -> optax.GradientTransformation:
  """bitsandbytes' `AdamW32bit`: :func:`adamw8bit` with float32 states.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`adamw8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = adamw32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state2["w"].shape, state.state2["w"].dtype
    ((64, 64), dtype('float32'))
  """
  return _adam("adamw32bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def lion32bit(learning_rate: optax.ScalarOrSchedule = 1e-4,
              b1: ArrayLike = 0.9, b2: ArrayLike = 0.99,
              weight_decay: ArrayLike = 0.0, *, optim_bits: int = 32,
              min_8bit_size: int = 4096, override: Override = None,
              paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `Lion32bit`: :func:`lion8bit` with float32 states.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: mixes the state and the gradient inside the sign, in [0, 1).
    b2: decay of the state, in [0, 1).
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`lion8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = lion32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].dtype, state.state2["w"]
    (dtype('float32'), None)
  """
  return _lion("lion32bit", learning_rate, b1, b2, weight_decay, optim_bits,
               min_8bit_size, override, paged)


def sgd32bit(learning_rate: optax.ScalarOrSchedule, momentum: ArrayLike,
             nesterov: bool = False, weight_decay: ArrayLike = 0.0, *,
             optim_bits: int = 32, min_8bit_size: int = 4096,
             override: Override = None, paged: bool = False
             ) -> optax.GradientTransformation:
  """bitsandbytes' `SGD32bit`: :func:`sgd8bit` with float32 states.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    momentum: in (0, 1); bnb rejects 0.
    nesterov: use the Nesterov form (see :func:`sgd8bit`).
    weight_decay: coupled L2 weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`sgd8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = sgd32bit(0.1, momentum=0.9).init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].shape, state.state1["w"].dtype
    ((64, 64), dtype('float32'))
  """
  return _sgd("sgd32bit", learning_rate, momentum, nesterov, weight_decay,
              optim_bits, min_8bit_size, override, paged)


def rmsprop32bit(learning_rate: optax.ScalarOrSchedule = 1e-2,
                 alpha: ArrayLike = 0.99, eps: ArrayLike = 1e-8,
                 weight_decay: ArrayLike = 0.0, *, optim_bits: int = 32,
                 min_8bit_size: int = 4096, override: Override = None,
                 paged: bool = False) -> optax.GradientTransformation:
  """bitsandbytes' `RMSprop32bit`: :func:`rmsprop8bit` with float32 states.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    alpha: squared-gradient decay, in (0, 1).
    eps: epsilon, >= 0.
    weight_decay: coupled L2 weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`rmsprop8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = rmsprop32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].shape, state.state1["w"].dtype
    ((64, 64), dtype('float32'))
  """
  return _rmsprop("rmsprop32bit", learning_rate, alpha, eps, weight_decay,
                  optim_bits, min_8bit_size, override, paged)


def adagrad32bit(learning_rate: optax.ScalarOrSchedule = 1e-2,
                 eps: ArrayLike = 1e-10, weight_decay: ArrayLike = 0.0, *,
                 optim_bits: int = 32, min_8bit_size: int = 4096,
                 override: Override = None, paged: bool = False
                 ) -> optax.GradientTransformation:
  """bitsandbytes' `Adagrad32bit`: :func:`adagrad8bit` with float32 states.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    eps: epsilon, >= 0.
    weight_decay: coupled L2 weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`adagrad8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = adagrad32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].shape, state.state1["w"].dtype
    ((64, 64), dtype('float32'))
  """
  return _adagrad("adagrad32bit", learning_rate, eps, weight_decay,
                  optim_bits, min_8bit_size, override, paged)


def ademamix32bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
                  b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                  b3: ArrayLike = 0.9999, alpha: ArrayLike = 5.0,
                  t_alpha: int | None = None, t_beta3: int | None = None,
                  eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 1e-2, *,
                  optim_bits: int = 32, min_8bit_size: int = 4096,
                  override: Override = None, paged: bool = False
                  ) -> optax.GradientTransformation:
  """bitsandbytes' `AdEMAMix32bit`: :func:`ademamix8bit`, float32 states.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: fast EMA decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    b3: slow EMA decay, in [0, 1).
    alpha: weight of the slow EMA, >= 0.
    t_alpha: alpha warm-up steps (None: constant alpha).
    t_beta3: b3 warm-up steps (None: constant b3).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`ademamix8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: keep the states in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = ademamix32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].shape, state.state1["w"].dtype  # [m1; m2]
    ((2, 64, 64), dtype('float32'))
  """
  return _ademamix("ademamix32bit", learning_rate, b1, b2, b3, alpha,
                   t_alpha, t_beta3, eps, weight_decay, optim_bits,
                   min_8bit_size, override, paged)


# ------------------------------------------------------------ paged aliases


def paged_adam8bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
                   b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                   eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 0.0, *,
                   optim_bits: int = 8, min_8bit_size: int = 4096,
                   override: Override = None, paged: bool = True
                   ) -> optax.GradientTransformation:
  """bitsandbytes' `PagedAdam8bit`: :func:`adam8bit`, state in host memory.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: see :func:`adam8bit`.
    paged: True: the states live in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = paged_adam8bit().init({"w": jnp.zeros((64, 64))})
    >>> codes = state.state1["w"].codes
    >>> codes.dtype, codes.sharding.memory_kind
    (dtype('uint8'), 'pinned_host')
  """
  return _adam("paged_adam8bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def paged_adamw8bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
                    b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                    eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 1e-2, *,
                    optim_bits: int = 8, min_8bit_size: int = 4096,
                    override: Override = None, paged: bool = True
                    ) -> optax.GradientTransformation:
  """bitsandbytes' `PagedAdamW8bit`: :func:`adamw8bit`, host-memory state.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: see :func:`adam8bit`.
    paged: True: the states live in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = paged_adamw8bit().init({"w": jnp.zeros((64, 64))})
    >>> codes = state.state2["w"].codes
    >>> codes.dtype, codes.sharding.memory_kind
    (dtype('uint8'), 'pinned_host')
  """
  return _adam("paged_adamw8bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def paged_lion8bit(learning_rate: optax.ScalarOrSchedule = 1e-4,
                   b1: ArrayLike = 0.9, b2: ArrayLike = 0.99,
                   weight_decay: ArrayLike = 0.0, *, optim_bits: int = 8,
                   min_8bit_size: int = 4096, override: Override = None,
                   paged: bool = True) -> optax.GradientTransformation:
  """bitsandbytes' `PagedLion8bit`: :func:`lion8bit`, state in host memory.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: mixes the state and the gradient inside the sign, in [0, 1).
    b2: decay of the state, in [0, 1).
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: see :func:`adam8bit`.
    paged: True: the states live in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = paged_lion8bit().init({"w": jnp.zeros((64, 64))})
    >>> codes = state.state1["w"].codes
    >>> codes.dtype, codes.sharding.memory_kind
    (dtype('uint8'), 'pinned_host')
  """
  return _lion("paged_lion8bit", learning_rate, b1, b2, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def paged_ademamix8bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
                       b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                       b3: ArrayLike = 0.9999, alpha: ArrayLike = 5.0,
                       t_alpha: int | None = None,
                       t_beta3: int | None = None, eps: ArrayLike = 1e-8,
                       weight_decay: ArrayLike = 1e-2, *, optim_bits: int = 8,
                       min_8bit_size: int = 4096, override: Override = None,
                       paged: bool = True) -> optax.GradientTransformation:
  """bitsandbytes' `PagedAdEMAMix8bit`: :func:`ademamix8bit`, host state.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: fast EMA decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    b3: slow EMA decay, in [0, 1).
    alpha: weight of the slow EMA, >= 0.
    t_alpha: alpha warm-up steps (None: constant alpha).
    t_beta3: b3 warm-up steps (None: constant b3).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 8 or 32.
    min_8bit_size: leaves with fewer elements keep float32 states.
    override: see :func:`adam8bit`.
    paged: True: the states live in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = paged_ademamix8bit().init({"w": jnp.zeros((64, 64))})
    >>> codes = state.state1["w"].codes
    >>> codes.shape, codes.sharding.memory_kind
    ((2, 64, 64), 'pinned_host')
  """
  return _ademamix("paged_ademamix8bit", learning_rate, b1, b2, b3, alpha,
                   t_alpha, t_beta3, eps, weight_decay, optim_bits,
                   min_8bit_size, override, paged)


def paged_adam32bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
                    b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                    eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 0.0, *,
                    optim_bits: int = 32, min_8bit_size: int = 4096,
                    override: Override = None, paged: bool = True
                    ) -> optax.GradientTransformation:
  """bitsandbytes' `PagedAdam32bit`: :func:`adam32bit`, host-memory state.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`paged_adam8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: True: the states live in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = paged_adam32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].dtype, state.state1["w"].sharding.memory_kind
    (dtype('float32'), 'pinned_host')
  """
  return _adam("paged_adam32bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def paged_adamw32bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
                     b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                     eps: ArrayLike = 1e-8, weight_decay: ArrayLike = 1e-2,
                     *, optim_bits: int = 32, min_8bit_size: int = 4096,
                     override: Override = None, paged: bool = True
                     ) -> optax.GradientTransformation:
  """bitsandbytes' `PagedAdamW32bit`: :func:`adamw32bit`, host state.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`paged_adamw8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: True: the states live in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = paged_adamw32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state2["w"].dtype, state.state2["w"].sharding.memory_kind
    (dtype('float32'), 'pinned_host')
  """
  return _adam("paged_adamw32bit", learning_rate, b1, b2, eps, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def paged_lion32bit(learning_rate: optax.ScalarOrSchedule = 1e-4,
                    b1: ArrayLike = 0.9, b2: ArrayLike = 0.99,
                    weight_decay: ArrayLike = 0.0, *, optim_bits: int = 32,
                    min_8bit_size: int = 4096, override: Override = None,
                    paged: bool = True) -> optax.GradientTransformation:
  """bitsandbytes' `PagedLion32bit`: :func:`lion32bit`, host-memory state.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: mixes the state and the gradient inside the sign, in [0, 1).
    b2: decay of the state, in [0, 1).
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`paged_lion8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: True: the states live in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = paged_lion32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].dtype, state.state1["w"].sharding.memory_kind
    (dtype('float32'), 'pinned_host')
  """
  return _lion("paged_lion32bit", learning_rate, b1, b2, weight_decay,
               optim_bits, min_8bit_size, override, paged)


def paged_ademamix32bit(learning_rate: optax.ScalarOrSchedule = 1e-3,
                        b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
                        b3: ArrayLike = 0.9999, alpha: ArrayLike = 5.0,
                        t_alpha: int | None = None,
                        t_beta3: int | None = None, eps: ArrayLike = 1e-8,
                        weight_decay: ArrayLike = 1e-2, *,
                        optim_bits: int = 32, min_8bit_size: int = 4096,
                        override: Override = None, paged: bool = True
                        ) -> optax.GradientTransformation:
  """bitsandbytes' `PagedAdEMAMix32bit`: :func:`ademamix32bit`, host state.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: fast EMA decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    b3: slow EMA decay, in [0, 1).
    alpha: weight of the slow EMA, >= 0.
    t_alpha: alpha warm-up steps (None: constant alpha).
    t_beta3: b3 warm-up steps (None: constant b3).
    eps: epsilon, >= 0.
    weight_decay: decoupled weight decay, >= 0.
    optim_bits: 32 (8 gives :func:`paged_ademamix8bit`).
    min_8bit_size: with `optim_bits=8`, smaller leaves keep float32 states.
    override: see :func:`adam8bit`.
    paged: True: the states live in host memory between steps.

  Returns:
    An `optax.GradientTransformation` whose `update` needs `params`.

  Examples:
    >>> state = paged_ademamix32bit().init({"w": jnp.zeros((64, 64))})
    >>> state.state1["w"].shape, state.state1["w"].sharding.memory_kind
    ((2, 64, 64), 'pinned_host')
  """
  return _ademamix("paged_ademamix32bit", learning_rate, b1, b2, b3, alpha,
                   t_alpha, t_beta3, eps, weight_decay, optim_bits,
                   min_8bit_size, override, paged)
