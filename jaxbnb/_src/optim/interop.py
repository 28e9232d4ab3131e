"""Optimizer state in bitsandbytes' layout: export and import.

bitsandbytes keeps, per parameter, `step` (an int) and

| key | 8-bit state | 32-bit state |
| --- | --- | --- |
| `state1` | uint8 codes, `p.shape` (AdEMAMix: `(2, *p.shape)`) | float32, same shape |
| `state2` | uint8 codes, `p.shape` (2-state optimizers only) | float32 |
| `absmax1` | float32 `[ceil(n/256)]` (AdEMAMix: `[2, blocks]`) | - |
| `absmax2` | float32 `[ceil(n/256)]` | - |
| `qmap1` | the signed dynamic map, float32 `[256]` | - |
| `qmap2` | the unsigned dynamic map (2-state only) | - |

which is exactly what jaxbnb's `Optimizer8bitState` holds: a
`Quantized8bit` per 8-bit state (codes, absmax, signed -> qmap1 / unsigned
-> qmap2), a float32 array per 32-bit state, and one global `count` (bnb's
per-parameter `step`; all parameters step together).

Two layouts are produced and accepted:

* `to_bnb_state_dict`: `{leaf_path: {"state1", ..., "step"}}` keyed by
  `jax.tree_util.keystr` of each parameter's path.
* `to_torch_state_dict`: what `bnb.optim.Optimizer8bit.state_dict()`
  returns, `{"state": {i: {"step": k, "__bnb_optimizer_quant_state__":
  {...}}}, "param_groups": [{..., "params": [0, 1, ...]}]}`. Parameter index
  `i` is the position of the parameter among the optimized ones in
  `jax.tree.leaves(params)` order, so the torch parameters must be given to
  the bnb optimizer in that order (for a flax / dict tree: sorted by key
  path).

Only the parameters the optimizer holds state for are written: under
`optax.masked` / `optax.multi_transform` the masked-out ones are left out,
as a torch user leaves frozen parameters out of a bnb optimizer. Boxes are
looked through: `nnx.state(model, nnx.Param)`, `nnx.to_pure_dict` of it and
linen's `nn.Partitioned` parameters give the same paths, and the state of
an `nnx.Optimizer` (`optimizer.opt_state`, its arrays boxed in
`OptVariable` / `OptArray`) is read and, on import, rebuilt with its boxes.

The arrays are numpy arrays (`torch.from_numpy` takes them as they are);
imports take numpy arrays or anything `np.asarray` accepts (CPU torch
tensors included). A round trip is bit-identical.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np

from jaxbnb._src.optim import state as optim_state
from jaxbnb._src.quant.state import to_numpy

__all__ = ["QUANT_STATE_KEY", "from_bnb_state_dict", "to_bnb_state_dict",
           "to_torch_state_dict"]

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
_TENSOR_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2",
                "unorm_vec")


def _find(opt_state):
  """The (only) `Optimizer8bitState` inside `opt_state` (e.g. a chain)."""
  cls = optim_state.Optimizer8bitState
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
  if len(found) != 1:
    raise ValueError(
        "opt_state: expected exactly one jaxbnb Optimizer8bitState (the "
        "state of a jaxbnb.optim optimizer, possibly inside optax.chain), "
        f"found {len(found)} in {type(opt_state).__name__}")
  return found[0]


def _replace(opt_state, new):
  cls = optim_state.Optimizer8bitState
  return jax.tree.map(lambda x: new if isinstance(x, cls) else x, opt_state,
                      is_leaf=lambda x: isinstance(x, cls))


def _is_entry(x) -> bool:
  """One parameter's entry of a state tree: 8-bit, boxed, or None."""
  return (x is None or isinstance(x, optim_state.Quantized8bit)
          or optim_state.is_box(x))


def _keyed(tree, is_leaf) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), x) for path, x in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def _param_paths(params) -> list[str]:
  """The path of every parameter leaf (a box ends the path)."""
  return [k for k, _ in _keyed(params, optim_state.is_box)]


def _held(params, st):
  """The parameters `st` holds state for, and their entries.

  Returns:
    `(paths, entries1, entries2)`: the paths in `jax.tree.leaves(params)`
    order (masked-out parameters left out) and `{path: entry}` of `state1`
    and `state2`.
  """
  e1 = dict(_keyed(st.state1, _is_entry))
  e2 = dict(_keyed(st.state2, _is_entry))
  all_paths = _param_paths(params)
  held = {k for k, v in e1.items() if v is not None}
  known = set(all_paths)
  unknown = [k for k in e1 if k in held and k not in known]
  if unknown:
    more = "..." if len(all_paths) > 5 else ""
    raise ValueError(
        "params: the optimizer state holds state for "
        f"{', '.join(unknown[:5])}, which are not leaves of params (its "
        f"leaves: {', '.join(all_paths[:5])}{more}); pass the parameter "
        "tree the optimizer was initialized with")
  return [k for k in all_paths if k in held], e1, e2


