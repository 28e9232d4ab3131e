"""Flax Linen LLM.int8 layer: `Dense8bit`, a drop-in for `flax.linen.Dense`.

With `has_fp16_weights=False` the weight is an `Int8Params` `[features,
in]` in the variable collection `"quantized"` (as `Dense4bit`'s), so
`jax.grad` over `variables["params"]` and Optax never touch it. With
`has_fp16_weights=True` (bitsandbytes' default) the float kernel stays in
`"params"` as Flax's `[in, features]` `kernel` and is quantized in every
forward. The float bias is always in `"params"`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxbnb._src.layers.common import check_inputs
from jaxbnb._src.layers.dense4bit import QUANTIZED
from jaxbnb._src.layers.linear8bit import check_threshold
from jaxbnb._src.layers.linear8bit import forward_8bit
from jaxbnb._src.quant import int8
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.weights import Int8Params

__all__ = ["Dense8bit"]

default_kernel_init = nn.initializers.lecun_normal()


class Dense8bit(nn.Module):
  """An LLM.int8 `nn.Dense`: `y = x @ W.T + b` with W in row-wise int8.

  bitsandbytes' `Linear8bitLt` forward (`jaxbnb.functional.matmul_8bit`):
  the activations go through float16 and row-wise int8, columns with an
  `|x| >= threshold` through a 16-bit matmul.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from jaxbnb.linen import Dense8bit
    >>> layer = Dense8bit(features=32, has_fp16_weights=False, threshold=6.0)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 64)))
    >>> sorted(variables), variables["quantized"]["kernel"].CB.shape
    (['params', 'quantized'], (32, 64))
    >>> layer.apply(variables, jnp.ones((2, 64))).shape
    (2, 32)

  Attributes:
    features: output features.
    use_bias: whether to add a bias.
    has_fp16_weights: True (bitsandbytes' default): a trainable float
      `kernel` `[in, features]` in "params", quantized in every forward;
      False: a frozen `Int8Params` `kernel` `[features, in]` in
      "quantized" (what `quantize_params(..., bits=8)` writes).
    threshold: the outlier threshold (0: no decomposition).
    dtype: computation and output dtype; None keeps the input's dtype, as
      bitsandbytes.
    param_dtype: dtype of the initial float kernel and of the bias.
    kernel_init: initializer of the float `[in, features]` kernel.
    bias_init: initializer of the bias.
  """

  features: int
  use_bias: bool = True
  has_fp16_weights: bool = True
  threshold: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = default_kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the layer to `inputs` `[..., in_features]`.

    Raises:
      TypeError: if the "quantized" kernel is not an `Int8Params`.
      ValueError: a `features` that is not a positive int, a negative
        threshold, a 0-d `inputs`, or a kernel whose shape does not fit
        `features` and the input.
    """
    name = type(self).__name__
    threshold = check_threshold(self.threshold, name)
    features = validation.check_positive_int(self.features, "features", name)
    check_inputs(inputs, None, name)
    in_features = inputs.shape[-1]
    if self.has_fp16_weights:
      kernel = self.param("kernel", self.kernel_init,
                          (in_features, features), self.param_dtype)
      weight = kernel.T
    else:

      def init_weight():
        kernel = self.kernel_init(self.make_rng("params"),
                                  (in_features, features),
                                  self.param_dtype)
        return int8.quantize_int8_weight(kernel.T)

      weight = self.variable(QUANTIZED, "kernel", init_weight).value
      if not isinstance(weight, Int8Params):
        raise TypeError(
            f"{name}: the quantized kernel must be an Int8Params, got "
            f"{type(weight).__name__}.")
    if tuple(weight.shape) != (features, in_features):
      raise ValueError(
          f"{name}: the kernel has shape [out, in]={list(weight.shape)}, "
          f"expected [features, in_features]=[{features}, "
          f"{in_features}].")
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,),
                        self.param_dtype)
    return forward_8bit(inputs, weight, bias, self.dtype, threshold)
