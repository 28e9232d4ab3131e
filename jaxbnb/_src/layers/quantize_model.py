"""Quantize the Dense/Linear kernels of a whole model, and count its bytes."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from jaxbnb._src.layers.dense4bit import QUANTIZED
from jaxbnb._src.layers.linear4bit import Linear4bit
from jaxbnb._src.layers.skip import DEFAULT_SKIP_MODULES
from jaxbnb._src.layers.skip import skips
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.weights import Params4bit

__all__ = ["quantize_params", "memory_footprint"]


def _skipped(path: str, skip_modules) -> bool:
  return skips(path, skip_modules, sep="/")


def quantize_params(
    target: Any,
    *,
    quant_type: str = "fp4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_storage: Any = np.uint8,
    skip_modules: Iterable[str] | None = None,
    dtype: Any = None,
):
  """Turns the Dense/Linear kernels of a model into 4-bit weights.

  Works on a Linen parameter tree (for a model whose `nn.Dense` layers are
  replaced by `jaxbnb.linen.Dense4bit` at the same paths) or on an NNX
  module (its `nnx.Linear` layers are replaced in place by `Linear4bit`).
  Modules whose path matches a `skip_modules` pattern stay in full
  precision, like bitsandbytes' `llm_int8_skip_modules`.

  Args:
    target: a Linen `params` tree (a mapping; a `{"params": ...}` variables
      dict is accepted too) or an `nnx.Module`.
    quant_type: "nf4" or "fp4".
    blocksize: elements per absmax block.
    compress_statistics: double quantization of the absmax.
    quant_storage: dtype the packed bytes are viewed as.
    skip_modules: glob patterns matched against the "/"-joined module path
      and each of its parts; default `DEFAULT_SKIP_MODULES` (lm_head and
      embeddings).
    dtype: computation dtype of the new NNX layers (default: the Linear's).

  Returns:
    For a Linen tree: a variables dict `{"params": ..., "quantized": ...}`
    for the Dense4bit model (quantized kernels removed from "params"); the
    other collections of a variables dict are kept, and an existing
    "quantized" collection (layers that were 4-bit already) is merged with
    the new kernels. For an NNX module: the same module, modified in place.

  Raises:
    TypeError: if `target` is neither a mapping nor an NNX module.
    ValueError: for a bad quant_type or blocksize, or a float kernel whose
      path is already in the "quantized" collection.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import quantize_params, memory_footprint
    >>> model = nnx.Sequential(nnx.Linear(256, 512, rngs=nnx.Rngs(0)),
    ...                        nnx.Linear(512, 256, rngs=nnx.Rngs(1)))
    >>> before = memory_footprint(model)
    >>> model = quantize_params(model, quant_type="nf4")
    >>> type(model.layers[0]).__name__, before, memory_footprint(model)
    ('Linear4bit', 1051648, 140488)
  """
  validation.check_quant_type(quant_type, fn="quantize_params")
  validation.check_blocksize(blocksize, validation.BLOCKSIZES_4BIT,
                             fn="quantize_params")
  skip = DEFAULT_SKIP_MODULES if skip_modules is None else tuple(skip_modules)
  qkw = dict(quant_type=quant_type, blocksize=blocksize,
             compress_statistics=compress_statistics,
             quant_storage=quant_storage)
  if isinstance(target, nnx.Module):
    return _quantize_nnx(target, skip, qkw, dtype)
  if isinstance(target, Mapping):
    if set(target) >= {"params"} and isinstance(target["params"], Mapping):
      out = _quantize_linen(target["params"], skip, qkw)
      rest = {k: v for k, v in target.items()
              if k not in ("params", QUANTIZED)}
      quantized = _merge(target.get(QUANTIZED, {}), out[QUANTIZED], "")
      return {**rest, "params": out["params"], QUANTIZED: quantized}
    return _quantize_linen(target, skip, qkw)
  raise TypeError(
      "quantize_params: `target` must be a Linen params mapping or an "
      f"nnx.Module, got {type(target).__name__}."
  )


def _merge(old: Mapping, new: Mapping, path: str) -> dict:
  """Nested merge of newly quantized kernels into an existing collection."""
  out = dict(old)
  for key, value in new.items():
    sub = f"{path}/{key}" if path else str(key)
    if key not in out:
      out[key] = value
    elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
      out[key] = _merge(out[key], value, sub)
    else:
      raise ValueError(
          f"quantize_params: {sub!r} is both a float kernel in 'params' and "
          f"an entry of the existing {QUANTIZED!r} collection; remove one."
      )
  return out


def _quantize_linen(params: Mapping, skip, qkw):
  def walk(node, path):
    kept, quantized = {}, {}
    for key, value in node.items():
      sub = f"{path}/{key}" if path else str(key)
      if isinstance(value, Mapping):
        k, q = walk(value, sub)
        if k:
          kept[key] = k
        if q:
          quantized[key] = q
      elif (key == "kernel" and getattr(value, "ndim", 0) == 2
            and not _skipped(path, skip)):
        quantized[key] = Params4bit.from_float(value.T, **qkw)
      else:
        kept[key] = value
    return kept, quantized

  kept, quantized = walk(params, "")
  return {"params": kept, QUANTIZED: quantized}


def _quantize_nnx(module: nnx.Module, skip, qkw, dtype):
  targets = []
  for path, sub in nnx.iter_modules(module):
    if isinstance(sub, nnx.Linear) and path:
      if not _skipped("/".join(str(p) for p in path), skip):
        targets.append((path, sub))
  for path, linear in targets:
    kw = dict(qkw)
    if dtype is not None:
      kw["dtype"] = dtype
    new = Linear4bit.from_linear(linear, **kw)
    parent = module
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    last = path[-1]
    if isinstance(last, int):
      parent[last] = new
    else:
      setattr(parent, last, new)
  return module


def memory_footprint(target: Any) -> int:
  """Bytes held by the arrays of a pytree, variables dict or NNX module.

  Args:
    target: any pytree of arrays (Linen variables, a `Params4bit`, ...) or
      an `nnx.Module`.

  Returns:
    The total number of bytes of all array leaves.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb.nnx import memory_footprint
    >>> memory_footprint({"w": jnp.zeros((4, 4), jnp.bfloat16)})
    32
  """
  if isinstance(target, nnx.Module):
    target = nnx.state(target)
  total = 0
  for leaf in jax.tree.leaves(target):
    if hasattr(leaf, "dtype") and hasattr(leaf, "size"):
      total += int(leaf.size) * np.dtype(leaf.dtype).itemsize
  return total
