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
  `i` is the position of the parameter in `jax.tree.leaves(params)`, so the
  torch parameters must be given to the bnb optimizer in that order (for a
  flax / dict tree: sorted by key path).

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
_TENSOR_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


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


def _per_leaf(params, tree, what):
  treedef = jax.tree.structure(params)
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{what}: its tree does not match the params tree {treedef}") from e


def _export_leaf(s1, s2, step: int) -> dict:
  out = {}
  for i, s in ((1, s1), (2, s2)):
    if s is None:
      continue
    if isinstance(s, optim_state.Quantized8bit):
      out[f"state{i}"] = to_numpy(s.codes)
      out[f"absmax{i}"] = to_numpy(s.absmax)
      out[f"qmap{i}"] = np.array(s.qmap, np.float32)
    else:
      out[f"state{i}"] = to_numpy(s)
  out["step"] = step
  return out


def to_bnb_state_dict(opt_state, params) -> dict[str, dict[str, Any]]:
  """Exports a jaxbnb optimizer state in bitsandbytes' per-parameter layout.

  Args:
    opt_state: the state of a `jaxbnb.optim` optimizer (alone or inside an
      `optax.chain` / other tuple).
    params: the parameter tree the state belongs to (for the leaf paths).

  Returns:
    `{keystr(path): {"state1", "state2", "absmax1", "absmax2", "qmap1",
    "qmap2", "step"}}` with the keys bnb has for that parameter (see the
    module docstring), numpy arrays and an int step.

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
  step = int(to_numpy(st.count))
  s1 = _per_leaf(params, st.state1, "opt_state.state1")
  s2 = _per_leaf(params, st.state2, "opt_state.state2")
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  return {path: _export_leaf(a, b, step) for path, a, b in zip(paths, s1, s2)}


def to_torch_state_dict(opt_state, params,
                        param_group: Mapping[str, Any] | None = None,
                        wrap: bool = True) -> dict:
  """Exports in the layout of `bnb.optim.Optimizer8bit.state_dict()`.

  Args:
    opt_state: the state of a `jaxbnb.optim` optimizer.
    params: its parameter tree. Parameter `i` is `jax.tree.leaves(params)[i]`.
    param_group: hyper-parameters for the single param group (bnb's names:
      `lr`, `betas`, `eps`, `weight_decay`, ...). torch's `load_state_dict`
      replaces the optimizer's group settings with these, so pass the full
      set (e.g. `bnb_opt.state_dict()["param_groups"][0]`) when loading
      into a live bnb optimizer. `params` in it is replaced.
    wrap: put the tensors under `"__bnb_optimizer_quant_state__"` as bnb
      >= 0.49.2 does (its `load_state_dict` accepts both forms).

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
  per_leaf = list(to_bnb_state_dict(opt_state, params).values())
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
  """One state (1 or 2) from a bnb entry, shaped like `template`."""
  key = f"state{i}"
  if template is None:
    if key in entry and entry[key] is not None:
      raise ValueError(f"{where}.{key}: this optimizer has no state {i} "
                       "(a 1-state optimizer), but the state dict has one")
    return None
  if key not in entry:
    raise ValueError(f"{where}: missing {key!r} (keys: {sorted(entry)})")
  if isinstance(template, optim_state.Quantized8bit):
    codes = _check(f"{where}.{key}", entry[key], template.codes.shape,
                   np.uint8)
    amax_key, qmap_key = f"absmax{i}", f"qmap{i}"
    if amax_key not in entry:
      raise ValueError(f"{where}: missing {amax_key!r} for the 8-bit {key}")
    lead = template.absmax.ndim - 1
    absmax = _check(f"{where}.{amax_key}", entry[amax_key],
                    template.absmax.shape, np.float32,
                    numel=math.prod(template.codes.shape[lead:]))
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
    return optim_state.Quantized8bit(
        codes=jax.device_put(codes, template.codes.sharding),
        absmax=jax.device_put(absmax, template.absmax.sharding),
        signed=template.signed)
  value = np.asarray(entry[key])
  if value.dtype == np.uint8:
    raise ValueError(
        f"{where}.{key}: the state dict holds an 8-bit (uint8) state but "
        "this optimizer keeps a 32-bit state for the parameter (check "
        "optim_bits, min_8bit_size and the override)")
  value = _check(f"{where}.{key}", value, template.shape, np.float32)
  return jax.device_put(value, template.sharding)


def from_bnb_state_dict(state_dict: Mapping, params, opt_state):
  """Imports a bitsandbytes optimizer state into a jaxbnb optimizer state.

  Args:
    state_dict: either layout of `to_bnb_state_dict` / `to_torch_state_dict`
      (keyed by leaf path, or a torch `{"state", "param_groups"}` dict, its
      tensors wrapped under `"__bnb_optimizer_quant_state__"` or not).
      Values are numpy arrays or CPU torch tensors.
    params: the parameter tree (defines the order and the leaf paths).
    opt_state: a template, e.g. `optimizer.init(params)` of the jaxbnb
      optimizer that continues the run; it fixes which leaves are 8-bit and
      where each array lives (paged state stays in host memory).

  Returns:
    `opt_state` with its `Optimizer8bitState` replaced by the imported one.

  Raises:
    ValueError: a parameter is missing, a tensor has the wrong shape or
      dtype (including another blocksize's absmax), a qmap is not bnb's map,
      8-bit vs 32-bit disagrees, or the parameters' steps differ.

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
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [jax.tree_util.keystr(p) for p, _ in leaves]
  if not isinstance(state_dict, Mapping):
    raise TypeError("state_dict: expected a mapping, got "
                    f"{type(state_dict).__name__}")
  if "state" in state_dict and "param_groups" in state_dict:
    groups = state_dict["param_groups"]
    order = [int(i) for g in groups for i in g.get("params", ())]
    if len(order) != len(paths):
      raise ValueError(
          f"state_dict: its param_groups list {len(order)} parameters, the "
          f"params tree has {len(paths)} leaves")
    torch_state = state_dict["state"]
    entries = []
    for pos, idx in enumerate(order):
      entry = torch_state.get(idx, torch_state.get(str(idx)))
      if entry is None:
        raise ValueError(f"state_dict['state']: no state for parameter {idx} "
                         f"({paths[pos]}); was the bnb optimizer stepped?")
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

  t1 = _per_leaf(params, template.state1, "opt_state.state1")
  t2 = _per_leaf(params, template.state2, "opt_state.state2")
  steps, new1, new2 = set(), [], []
  for (where, entry), a, b in zip(entries, t1, t2):
    if "step" not in entry:
      raise ValueError(f"{where}: missing 'step'")
    steps.add(int(np.asarray(entry["step"])))
    new1.append(_import_state(where, entry, 1, a))
    new2.append(_import_state(where, entry, 2, b))
  if len(steps) > 1:
    raise ValueError(
        f"state_dict: the parameters have different steps {sorted(steps)}; "
        "jaxbnb keeps one step count for all of them")
  step = steps.pop() if steps else int(to_numpy(template.count))
  treedef = jax.tree.structure(params)
  count = jax.device_put(np.asarray(step, to_numpy(template.count).dtype),
                         template.count.sharding)
  new = template._replace(  # pylint: disable=protected-access
      count=count,
      state1=treedef.unflatten(new1),
      state2=treedef.unflatten(new2)) if hasattr(template, "_replace") else (
          type(template)(count, treedef.unflatten(new1),
                         treedef.unflatten(new2)))
  return _replace(opt_state, new)
