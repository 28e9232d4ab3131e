"""Orbax checkpoints of (quantized) `LlamaForCausalLM` models.

`save_checkpoint` stores the model's `nnx.state` with orbax (packed 4-bit
bytes, absmax, nested statistics, quant_storage dtype and float weights,
bit-for-bit) and, beside it, `jaxbnb_model.json` with the `LlamaConfig`, the
`QuantizationConfig`, the dtypes and the static layout of every quantized
weight, so `restore_checkpoint` can rebuild the abstract model without any
other input. Loading an orbax checkpoint is much faster than converting an
HF checkpoint again (no quantization, no tensor-by-tensor reading).

Quantized weights are handled through their interface (`layout()` and
`weights.from_layout`), whatever their format: 4-bit or LLM.int8 linears,
and embeddings quantized by `quantize_embeddings` (8-bit or 4-bit), which
`restore_checkpoint` rebuilds from their layouts.
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
from jaxbnb._src.io.convert import saved_quantization
from jaxbnb._src.io import paths
from jaxbnb._src.io import processes
from jaxbnb._src.layers.common import QuantizedWeight
from jaxbnb._src.layers.embedding import Embedding4bit
from jaxbnb._src.layers.embedding import Embedding8bit
from jaxbnb._src.layers.embedding import quantize_embeddings
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
  embeddings = {
      ".".join(map(str, path)): {
          "bits": 8 if isinstance(node, Embedding8bit) else 4,
          "dtype": jnp.dtype(node.dtype).name}
      for path, node in nnx.iter_graph(model)
      if isinstance(node, (Embedding8bit, Embedding4bit))}
  # Float linears of a quantized model (merge_lora(requantize=False)) go
  # into llm_int8_skip_modules, as save_pretrained writes them, so the
  # restore rebuilds them in float.
  q = saved_quantization(model)
  meta = {
      "format": _FORMAT,
      "version": 1,
      "config": model.config.to_hf(),
      "quantization": q.to_dict() if q is not None else None,
      "dtype": jnp.dtype(model.dtype).name,
      "param_dtype": jnp.dtype(model.param_dtype).name,
      "quantized_weights": layouts,
      "quantized_embeddings": embeddings,
  }
  _, state = nnx.split(model)

  def write(folder: str) -> None:
    ckptr = _orbax().StandardCheckpointer()
    ckptr.save(os.path.join(folder, _STATE), nnx.to_pure_dict(state))
    ckptr.wait_until_finished()
    if not processes.is_primary():
      return  # (orbax wrote this process's shards)
    with open(os.path.join(folder, _META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)

  paths.write_folder_atomic(path, write, overwrite=overwrite,
                            fn="save_checkpoint",
                            source=paths.source_of(model), collective=True)


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


def _embedding_kwargs(layouts: dict[str, Any], names: list[str],
                      meta: dict[str, Any], path: str) -> dict[str, Any]:
  """`quantize_embeddings` arguments that rebuild the saved embeddings.

  `names` are the quantized weights the float model does not have: the
  tables of embeddings quantized by `quantize_embeddings`, which quantizes
  every embedding of a model alike. 8 or 4 bits, and the 4-bit quant type,
  blocksize, double quantization and storage, come from their layouts; the
  output dtype from `quantized_embeddings` in the metadata (older
  checkpoints: the float embedding's).
  """
  first = layouts[names[0]]
  fmt = first.get("format", weights.Params4bit.format)
  for n in names[1:]:
    if layouts[n].get("format", weights.Params4bit.format) != fmt:
      raise ValueError(
          f"restore_checkpoint: {path!r}: quantized embeddings {names[0]!r} "
          f"and {n!r} have different formats; quantize_embeddings makes "
          "them alike.")
  if fmt == weights.Int8Params.format:
    kwargs: dict[str, Any] = {"bits": 8}
  elif fmt == weights.Params4bit.format:
    kwargs = {"bits": 4, "quant_type": first["quant_type"],
              "blocksize": int(first["blocksize"]),
              "compress_statistics": first.get("nested_absmax") is not None,
              "quant_storage": jnp.dtype(first["data"][1])}
  else:
    raise ValueError(f"restore_checkpoint: {path!r}: {names[0]!r} has "
                     f"layout format {fmt!r}, not an embedding format.")
  saved = meta.get("quantized_embeddings") or {}
  dtypes = {saved[n[:-len(".weight")]].get("dtype") for n in names
            if n[:-len(".weight")] in saved}
  if len(dtypes) == 1 and None not in dtypes:
    kwargs["dtype"] = jnp.dtype(dtypes.pop())
  return kwargs


def _abstract_model(meta: dict[str, Any], sharding,
                    path: str) -> LlamaForCausalLM:
  """The abstract model `jaxbnb_model.json` describes."""
  config = LlamaConfig.from_hf(meta["config"])
  q = meta.get("quantization")
  quantization = QuantizationConfig.from_dict(q) if q else None

  def build(embedding_kwargs=None):
    model = LlamaForCausalLM(
        config, dtype=meta["dtype"], param_dtype=meta["param_dtype"],
        quantization=quantization, rngs=nnx.Rngs(0))
    if embedding_kwargs is not None:
      quantize_embeddings(model, **embedding_kwargs)
    return model

  like = nnx.eval_shape(build)
  # Layouts without "format" (jaxbnb 0.1) are 4-bit; from_layout knows.
  layouts = meta.get("quantized_weights", {})
  quantized = {n for n, v in like.iter_variables()
               if isinstance(v, QuantizedWeight)}
  extra = [n for n in layouts if n not in quantized]
  if extra:
    kwargs = _embedding_kwargs(layouts, extra, meta, path)
    like = nnx.eval_shape(lambda: build(kwargs))
    quantized = {n for n, v in like.iter_variables()
                 if isinstance(v, QuantizedWeight)}
  if quantized != set(layouts):
    raise ValueError(
        f"restore_checkpoint: {path!r}: the saved quantized weights "
        f"({sorted(set(layouts) - quantized)[:3]} ...) do not match the "
        f"model its metadata describes (quantized there: "
        f"{sorted(quantized - set(layouts))[:3]} ...); pass `like=`.")
  for name, var in like.iter_variables():
    if name in layouts:
      var.set_value(weights.from_layout(layouts[name], sharding))
  return like


def restore_checkpoint(path: str | os.PathLike,
                       like: LlamaForCausalLM | None = None
                       ) -> LlamaForCausalLM:
  """Restores a model written by `save_checkpoint`, bit for bit.

  Args:
    path: the checkpoint folder.
    like: optional model (concrete or from `nnx.eval_shape`) giving the
      structure, dtypes and shardings to restore into; by default it is
      rebuilt from `jaxbnb_model.json` (including LLM.int8 linears and
      embeddings quantized with `quantize_embeddings`).

  Returns:
    The `LlamaForCausalLM`.

  Raises:
    FileNotFoundError: if `path` is not a jaxbnb orbax checkpoint.
    ValueError: if the saved quantized weights do not fit the model the
      metadata describes (without `like`).
  """
  path = os.path.abspath(os.fspath(path))
  meta = _read_meta(path)
  sharding = jax.sharding.make_single_device_sharding(jax.devices()[0])
  if like is None:
    like = _abstract_model(meta, sharding, path)
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
