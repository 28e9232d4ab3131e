"""Orbax checkpoints of (quantized) `LlamaForCausalLM` models.

`save_checkpoint` stores the model's `nnx.state` with orbax (packed 4-bit
bytes, absmax, nested statistics, quant_storage dtype and float weights,
bit-for-bit) and, beside it, `jaxbnb_model.json` with the `LlamaConfig`, the
`QuantizationConfig`, the dtypes and the static layout of every 4-bit
weight, so `restore_checkpoint` can rebuild the abstract model without any
other input. Loading an orbax checkpoint is much faster than converting an
HF checkpoint again (no quantization, no tensor-by-tensor reading).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb._src.models.llama import LlamaForCausalLM
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.quant.state import Params4bit
from jaxbnb._src.quant.state import QuantState

__all__ = ["save_checkpoint", "restore_checkpoint"]

_META = "jaxbnb_model.json"
_STATE = "state"
_FORMAT = "jaxbnb-orbax-llama"
_ARRAY_FIELDS = ("absmax", "code", "offset", "nested_absmax", "nested_code")


def _spec(x) -> list[Any] | None:
  return None if x is None else [list(x.shape), jnp.dtype(x.dtype).name]


def _quant_layout(p: Params4bit) -> dict[str, Any]:
  qs = p.quant_state
  return {
      "data": _spec(p.data),
      **{f: _spec(getattr(qs, f)) for f in _ARRAY_FIELDS},
      "shape": list(qs.shape), "dtype": qs.dtype, "blocksize": qs.blocksize,
      "quant_type": qs.quant_type, "nested_blocksize": qs.nested_blocksize,
  }


def _abstract_params4bit(layout: dict[str, Any]) -> Params4bit:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def sds(spec):
    if spec is None:
      return None
    return jax.ShapeDtypeStruct(tuple(spec[0]), jnp.dtype(spec[1]),
                                sharding=sharding)

  qs = QuantState(
      **{f: sds(layout[f]) for f in _ARRAY_FIELDS},
      shape=tuple(layout["shape"]), dtype=layout["dtype"],
      blocksize=int(layout["blocksize"]), quant_type=layout["quant_type"],
      nested_blocksize=int(layout["nested_blocksize"]))
  return Params4bit(sds(layout["data"]), qs)


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.StandardCheckpointer()


def save_checkpoint(model: LlamaForCausalLM, path: str | os.PathLike, *,
                    overwrite: bool = False) -> None:
  """Saves `model` (float or 4-bit) as an orbax checkpoint folder.

  Args:
    model: the `LlamaForCausalLM`.
    path: output folder; holds `state/` (orbax) and `jaxbnb_model.json`.
    overwrite: replace an existing `path` (otherwise it is an error).

  Raises:
    TypeError: if `model` is not a `LlamaForCausalLM`.
    FileExistsError: if `path` exists and `overwrite` is False.

  Examples:
    >>> from jaxbnb._src.io.orbax_io import save_checkpoint, restore_checkpoint
    >>> save_checkpoint(model, "/tmp/ckpt")  # doctest: +SKIP
    >>> model = restore_checkpoint("/tmp/ckpt")  # doctest: +SKIP
  """
  if not isinstance(model, LlamaForCausalLM):
    raise TypeError("save_checkpoint: `model` must be a LlamaForCausalLM, "
                    f"got {type(model).__name__}.")
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    if not overwrite:
      raise FileExistsError(
          f"save_checkpoint: {path!r} already exists (pass overwrite=True).")
    shutil.rmtree(path)
  layouts = {}
  for name, var in model.iter_variables():
    value = var.get_value()
    if isinstance(value, Params4bit):
      layouts[name] = _quant_layout(value)
  q = model.quantization
  meta = {
      "format": _FORMAT,
      "version": 1,
      "config": model.config.to_hf(),
      "quantization": q.to_dict() if q is not None else None,
      "dtype": jnp.dtype(model.dtype).name,
      "param_dtype": jnp.dtype(model.param_dtype).name,
      "quantized_weights": layouts,
  }
  _, state = nnx.split(model)
  os.makedirs(path)
  try:
    ckptr = _checkpointer()
    ckptr.save(os.path.join(path, _STATE), nnx.to_pure_dict(state))
    ckptr.wait_until_finished()
    with open(os.path.join(path, _META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)
  except BaseException:
    shutil.rmtree(path, ignore_errors=True)
    raise


def _read_meta(path: str) -> dict[str, Any]:
  meta_path = os.path.join(path, _META)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f"restore_checkpoint: {path!r} is not a jaxbnb orbax checkpoint "
        f"(no {_META}).")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != _FORMAT:
    raise ValueError(f"restore_checkpoint: {meta_path!r} has format "
                     f"{meta.get('format')!r}, expected {_FORMAT!r}.")
  return meta


def restore_checkpoint(path: str | os.PathLike,
                       like: LlamaForCausalLM | None = None
                       ) -> LlamaForCausalLM:
  """Restores a model written by `save_checkpoint`, bit for bit.

  Args:
    path: the checkpoint folder.
    like: optional model (concrete or from `nnx.eval_shape`) giving the
      structure, dtypes and shardings to restore into; by default it is
      rebuilt from `jaxbnb_model.json`.

  Returns:
    The `LlamaForCausalLM`.

  Raises:
    FileNotFoundError: if `path` is not a jaxbnb orbax checkpoint.
  """
  path = os.path.abspath(os.fspath(path))
  meta = _read_meta(path)
  if like is None:
    config = LlamaConfig.from_hf(meta["config"])
    q = meta.get("quantization")
    quantization = QuantizationConfig.from_dict(q) if q else None
    like = nnx.eval_shape(lambda: LlamaForCausalLM(
        config, dtype=meta["dtype"], param_dtype=meta["param_dtype"],
        quantization=quantization, rngs=nnx.Rngs(0)))
    layouts = meta.get("quantized_weights", {})
    for name, var in like.iter_variables():
      if name in layouts:
        var.set_value(_abstract_params4bit(layouts[name]))
  graphdef, state = nnx.split(like)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, (jax.Array, np.ndarray)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=getattr(x, "sharding", sharding))
    return x

  target = jax.tree.map(abstract, nnx.to_pure_dict(state))
  restored = _checkpointer().restore(os.path.join(path, _STATE), target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