def _leaf(x):
  """The array inside a (maybe boxed) leaf."""
  return jax.tree.leaves(x)[0]


def _export_leaf(s1, s2, step: int, unorm_vec: bool) -> dict:
  out = {}
  for i, s in ((1, s1), (2, s2)):
    if s is None:
      continue
    if isinstance(s, optim_state.Quantized8bit):
      codes, absmax = jax.tree.leaves(s)  # unboxed under nnx.Optimizer
      out[f"state{i}"] = to_numpy(codes)
      out[f"absmax{i}"] = to_numpy(absmax)
      out[f"qmap{i}"] = np.array(s.qmap, np.float32)
    else:
      out[f"state{i}"] = to_numpy(_leaf(s))
  if unorm_vec:
    out["unorm_vec"] = np.zeros((1,), np.float32)
  out["step"] = step
  return out


def to_bnb_state_dict(opt_state, params, unorm_vec: bool = False
                      ) -> dict[str, dict[str, Any]]:
  """Exports a jaxbnb optimizer state in bitsandbytes' per-parameter layout.

  Args:
    opt_state: the state of a `jaxbnb.optim` optimizer (alone or inside an
      `optax.chain`, `optax.masked`, `optax.multi_transform` or another
      wrapper; an `nnx.Optimizer`'s `opt_state`).
    params: the parameter tree the state belongs to (for the leaf paths),
      boxed or not (`nnx.state(model, nnx.Param)` or its pure dict).
    unorm_vec: also write bnb's `unorm_vec` (a float32 `[1]` scratch
      tensor, zeros: bnb refills it before each step) for every parameter.
      bnb's LAMB and LARS (`max_unorm > 0`) create it and their 32-bit
      step reads it, so a state loaded into them needs it.

  Returns:
    `{keystr(path): {"state1", "state2", "absmax1", "absmax2", "qmap1",
    "qmap2", "step"}}` with the keys bnb has for that parameter (see the
    module docstring), numpy arrays and an int step, for every parameter
    the optimizer holds state for (masked-out parameters are left out).

  Raises:
    ValueError: `opt_state` holds no jaxbnb state or several, or state for
      a path that `params` does not have.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import optim
    >>> params = {"w": jnp.zeros((64, 80)), "b": jnp.zeros(8)}
    >>> sd = to_bnb_state_dict(optim.adam8bit().init(params), params)
    >>> sorted(sd["['w']"]), sd["['w']"]["absmax1"].shape
    (['absmax1', 'absmax2', 'qmap1', 'qmap2', 'state1', 'state2', 'step'], (20,))
    >>> sorted(sd["['b']"]), sd["['b']"]["state1"].dtype
    (['state1', 'state2', 'step'], dtype('float32'))
  """
  st = _find(opt_state)
  step = int(to_numpy(_leaf(st.count)))
  paths, e1, e2 = _held(params, st)
  return {path: _export_leaf(e1[path], e2.get(path), step, unorm_vec)
          for path in paths}


def to_torch_state_dict(opt_state, params,
                        param_group: Mapping[str, Any] | None = None,
                        wrap: bool = True, unorm_vec: bool = False) -> dict:
  """Exports in the layout of `bnb.optim.Optimizer8bit.state_dict()`.

  Args:
    opt_state: the state of a `jaxbnb.optim` optimizer (see
      :func:`to_bnb_state_dict`).
    params: its parameter tree. Parameter `i` is the `i`-th leaf of
      `jax.tree.leaves(params)` that the optimizer holds state for (all of
      them, unless `optax.masked` / `optax.multi_transform` leave some out).
    param_group: hyper-parameters for the single param group (bnb's names:
      `lr`, `betas`, `eps`, `weight_decay`, ...). torch's `load_state_dict`
      replaces the optimizer's group settings with these, so pass the full
      set (e.g. `bnb_opt.state_dict()["param_groups"][0]`) when loading
      into a live bnb optimizer. `params` in it is replaced.
    wrap: put the tensors under `"__bnb_optimizer_quant_state__"` as bnb
      >= 0.49.2 does (its `load_state_dict` accepts both forms).
    unorm_vec: write bnb's `unorm_vec` for LAMB / LARS (see
      :func:`to_bnb_state_dict`).

  Returns:
    `{"state": {i: {...}}, "param_groups": [{..., "params": [0..n-1]}]}`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import optim
    >>> params = [jnp.zeros((64, 80))]
    >>> sd = to_torch_state_dict(optim.adam8bit().init(params), params,
    ...                          {"lr": 1e-3})
    >>> sd["param_groups"], sorted(sd["state"][0])
    ([{'lr': 0.001, 'params': [0]}], ['__bnb_optimizer_quant_state__', 'step'])
  """
  per_leaf = list(to_bnb_state_dict(opt_state, params, unorm_vec).values())
  state = {}
  for i, leaf in enumerate(per_leaf):
    entry = {"step": leaf["step"]}
    tensors = {k: leaf[k] for k in _TENSOR_KEYS if k in leaf}
    if wrap:
      entry[QUANT_STATE_KEY] = tensors
    else:
      entry.update(tensors)
    state[i] = entry
  group = dict(param_group or {})
  group["params"] = list(range(len(per_leaf)))
  return {"state": state, "param_groups": [group]}


