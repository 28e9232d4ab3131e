"""Quantize the Dense/Linear kernels of a whole model (4-bit or LLM.int8),
and count its bytes."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from jaxbnb._src.layers.common import replace_modules
from jaxbnb._src.layers.dense4bit import QUANTIZED
from jaxbnb._src.layers.linear import Linear
from jaxbnb._src.layers.linear4bit import Linear4bit
from jaxbnb._src.layers.linear8bit import Linear8bitLt
from jaxbnb._src.layers.linear8bit import check_threshold
from jaxbnb._src.layers.skip import DEFAULT_SKIP_MODULES
from jaxbnb._src.layers.skip import skips
from jaxbnb._src.quant import int8
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
    bits: int = 4,
    threshold: float = 0.0,
):
  """Turns the Dense/Linear kernels of a model into 4-bit or int8 weights.

  Works on a Linen parameter tree (for a model whose `nn.Dense` layers are
  replaced by `jaxbnb.linen.Dense4bit`, or for `bits=8`
  `jaxbnb.linen.Dense8bit(has_fp16_weights=False)`, at the same paths) or
  on an NNX module (its `nnx.Linear` layers are replaced in place by
  `Linear4bit`, or for `bits=8` by a frozen `Linear8bitLt`). Modules whose
  path matches a `skip_modules` pattern stay in full precision, like
  bitsandbytes' `llm_int8_skip_modules`.

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
    bits: 4 (NF4/FP4, `Params4bit`) or 8 (LLM.int8, `Int8Params` quantized
      from the float16-cast kernel as bitsandbytes). `quant_type`,
      `blocksize`, `compress_statistics` and `quant_storage` apply to 4
      bits only.
    threshold: `bits=8` only: the outlier threshold of the new NNX
      `Linear8bitLt` layers (transformers' `llm_int8_threshold`; a Linen
      `Dense8bit` takes it as an attribute).

  Returns:
    For a Linen tree: a variables dict `{"params": ..., "quantized": ...}`
    for the Dense4bit model (quantized kernels removed from "params"); the
    other collections of a variables dict are kept, and an existing
    "quantized" collection (layers that were 4-bit already) is merged with
    the new kernels. For an NNX module: the same module, modified in place.

  Raises:
    TypeError: if `target` is neither a mapping nor an NNX module.
    NotImplementedError: an NNX `target` holds jaxbnb float `Linear`
      layers that no `skip_modules` pattern skips (e.g. a
      `LlamaForCausalLM` built without `quantization`: build it with one
      instead); nothing is changed.
    ValueError: for a bad quant_type, blocksize, bits or threshold (or a
      threshold with `bits=4`), or a float kernel whose path is already in
      the "quantized" collection.

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
    >>> model = nnx.Sequential(nnx.Linear(256, 512, rngs=nnx.Rngs(0)))
    >>> model = quantize_params(model, bits=8, threshold=6.0)
    >>> type(model.layers[0]).__name__, model.layers[0].threshold
    ('Linear8bitLt', 6.0)
  """
  fn = "quantize_params"
  if isinstance(bits, bool) or bits not in (4, 8):
    raise ValueError(f"{fn}: `bits` must be 4 or 8, got {bits!r}.")
  threshold = check_threshold(threshold, fn)
  if bits == 4:
    if threshold:
      raise ValueError(f"{fn}: `threshold` applies to bits=8 only, got "
                       f"threshold={threshold} with bits=4.")
    validation.check_quant_type(quant_type, fn=fn)
    validation.check_blocksize(blocksize, validation.BLOCKSIZES_4BIT, fn=fn)
    qkw = dict(quant_type=quant_type, blocksize=blocksize,
               compress_statistics=compress_statistics,
               quant_storage=quant_storage)
  else:
    qkw = dict(threshold=threshold)
  skip = DEFAULT_SKIP_MODULES if skip_modules is None else tuple(skip_modules)
  if isinstance(target, nnx.Module):
    return _quantize_nnx(target, skip, qkw, dtype, bits)
  if isinstance(target, Mapping):
    if set(target) >= {"params"} and isinstance(target["params"], Mapping):
      out = _quantize_linen(target["params"], skip, qkw, bits)
      rest = {k: v for k, v in target.items()
              if k not in ("params", QUANTIZED)}
      quantized = _merge(target.get(QUANTIZED, {}), out[QUANTIZED], "")
      return {**rest, "params": out["params"], QUANTIZED: quantized}
    return _quantize_linen(target, skip, qkw, bits)
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


def _quantize_kernel(kernel, qkw, bits):
  """A Linen `[in, out]` kernel as the `[out, in]` quantized weight."""
  if bits == 8:
    return int8.quantize_int8_weight(kernel.T)
  return Params4bit.from_float(kernel.T, **qkw)


def _quantize_linen(params: Mapping, skip, qkw, bits):
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
        quantized[key] = _quantize_kernel(value, qkw, bits)
      else:
        kept[key] = value
    return kept, quantized

  kept, quantized = walk(params, "")
  return {"params": kept, QUANTIZED: quantized}


def _quantize_nnx(module: nnx.Module, skip, qkw, dtype, bits):
  targets, own = [], []
  for path, sub in nnx.iter_modules(module):
    if isinstance(sub, (nnx.Linear, Linear)) and path:
      name = "/".join(str(p) for p in path)
      if _skipped(name, skip):
        continue
      if isinstance(sub, Linear):
        own.append(name)
      else:
        targets.append((path, sub))
  if own:
    # jaxbnb's own float Linear (a LlamaForCausalLM built without
    # `quantization`) is the model's choice, recorded in its config:
    # converting it here would leave a model that says it is float (and
    # saves as float) while holding 4-bit weights. Refused, nothing changed.
    raise NotImplementedError(
        f"quantize_params: `target` holds jaxbnb float Linear layers "
        f"(e.g. {own[0]!r}, {len(own)} in all), which it does not convert "
        "(it converts flax.nnx.Linear); a jaxbnb model is quantized when "
        "built: LlamaForCausalLM(config, quantization=QuantizationConfig."
        "nf4(), rngs=...) or jaxbnb.convert.from_pretrained(path, "
        "quantization=...). Nothing was changed.")
  new_by_id = {}
  for _, linear in targets:
    kw = dict(qkw)
    if dtype is not None:
      kw["dtype"] = dtype
    if bits == 8:
      new_by_id[id(linear)] = Linear8bitLt.from_linear(
          linear, has_fp16_weights=False, **kw)
    else:
      new_by_id[id(linear)] = Linear4bit.from_linear(linear, **kw)
  # A layer held at several paths (shared) is replaced at each: it stays
  # shared, and no float copy is left behind.
  replace_modules(module, new_by_id)
  return module


def memory_footprint(target: Any) -> int:
  """Bytes held by the arrays of a pytree, variables dict or NNX module.

  Args:
    target: any pytree of arrays (Linen variables, a `Params4bit`, an
      `Int8Params`, ...) or an `nnx.Module`.

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
