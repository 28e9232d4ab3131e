"""Flax NNX LLM.int8 layer: `Linear8bitLt`, bitsandbytes' `Linear8bitLt`.

Two weight modes, as bitsandbytes:

* `has_fp16_weights=False` (what transformers' `load_in_8bit` builds): the
  weight is a frozen `Int8Params` in a `QuantizedWeight` variable (not an
  `nnx.Param`), so optimizers and `nnx.grad` never touch it; gradients
  flow to the activations and the bias.
* `has_fp16_weights=True` (bitsandbytes' default): the weight is a float
  `nnx.Param` `[out, in]`, quantized to int8 in every forward and trained
  straight through the quantizer.

Both compute `jaxbnb.functional.matmul_8bit`'s forward (float16
activations, int8 GEMM, outlier columns in 16-bit above `threshold`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbnb._src.layers.common import QuantizedLinear
from jaxbnb._src.layers.common import QuantizedWeight
from jaxbnb._src.layers.common import check_inputs
from jaxbnb._src.layers.common import empty_batch
from jaxbnb._src.layers.common import float_weight
from jaxbnb._src.layers.linear import Linear
from jaxbnb._src.quant import int8
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.weights import Int8Params

__all__ = ["Linear8bitLt"]

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


def check_threshold(threshold, fn: str) -> float:
  """`threshold` must be a static float >= 0 (numpy scalars too)."""
  return validation.check_threshold(threshold, fn)


def forward_8bit(inputs: jax.Array, weight: jax.Array | Int8Params,
                 bias: jax.Array | None, dtype: Any,
                 threshold: float) -> jax.Array:
  """The 8-bit layer forward shared by `Linear8bitLt` and `Dense8bit`.

  `dtype=None` computes in (and returns) the input's dtype, as
  bitsandbytes' `Linear8bitLt`; otherwise the input is cast to `dtype`
  first. A float `weight` `[out, in]` is quantized on the fly.
  """
  x = inputs if dtype is None else inputs.astype(dtype)
  if x.size == 0:  # no rows: an empty output, as bitsandbytes' layer
    return empty_batch(
        lambda r: forward_8bit(r, weight, bias, dtype, threshold), x,
        weight.shape[0])
  if bias is not None:  # bitsandbytes' layer casts its bias to x's dtype
    bias = bias.astype(x.dtype)
  if isinstance(weight, Int8Params):
    return int8.matmul_8bit(x, weight, bias, threshold=threshold)
  return int8.matmul_8bit_fp16_weights(x, weight, bias, threshold=threshold)


class Linear8bitLt(QuantizedLinear):
  """An LLM.int8 drop-in for `nnx.Linear`: `y = x @ W.T + b`, W in int8.

  The weight is stored as bitsandbytes' `Linear8bitLt` stores it:
  `[out_features, in_features]` (the transpose of an NNX kernel). With
  `has_fp16_weights=False` it is a frozen `Int8Params` (`CB` int8, `SCB`
  float32 row absmax, quantized from the float16-cast weight as
  bitsandbytes' `Int8Params`); with `has_fp16_weights=True` (bitsandbytes'
  default) a trainable float `nnx.Param`, quantized in every forward.
  Activations are quantized row-wise to int8 on every call; with
  `threshold > 0` columns holding an `|x| >= threshold` go through a
  16-bit matmul instead (LLM.int8's outlier decomposition).

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import Linear8bitLt
    >>> layer = Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0,
    ...                      rngs=nnx.Rngs(0))
    >>> y = layer(jnp.ones((2, 64), jnp.bfloat16))
    >>> y.shape, y.dtype, layer.weight.get_value().CB.dtype
    ((2, 32), dtype(bfloat16), dtype('int8'))

  Args:
    in_features: input features.
    out_features: output features.
    use_bias: whether to add a bias.
    has_fp16_weights: keep a trainable float weight (bitsandbytes' default,
      True) or a frozen int8 one (False, transformers' `load_in_8bit`).
    threshold: the outlier threshold (0 disables the decomposition,
      bitsandbytes' default; transformers uses 6.0).
    dtype: computation dtype: the input is cast to it and the output is in
      it. None (default) keeps the input's dtype, as bitsandbytes. The int8
      path runs through float16 in any case.
    param_dtype: dtype of the float weight (`has_fp16_weights=True`) and
      of the bias.
    kernel_init: initializer of the float `[in, out]` kernel (transposed
      and, for a frozen layer, quantized right away).
    bias_init: initializer of the bias.
    weight: an existing weight `[out_features, in_features]` (then the
      kernel is not initialized and `rngs` may be None): an `Int8Params`
      (frozen layer), used as it is, or a float array, kept as the
      trainable weight (`has_fp16_weights=True`) or quantized now
      (`has_fp16_weights=False`; as `Linear4bit` quantizes a float weight).
    bias: an existing float bias `[out_features]` (with `weight`; None
      when `use_bias=False`).
    rngs: random number generators.

  Raises:
    TypeError: a `weight` that is neither an `Int8Params` nor a float array
      (a `Params4bit`, an integer array), or a `bias` that is not a float
      array.
    ValueError: a negative threshold, a `weight` whose shape is not
      `[out_features, in_features]`, a `bias` whose shape is not
      `[out_features]` (or given with `use_bias=False`), an `Int8Params`
      with `has_fp16_weights=True`, or missing `rngs`.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = True,
      has_fp16_weights: bool = True,
      threshold: float = 0.0,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      kernel_init=default_kernel_init,
      bias_init=default_bias_init,
      weight: jax.Array | Int8Params | None = None,
      bias: jax.Array | None = None,
      rngs: nnx.Rngs | None = None,
  ):
    name = type(self).__name__
    in_features = validation.check_positive_int(in_features, "in_features",
                                                name)
    out_features = validation.check_positive_int(out_features,
                                                 "out_features", name)
    threshold = check_threshold(threshold, name)
    if weight is None:
      if rngs is None:
        raise ValueError(f"{name}: `rngs` is required unless `weight` is "
                         "given.")
      kernel = kernel_init(rngs.params(), (in_features, out_features),
                           param_dtype)
      weight = kernel.T
      if use_bias:
        bias = bias_init(rngs.params(), (out_features,), param_dtype)
    if isinstance(weight, Int8Params):
      if has_fp16_weights:
        raise ValueError(
            f"{name}: an Int8Params `weight` needs has_fp16_weights=False "
            "(a trainable layer holds a float weight).")
    else:
      weight = float_weight(weight, in_features, out_features, name,
                            "an Int8Params")
      if not has_fp16_weights:
        weight = int8.quantize_int8_weight(weight)
    self.has_fp16_weights = has_fp16_weights
    self.threshold = threshold
    if has_fp16_weights:
      self._init_linear(in_features, out_features, nnx.Param(weight), bias,
                        use_bias=use_bias, dtype=dtype,
                        param_dtype=param_dtype)
    else:
      self._init_quantized(in_features, out_features, weight, bias,
                           use_bias=use_bias, dtype=dtype,
                           param_dtype=param_dtype)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the layer to `inputs` `[..., in_features]`."""
    check_inputs(inputs, self.in_features, type(self).__name__)
    bias = self.bias[...] if self.bias is not None else None
    if isinstance(self.weight, QuantizedWeight):
      weight = self.weight.get_value()
    else:
      weight = self.weight[...]
    return forward_8bit(inputs, weight, bias, self.dtype, self.threshold)

  @classmethod
  def from_linear(cls, linear: nnx.Module, *, threshold: float = 0.0,
                  has_fp16_weights: bool = False,
                  **kwargs) -> "Linear8bitLt":
    """An 8-bit layer with the weight and bias of a float linear.

    Args:
      linear: an `nnx.Linear` (kernel `[in, out]`) or a jaxbnb `Linear`
        (weight `[out, in]`).
      threshold: the outlier threshold.
      has_fp16_weights: False (default) quantizes the weight now and
        freezes it, as `load_in_8bit`; True keeps it as a trainable float.
      **kwargs: `dtype`, `param_dtype` (default: the linear's).

    Returns:
      The `Linear8bitLt` with the same bias.

    Raises:
      TypeError: `linear` is neither an `nnx.Linear` nor a jaxbnb `Linear`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbnb.nnx import Linear8bitLt
      >>> float_layer = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
      >>> layer = Linear8bitLt.from_linear(float_layer, threshold=6.0)
      >>> layer.has_fp16_weights, layer.weight.get_value().shape
      (False, (8, 16))
    """
    if isinstance(linear, nnx.Linear):
      weight = linear.kernel[...].T
      kwargs.setdefault("param_dtype", linear.param_dtype)
    elif isinstance(linear, Linear):
      weight = linear.weight[...]
      kwargs.setdefault("param_dtype", weight.dtype)
    else:
      raise TypeError(
          f"{cls.__name__}.from_linear: `linear` must be an nnx.Linear or a "
          f"jaxbnb Linear, got {type(linear).__name__}.")
    kwargs.setdefault("dtype", linear.dtype)
    use_bias = linear.bias is not None
    bias = linear.bias[...] if use_bias else None
    return cls(linear.in_features, linear.out_features, use_bias=use_bias,
               has_fp16_weights=has_fp16_weights, threshold=threshold,
               weight=weight, bias=bias, **kwargs)