def _blocksize_hint(given, numel: int) -> str:
  """Which bnb blocksize would give `given` absmax blocks, as a hint."""
  if given < 1:
    return ""
  for bs in (64, 128, 512, 1024, 2048, 4096):
    if math.ceil(numel / bs) == given:
      return (f" (that is the block count of blocksize {bs}; jaxbnb and bnb "
              f">= 0.44 use {optim_state.BLOCKSIZE}, bnb < 0.44 used 2048)")
  return ""


def _check(where, value, shape, dtype, numel=None):
  arr = np.asarray(value)
  if arr.dtype != dtype or tuple(arr.shape) != tuple(shape):
    hint = ""
    if numel is not None and arr.ndim >= 1 and arr.shape[-1] != shape[-1]:
      hint = _blocksize_hint(arr.shape[-1], numel)
    raise ValueError(
        f"{where}: expected {np.dtype(dtype).name} of shape {tuple(shape)}, "
        f"got {arr.dtype.name} of shape {tuple(arr.shape)}{hint}")
  return arr


def _import_state(where, entry, i, template):
  """One state (1 or 2) from a bnb entry, shaped like `template`.

  `template` is the entry the optimizer holds (a `Quantized8bit`, an
  array, None), maybe boxed as `nnx.Optimizer` boxes it; the result has its
  structure (boxes included) and its arrays' shardings.
  """
  key = f"state{i}"
  if template is None:
    if key in entry and entry[key] is not None:
      raise ValueError(f"{where}.{key}: this optimizer has no state {i} "
                       "(a 1-state optimizer), but the state dict has one")
    return None
  if key not in entry:
    raise ValueError(f"{where}: missing {key!r} (keys: {sorted(entry)})")
  arrays, treedef = jax.tree.flatten(template)
  if isinstance(template, optim_state.Quantized8bit):
    t_codes, t_absmax = arrays
    codes = _check(f"{where}.{key}", entry[key], t_codes.shape, np.uint8)
    amax_key, qmap_key = f"absmax{i}", f"qmap{i}"
    if amax_key not in entry:
      raise ValueError(f"{where}: missing {amax_key!r} for the 8-bit {key}")
    lead = t_absmax.ndim - 1
    absmax = _check(f"{where}.{amax_key}", entry[amax_key], t_absmax.shape,
                    np.float32, numel=math.prod(t_codes.shape[lead:]))
    if qmap_key in entry and entry[qmap_key] is not None:
      qmap = _check(f"{where}.{qmap_key}", entry[qmap_key], (256,),
                    np.float32)
      if not np.array_equal(qmap.view(np.uint32),
                            np.asarray(template.qmap).view(np.uint32)):
        kind = "signed" if template.signed else "unsigned"
        raise ValueError(
            f"{where}.{qmap_key}: not bnb's {kind} dynamic map (max "
            f"difference {np.max(np.abs(qmap - template.qmap)):.3g}); "
            "jaxbnb's 8-bit states use bnb's create_dynamic_map tables")
    return treedef.unflatten([jax.device_put(codes, t_codes.sharding),
                              jax.device_put(absmax, t_absmax.sharding)])
  (t_value,) = arrays
  value = np.asarray(entry[key])
  if value.dtype == np.uint8:
    raise ValueError(
        f"{where}.{key}: the state dict holds an 8-bit (uint8) state but "
        "this optimizer keeps a 32-bit state for the parameter (check "
        "optim_bits, min_8bit_size and the override)")
  value = _check(f"{where}.{key}", value, t_value.shape, np.float32)
  return treedef.unflatten([jax.device_put(value, t_value.sharding)])


def _rebuild(tree, new: dict):
  """`tree` with the entries at the paths of `new` replaced."""
  keyed, treedef = jax.tree_util.tree_flatten_with_path(tree,
                                                        is_leaf=_is_entry)
  return treedef.unflatten([new.get(jax.tree_util.keystr(path), x)
                            for path, x in keyed])


