"""Resumable training checkpoints: adapters, optimizer, RNG, data position.

`OUT/checkpoints/step_XXXXXXXX/` holds `state/` (orbax: the adapters
`nnx.LoRAParam`, the model's RNG state, i.e. the adapter dropout streams,
and the `nnx.Optimizer` state, 8-bit moments included) and `meta.json`
(step, data position, the configs and a fingerprint of the data). Each
checkpoint is written beside its final name and renamed into place, so a
checkpoint folder is complete or absent; the oldest are deleted beyond
`keep`.

On a device mesh the arrays are saved from their shards and hold global
values, so a checkpoint does not depend on the mesh it was written from:
`restore_checkpoint` reads each array onto the sharding its counterpart in
the model or optimizer has now (place those on the new mesh first, as
`finetune` does), e.g. from fsdp=4 x data=2 onto fsdp=8 or one device.

orbax-checkpoint is the `[orbax]` extra, imported when a checkpoint is
written or read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxbnb._src.io import extras
from jaxbnb._src.io import paths
from jaxbnb._src.io import processes

__all__ = ["CHECKPOINTS", "FORMAT", "list_checkpoints", "save_checkpoint",
           "restore_checkpoint"]

CHECKPOINTS = "checkpoints"
FORMAT = "jaxbnb-finetune"
_META = "meta.json"
_STATE = "state"
_NAME = re.compile(r"^step_(\d{8})$")


def _orbax():
  return extras.require("orbax.checkpoint", "training checkpoints",
                        extra="orbax")


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, str]]:
  """`(step, folder)` of the complete checkpoints in `out_dir`, by step."""
  root = os.path.join(os.fspath(out_dir), CHECKPOINTS)
  if not os.path.isdir(root):
    return []
  found = []
  for name in os.listdir(root):
    m = _NAME.match(name)
    folder = os.path.join(root, name)
    if m and os.path.isfile(os.path.join(folder, _META)):
      found.append((int(m.group(1)), folder))
  return sorted(found)


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _tree(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
  """The saved pytree: pure dicts, PRNG keys as their raw uint32 data."""
  tree = {"lora": nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)),
          "rngs": nnx.to_pure_dict(nnx.state(model, nnx.RngState)),
          "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                      tree)


def save_checkpoint(out_dir: str | os.PathLike, step: int,
                    model: nnx.Module, optimizer: nnx.Optimizer,
                    meta: dict[str, Any], *, keep: int) -> str:
  """Writes the checkpoint of `step`; keeps the latest `keep`.

  With several processes every process calls this: each writes its shards,
  process 0 the rest.

  Returns:
    The checkpoint folder.
  """
  root = os.path.join(os.fspath(out_dir), CHECKPOINTS)
  os.makedirs(root, exist_ok=True)
  target = os.path.join(root, f"step_{step:08d}")
  tree = _tree(model, optimizer)
  meta = dict(meta, format=FORMAT, version=1, step=step)

  def write(folder: str) -> None:
    ckptr = _orbax().StandardCheckpointer()
    ckptr.save(os.path.join(folder, _STATE), tree)
    ckptr.wait_until_finished()
    if not processes.is_primary():
      return  # (orbax wrote this process's shards)
    with open(os.path.join(folder, _META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1, sort_keys=True)

  path = paths.write_folder_atomic(target, write, overwrite=True,
                                   fn="finetune", collective=True)
  if processes.is_primary():
    for _, old in list_checkpoints(out_dir)[:-keep]:
      shutil.rmtree(old, ignore_errors=True)
  processes.sync(f"finetune:kept:{step}")
  return path


def read_meta(folder: str) -> dict[str, Any]:
  """The `meta.json` of a checkpoint folder.

  Raises:
    ValueError: not a jaxbnb fine-tuning checkpoint.
  """
  with open(os.path.join(folder, _META), encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"finetune: {folder!r} is not a jaxbnb fine-tuning "
                     f"checkpoint (format {meta.get('format')!r}).")
  return meta


def restore_checkpoint(folder: str, model: nnx.Module,
                       optimizer: nnx.Optimizer) -> dict[str, Any]:
  """Restores a checkpoint into `model` and `optimizer`, bit for bit.

  Each array lands with the sharding of the array it replaces (whatever
  mesh, or single device, the checkpoint was written from).

  Returns:
    Its `meta.json`.

  Raises:
    ValueError: the checkpoint's arrays do not fit the model (other
      adapters or another optimizer).
  """
  meta = read_meta(folder)
  current = {"lora": nnx.state(model, nnx.LoRAParam),
             "rngs": nnx.state(model, nnx.RngState),
             "optimizer": nnx.state(optimizer)}
  pure = {k: nnx.to_pure_dict(v) for k, v in current.items()}
  default = jax.sharding.make_single_device_sharding(jax.devices()[0])

  def abstract(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    if isinstance(x, (jax.Array, np.ndarray)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=getattr(x, "sharding", default))
    return x

  target = jax.tree.map(abstract, pure)
  try:
    restored = _orbax().StandardCheckpointer().restore(
        os.path.join(folder, _STATE), target)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"finetune: the checkpoint {folder!r} does not fit this model and "
        f"optimizer (other adapters, targets or optimizer?): {e}") from e
  restored = jax.tree.map(
      lambda old, new: jax.random.wrap_key_data(
          new, impl=jax.random.key_impl(old)) if _is_key(old) else new,
      pure, restored)
  for name, state in current.items():
    nnx.replace_by_pure_dict(state, restored[name])
  nnx.update(model, current["lora"], current["rngs"])
  nnx.update(optimizer, current["optimizer"])
  return meta
