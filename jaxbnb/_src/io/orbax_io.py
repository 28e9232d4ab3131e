"""Orbax checkpoints of (quantized) `LlamaForCausalLM` models.

`save_checkpoint` stores the model's `nnx.state` with orbax (packed 4-bit
bytes, absmax, nested statistics, quant_storage dtype and float weights,
bit-for-bit) and, beside it, `jaxbnb_model.json` with the `LlamaConfig`, the
`QuantizationConfig`, the dtypes and the static layout of every quantized
weight, so `restore_checkpoint` can rebuild the abstract model without any
other input. Loading an orbax checkpoint is much faster than converting an
HF checkpoint again (no quantization, no tensor-by-tensor reading).

Quantized weights are handled through their interface (`layout()` and
`weights.from_layout`), whatever their format.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb._src.io import extras
from jaxbnb._src.io import paths
from jaxbnb._src.layers.lora import check_no_lora
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.models.llama import LlamaForCausalLM
from jaxbnb._src.quant import weights

__all__ = ["save_checkpoint", "restore_checkpoint"]


def _orbax():
  """orbax.checkpoint, from the `[orbax]` extra (imported when first used)."""
  return extras.require("orbax.checkpoint", "orbax checkpoints",
                        extra="orbax")

_META = "jaxbnb_model.json"
_STATE = "state"
_FORMAT = "jaxbnb-orbax-llama"


def save_checkpoint(model: LlamaForCausalLM, path: str | os.PathLike, *,
                    overwrite: bool = False) -> None:
  """Saves `model` (float or quantized) as an orbax checkpoint folder.

  The write is atomic: the checkpoint goes to a new folder beside `path`,
  which then replaces it; on any error the new folder is removed and an
  existing checkpoint at `path` is left as it was.

  Args:
    model: the `LlamaForCausalLM`.
    path: output folder; holds `state/` (orbax) and `jaxbnb_model.json`.
    overwrite: replace an existing non-empty `path` (otherwise an error).

  Raises:
    TypeError: if `model` is not a `LlamaForCausalLM`.
    FileExistsError: if `path` is a non-empty folder and `overwrite` is
      False.
    ValueError: if `path` is a file, or is, contains or lies inside the
      checkpoint `model` was loaded from with `from_pretrained`.

  Examples:
    >>> from jaxbnb import convert
    >>> convert.save_checkpoint(model, "/tmp/ckpt")  # doctest: +SKIP
    >>> model = convert.restore_checkpoint("/tmp/ckpt")  # doctest: +SKIP
  """
  if not isinstance(model, LlamaForCausalLM):
    raise TypeError("save_checkpoint: `model` must be a LlamaForCausalLM, "
                    f"got {type(model).__name__}.")
  check_no_lora(model, "save_checkpoint")
  layouts = {}
  for name, var in model.iter_variables():
    value = var.get_value()
    if isinstance(value, weights.QuantizedArray):
      layouts[name] = value.layout()
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

  def write(folder: str) -> None:
    ckptr = _orbax().StandardCheckpointer()
    ckptr.save(os.path.join(folder, _STATE), nnx.to_pure_dict(state))
    ckptr.wait_until_finished()
    with open(os.path.join(folder, _META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)

  paths.write_folder_atomic(path, write, overwrite=overwrite,
                            fn="save_checkpoint",
                            source=paths.source_of(model))


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
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if like is None:
    config = LlamaConfig.from_hf(meta["config"])
    q = meta.get("quantization")
    quantization = QuantizationConfig.from_dict(q) if q else None
    like = nnx.eval_shape(lambda: LlamaForCausalLM(
        config, dtype=meta["dtype"], param_dtype=meta["param_dtype"],
        quantization=quantization, rngs=nnx.Rngs(0)))
    # Layouts without "format" (jaxbnb 0.1) are 4-bit; from_layout knows.
    layouts = meta.get("quantized_weights", {})
    for name, var in like.iter_variables():
      if name in layouts:
        var.set_value(weights.from_layout(layouts[name], sharding))
  graphdef, state = nnx.split(like)

  def abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, (jax.Array, np.ndarray)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=getattr(x, "sharding", sharding))
    return x

  target = jax.tree.map(abstract, nnx.to_pure_dict(state))
  restored = _orbax().StandardCheckpointer().restore(os.path.join(path, _STATE),
                                                target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
