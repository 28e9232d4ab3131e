"""What every quantized layer shares: the frozen-weight variable, the input
checks, the compute-dtype rule and the NNX base class.

A quantized layer holds a `QuantizedArray` (any format) and calls its
`matmul`; nothing here asks which format it is. A new format's NNX layer
subclasses `QuantizedLinear` and only adds how it builds its weight.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb._src.layers import serialization
from jaxbnb._src.quant.weights import QuantizedArray

__all__ = ["QuantizedWeight", "QuantizedLinear", "apply_quantized",
           "check_inputs", "check_fixed_quant_type", "float_weight",
           "replace_modules"]


# Flax's own serializer (`flax.serialization.to_bytes`, `to_state_dict`)
# handles variables that hold quantized weights.
serialization.register()


class QuantizedWeight(nnx.Variable):
  """A frozen quantized weight (a `QuantizedArray`); never a trainable `Param`.

  `nnx.grad`, `nnx.Optimizer(..., wrt=nnx.Param)` and
  `nnx.split(model, nnx.Param)` never see it.
  """


def replace_modules(root: nnx.Module, new_by_id: dict[int, Any]) -> None:
  """Puts `new_by_id[id(old)]` at every place under `root` that holds `old`.

  `nnx.iter_graph` yields a shared module once, at one path; a module held
  by several attributes (a tied embedding, a layer used twice) is replaced
  at each of them here, so the modules stay shared. `root` itself is not
  replaced.
  """
  edges = [(parent, key, new_by_id[id(child)])
           for _, parent in nnx.iter_graph(root)
           if isinstance(parent, nnx.Pytree)
           for key, child in nnx.iter_children(parent)
           if id(child) in new_by_id]
  for parent, key, new in edges:
    if isinstance(parent, (nnx.List, nnx.Dict)):
      parent[key] = new
    else:
      setattr(parent, key, new)


def check_fixed_quant_type(fixed, quant_type, fn):
  """A fixed-type layer (NF4/FP4) takes only its own `quant_type`."""
  if fixed is not None and quant_type != fixed:
    raise ValueError(
        f"{fn}: `quant_type` must be {fixed!r} (or left out), got "
        f"{quant_type!r}."
    )


def _is_array(x) -> bool:
  """A jax (or traced) or numpy array; not a `QuantizedArray`."""
  return isinstance(x, (jax.Array, np.ndarray))


def _describe(x) -> str:
  """`x` as an error message shows it: an array's dtype and shape, else its
  type."""
  if _is_array(x):
    dtype = jnp.dtype(x.dtype).name
    article = "an" if dtype.startswith("i") else "a"
    return f"{article} {dtype} array of shape {list(x.shape)}"
  return type(x).__name__


def _is_float_array(x) -> bool:
  return _is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


def float_weight(weight, in_features: int, out_features: int, fn: str,
                 quantized: str) -> jax.Array:
  """A float `weight` given to a quantized linear, checked: a float array of
  shape `[out_features, in_features]` (the layer quantizes it).

  `quantized` names the layer's own weight type, with its article ("a
  Params4bit"), which the caller has already ruled out.

  Raises:
    TypeError: `weight` is neither a float array nor the layer's
      `quantized` weight type.
    ValueError: a float `weight` of another shape.
  """
  if not _is_float_array(weight):
    raise TypeError(
        f"{fn}: `weight` must be {quantized} or a float "
        f"[out_features, in_features]=[{out_features}, {in_features}] array, "
        f"got {_describe(weight)}."
    )
  if tuple(weight.shape) != (out_features, in_features):
    raise ValueError(
        f"{fn}: `weight` must have shape [out_features, in_features]="
        f"[{out_features}, {in_features}], got {list(weight.shape)}."
    )
  return jnp.asarray(weight)


def check_inputs(inputs, in_features, fn):
  """`inputs` must be `[..., in_features]` (`in_features` None: any)."""
  shape = tuple(jnp.shape(inputs))
  if not shape or (in_features is not None and shape[-1] != in_features):
    want = "" if in_features is None else f" with in_features={in_features}"
    raise ValueError(
        f"{fn}: `inputs` must have shape [..., in_features]{want}, got shape "
        f"{shape}."
    )


def empty_batch(forward, inputs: jax.Array, out_features: int) -> jax.Array:
  """The `[..., out_features]` zeros a layer returns for an input with no
  rows (as bitsandbytes' layers do), in the dtype `forward` gives a row."""
  row = jax.ShapeDtypeStruct((1, inputs.shape[-1]), inputs.dtype)
  dtype = jax.eval_shape(forward, row).dtype
  return jnp.zeros((*inputs.shape[:-1], out_features), dtype)


def apply_quantized(inputs: jax.Array, weight: QuantizedArray,
                    bias: jax.Array | None, dtype: Any) -> jax.Array:
  """The quantized layer forward shared by linen and NNX layers.

  `dtype=None` infers the compute dtype from the input, the original weight
  dtype and the bias, as Flax's `promote_dtype` does. An input without
  rows gives an empty output.
  """
  if dtype is None:
    dtype = jnp.result_type(inputs.dtype, weight.dtype,
                            *(() if bias is None else (bias.dtype,)))
  if inputs.size == 0:
    return empty_batch(lambda x: apply_quantized(x, weight, bias, dtype),
                       inputs, weight.shape[0])
  return weight.matmul(inputs.astype(dtype),
                       None if bias is None else bias.astype(dtype))


class QuantizedLinear(nnx.Module):
  """Base of the NNX quantized linears: `y = x @ W.T + b`, W frozen.

  Holds `in_features`, `out_features`, `dtype`, `param_dtype`, the weight in
  a `QuantizedWeight` and the float bias in an `nnx.Param` (or None).
  Subclasses build the weight and call `_init_quantized`.
  """

  def _init_quantized(self, in_features: int, out_features: int,
                      weight: QuantizedArray, bias: jax.Array | None, *,
                      use_bias: bool, dtype: Any, param_dtype: Any) -> None:
    name = type(self).__name__
    if tuple(weight.shape) != (out_features, in_features):
      raise ValueError(
          f"{name}: `weight` must have shape "
          f"[out_features, in_features]=[{out_features}, {in_features}], "
          f"got {list(weight.shape)}."
      )
    self._init_linear(in_features, out_features, QuantizedWeight(weight),
                      bias, use_bias=use_bias, dtype=dtype,
                      param_dtype=param_dtype)

  def _init_linear(self, in_features: int, out_features: int,
                   weight: nnx.Variable, bias: jax.Array | None, *,
                   use_bias: bool, dtype: Any, param_dtype: Any) -> None:
    """Sets the attributes every linear of this family has; `weight` is
    the variable that holds it (frozen `QuantizedWeight` or a trainable
    `nnx.Param`)."""
    name = type(self).__name__
    if use_bias and bias is None:
      raise ValueError(f"{name}: use_bias=True needs `bias`.")
    if not use_bias and bias is not None:
      raise ValueError(f"{name}: `bias` must be None with use_bias=False, "
                       f"got {_describe(bias)}.")
    if use_bias:
      if not _is_float_array(bias):
        raise TypeError(f"{name}: `bias` must be a float array of shape "
                        f"(out_features,)=({out_features},), got "
                        f"{_describe(bias)}.")
      if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name}: `bias` must have shape (out_features,)="
                         f"({out_features},), got {tuple(bias.shape)}.")
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.weight = weight
    self.bias = nnx.Param(jnp.asarray(bias)) if use_bias else nnx.data(None)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the layer to `inputs` `[..., in_features]`."""
    check_inputs(inputs, self.in_features, type(self).__name__)
    bias = self.bias[...] if self.bias is not None else None
    return apply_quantized(inputs, self.weight.get_value(), bias, self.dtype)