def from_bnb_state_dict(state_dict: Mapping, params, opt_state):
  """Imports a bitsandbytes optimizer state into a jaxbnb optimizer state.

  Args:
    state_dict: either layout of `to_bnb_state_dict` / `to_torch_state_dict`
      (keyed by leaf path, or a torch `{"state", "param_groups"}` dict, its
      tensors wrapped under `"__bnb_optimizer_quant_state__"` or not).
      Values are numpy arrays or CPU torch tensors.
    params: the parameter tree (defines the order and the leaf paths),
      boxed or not (`nnx.state(model, nnx.Param)` or its pure dict).
    opt_state: a template, e.g. `optimizer.init(params)` of the jaxbnb
      optimizer that continues the run, or an `nnx.Optimizer`'s
      `opt_state`; it fixes which leaves are 8-bit, which are masked out
      (`optax.masked`, `optax.multi_transform`: they keep the template's
      entry) and where each array lives (paged state stays in host memory).
      A torch state dict's `param_groups` list either the optimized
      parameters or every leaf of `params` (frozen ones without state).

  Returns:
    `opt_state` with its `Optimizer8bitState` replaced by the imported one,
    boxed as the template is (assign it to `optimizer.opt_state`).

  Raises:
    ValueError: a parameter is missing, a tensor has the wrong shape or
      dtype (including another blocksize's absmax), a qmap is not bnb's map,
      8-bit vs 32-bit disagrees, the parameters' steps differ, or the
      template holds state for a path `params` does not have.
    TypeError: `state_dict` is not a mapping.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import optim
    >>> params = {"w": jnp.ones((64, 80))}
    >>> opt = optim.adam8bit()
    >>> state = opt.init(params)
    >>> sd = to_bnb_state_dict(state, params)
    >>> back = from_bnb_state_dict(sd, params, state)
    >>> int(_find(back).count)
    0
  """
  template = _find(opt_state)
  paths, e1, e2 = _held(params, template)
  if not isinstance(state_dict, Mapping):
    raise TypeError("state_dict: expected a mapping, got "
                    f"{type(state_dict).__name__}")
  if "state" in state_dict and "param_groups" in state_dict:
    groups = state_dict["param_groups"]
    order = [int(i) for g in groups for i in g.get("params", ())]
    all_paths = _param_paths(params)
    if len(order) == len(paths):  # the optimized parameters only
      chosen = list(zip(order, paths))
    elif len(order) == len(all_paths):  # every parameter, frozen ones too
      held = set(paths)
      chosen = [(i, p) for i, p in zip(order, all_paths) if p in held]
    else:
      raise ValueError(
          f"state_dict: its param_groups list {len(order)} parameters, but "
          f"the optimizer holds state for {len(paths)} of the params tree's "
          f"{len(all_paths)} leaves")
    torch_state = state_dict["state"]
    entries = []
    for idx, path in chosen:
      entry = torch_state.get(idx, torch_state.get(str(idx)))
      if entry is None:
        raise ValueError(f"state_dict['state']: no state for parameter {idx} "
                         f"({path}); was the bnb optimizer stepped?")
      entry = dict(entry)
      entry.update(entry.pop(QUANT_STATE_KEY, {}))
      entries.append((f"state_dict['state'][{idx}]", entry))
  else:
    missing = [p for p in paths if p not in state_dict]
    if missing:
      raise ValueError(
          f"state_dict: no entry for parameter(s) {missing[:5]}; expected the "
          f"keys {paths[:5]}... (jax.tree_util.keystr of the params paths)")
    entries = [(f"state_dict[{p!r}]", dict(state_dict[p])) for p in paths]

  steps, new1, new2 = set(), {}, {}
  for (where, entry), path in zip(entries, paths):
    if "step" not in entry:
      raise ValueError(f"{where}: missing 'step'")
    steps.add(int(np.asarray(entry["step"])))
    new1[path] = _import_state(where, entry, 1, e1[path])
    new2[path] = _import_state(where, entry, 2, e2.get(path))
  if len(steps) > 1:
    raise ValueError(
        f"state_dict: the parameters have different steps {sorted(steps)}; "
        "jaxbnb keeps one step count for all of them")
  (t_count,), count_def = jax.tree.flatten(template.count)
  step = steps.pop() if steps else int(to_numpy(t_count))
  count = count_def.unflatten([jax.device_put(
      np.asarray(step, t_count.dtype), t_count.sharding)])
  new = template._replace(  # pylint: disable=protected-access
      count=count, state1=_rebuild(template.state1, new1),
      state2=_rebuild(template.state2, new2))
  return _replace(opt_state, new)
