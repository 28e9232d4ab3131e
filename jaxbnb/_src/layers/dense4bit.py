"""Flax Linen 4-bit layer: `Dense4bit`, a drop-in for `flax.linen.Dense`.

The packed weight is a `Params4bit` in the variable collection
`"quantized"` (not `"params"`), so `jax.grad` over `variables["params"]` and
Optax never touch it; the float bias stays in `"params"`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxbnb._src.layers.common import apply_quantized
from jaxbnb._src.layers.common import check_fixed_quant_type
from jaxbnb._src.layers.common import check_inputs
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.weights import Params4bit

__all__ = ["QUANTIZED", "Dense4bit", "DenseNF4", "DenseFP4"]

QUANTIZED = "quantized"

default_kernel_init = nn.initializers.lecun_normal()


class Dense4bit(nn.Module):
  """A 4-bit `nn.Dense`: `y = x @ W.T + b` with W stored in NF4/FP4.

  `init` draws the float kernel with `kernel_init` and quantizes it at once;
  the weight is stored as bitsandbytes' `Linear4bit` stores it (the
  `[features, in_features]` transpose of a Flax kernel).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from jaxbnb.linen import Dense4bit
    >>> layer = Dense4bit(features=32, quant_type="nf4")
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 64)))
    >>> sorted(variables), variables["params"]["bias"].shape
    (['params', 'quantized'], (32,))
    >>> layer.apply(variables, jnp.ones((2, 64))).shape
    (2, 32)

  Attributes:
    features: output features.
    use_bias: whether to add a bias.
    dtype: computation dtype (bitsandbytes' `compute_dtype`); None infers it
      from the input, bias and original weight dtype.
    param_dtype: dtype of the initial float kernel and of the bias.
    quant_type: "nf4" or "fp4" (bitsandbytes' default "fp4").
    blocksize: elements per absmax block (32 ... 4096).
    compress_statistics: double-quantize the absmax.
    quant_storage: dtype the packed bytes are viewed as.
    kernel_init: initializer of the float `[in, out]` kernel.
    bias_init: initializer of the bias.
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  quant_type: str = "fp4"
  blocksize: int = 64
  compress_statistics: bool = True
  quant_storage: Any = jnp.uint8
  kernel_init: Callable[..., jax.Array] = default_kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  _fixed_quant_type = None  # "nf4" / "fp4" in DenseNF4 / DenseFP4

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the layer to `inputs` `[..., in_features]`.

    Raises:
      TypeError: if the "quantized" kernel is not a `Params4bit`.
      ValueError: for a `features` that is not a positive int, a bad
        quant_type or blocksize, a 0-d `inputs`, a
        quantized kernel whose shape is not `[features, in_features]`, or
        (for `DenseNF4`/`DenseFP4`) a `quant_type` or quantized kernel of
        the other type.
    """
    name = type(self).__name__
    fixed = self._fixed_quant_type
    check_fixed_quant_type(fixed, self.quant_type, name)
    validation.check_quant_type(self.quant_type, fn=name)
    validation.check_blocksize(self.blocksize, validation.BLOCKSIZES_4BIT,
                               fn=name)
    features = validation.check_positive_int(self.features, "features", name)
    check_inputs(inputs, None, name)
    in_features = inputs.shape[-1]

    def init_weight():
      kernel = self.kernel_init(self.make_rng("params"),
                                (in_features, features),
                                self.param_dtype)
      return Params4bit.from_float(
          kernel.T, blocksize=self.blocksize, quant_type=self.quant_type,
          compress_statistics=self.compress_statistics,
          quant_storage=self.quant_storage)

    w: Params4bit = self.variable(QUANTIZED, "kernel", init_weight).value
    if not isinstance(w, Params4bit):
      raise TypeError(
          f"{name}: the quantized kernel must be a Params4bit, got "
          f"{type(w).__name__}."
      )
    if tuple(w.shape) != (features, in_features):
      raise ValueError(
          f"{name}: the quantized kernel has shape {list(w.shape)}, expected "
          f"[features, in_features]=[{features}, {in_features}]."
      )
    if fixed is not None and w.quant_state.quant_type != fixed:
      raise ValueError(
          f"{name}: the quantized kernel must have quant_type {fixed!r}, got "
          f"{w.quant_state.quant_type!r}."
      )
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,),
                        self.param_dtype)
    return apply_quantized(inputs, w, bias, self.dtype)


class DenseNF4(Dense4bit):
  """`Dense4bit` with `quant_type="nf4"` (another quant_type is an error)."""

  quant_type: str = "nf4"
  _fixed_quant_type = "nf4"


class DenseFP4(Dense4bit):
  """`Dense4bit` with `quant_type="fp4"` (another quant_type is an error)."""

  quant_type: str = "fp4"
  _fixed_quant_type = "fp4"
