"""One trace and one lowering per distinct kernel launch in a program.

A decode step calls the same kernel, on weights of the same shapes, once
per layer. Each `pallas_call` / `plgpu.kernel` call is traced and lowered
on its own (for a Mosaic GPU kernel: its PTX built, its module serialized
into the program, 0.2-1 s a call), so a 32-layer model paid that 32 times
per program. `lowered_once` routes such calls through one `jax.jit` per
distinct launch: its jaxpr is traced once and JAX lowers each distinct
jaxpr once per program, every layer calling the same function.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import jax
import numpy as np

__all__ = ["ENABLED", "lowered_once", "cache_size", "clear_cache"]

# False: every call traced and lowered on its own, as before (a switch for
# timing the difference, `docs/bench/decode_fusions.py`'s LOWER_ONCE=0).
ENABLED = True

_SIMPLE = (bool, int, float, str, tuple, frozenset, type(None))
_JITTED: dict[Any, tuple[Callable, dict]] = {}
_SCAN: dict[str, Any] = {"modules": -1, "names": ()}


def _constant_names() -> tuple:
  """(module name, module, its upper-case names of simple hashable values)
  for every imported `pallas_kernels` module; rescanned when a module is
  imported."""
  if len(sys.modules) != _SCAN["modules"]:
    names = []
    for name, mod in sorted(list(sys.modules.items()), key=lambda t: t[0]):
      if mod is None or not name.startswith("pallas_kernels."):
        continue
      keep = []
      for k, v in vars(mod).items():
        if k.isupper() and isinstance(v, _SIMPLE):
          try:
            hash(v)
          except TypeError:
            continue
          keep.append(k)
      names.append((name, mod, tuple(sorted(keep))))
    _SCAN.update(modules=len(sys.modules), names=tuple(names))
  return _SCAN["names"]


def _constants() -> tuple:
  """The `pallas_kernels` modules' upper-case constants of simple types:
  the builders read some of them (decodes, step rows), and tests and
  benchmarks set them, so they key the cache."""
  return tuple((name, k, getattr(mod, k, None))
               for name, mod, keys in _constant_names() for k in keys)


def _split(leaves) -> tuple[tuple, list, tuple]:
  """(which leaves are arrays, the arrays, the other leaves)."""
  mask = tuple(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)
  return (mask, [leaf for leaf, m in zip(leaves, mask) if m],
          tuple(leaf for leaf, m in zip(leaves, mask) if not m))


def _merge(mask, arrays, statics) -> list:
  """`_split`'s inverse: the leaves in their order."""
  it, st = iter(arrays), iter(statics)
  return [next(it) if m else next(st) for m in mask]


def lowered_once(fn: Callable) -> Callable:
  """Decorator: calls of `fn` with equal non-array arguments, equal array
  types (shape, dtype, varying axes) and equal module constants share one
  jitted function, so a program holding many such calls traces and lowers
  `fn` once.

  The array leaves of the arguments become the jitted function's inputs;
  every other leaf is static and must be hashable. Array leaves of the
  result come back through the jitted function; the others (Python
  values, e.g. a row plan) are returned as the one trace made them.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> @lowered_once
    ... def scaled(x, *, by):
    ...   return x * by, by + 1
    >>> f = jax.jit(lambda a, b: (scaled(a, by=2)[0] + scaled(b, by=2)[0]))
    >>> f(jnp.ones(3), jnp.ones(3)).tolist()
    [4.0, 4.0, 4.0]
    >>> scaled(jnp.ones(2), by=3)[1]
    4
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if not ENABLED:
      return fn(*args, **kwargs)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    mask, arrays, statics = _split(leaves)
    types = tuple(jax.typeof(a) for a in arrays)
    head = (fn.__module__, fn.__qualname__, treedef, mask, statics, types)
    hit = _JITTED.get((head, _constants()))
    miss = hit is None
    if miss:
      meta: dict = {}

      def inner(*arrays):
        a, kw = jax.tree.unflatten(treedef, _merge(mask, arrays, statics))
        out_leaves, out_tree = jax.tree.flatten(fn(*a, **kw))
        out_mask, out_arrays, out_statics = _split(out_leaves)
        meta["out"] = (out_tree, out_mask, out_statics)
        return out_arrays

      hit = (jax.jit(inner), meta)
    jitted, meta = hit
    out_arrays = jitted(*arrays)
    if miss:  # keyed by the constants after the trace: it may import
      _JITTED[(head, _constants())] = hit  # modules with constants of their own
    out_tree, out_mask, out_statics = meta["out"]
    return jax.tree.unflatten(out_tree,
                              _merge(out_mask, out_arrays, out_statics))

  return wrapper


def cache_size() -> int:
  """How many distinct launches `lowered_once` holds a function for."""
  return len(_JITTED)


def clear_cache() -> None:
  """Drops every function `lowered_once` made (their compiled code too)."""
  _JITTED.clear()
