"""Flax NNX 4-bit layers: `Linear4bit`, `LinearNF4`, `LinearFP4`.

Built on `QuantizedLinear` (layers/common.py): the packed weight lives in a
`QuantizedWeight` variable, which is not an `nnx.Param`: `nnx.grad`, `nnx.Optimizer` and `nnx.split(model, nnx.Param)`
never see it. Gradients flow to the activations and the float bias.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbnb._src.layers.common import QuantizedLinear
from jaxbnb._src.layers.common import check_fixed_quant_type
from jaxbnb._src.layers.common import float_weight
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.weights import Params4bit

__all__ = ["Linear4bit", "LinearNF4", "LinearFP4"]

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


def _check_config(quant_type, blocksize, fn):
  validation.check_quant_type(quant_type, fn=fn)
  validation.check_blocksize(blocksize, validation.BLOCKSIZES_4BIT, fn=fn)


class Linear4bit(QuantizedLinear):
  """A 4-bit drop-in for `nnx.Linear`: `y = x @ W.T + b` with W in NF4/FP4.

  The weight is stored exactly as bitsandbytes' `Linear4bit` stores it: the
  `[out_features, in_features]` matrix (the transpose of an NNX kernel),
  blockwise quantized. Defaults follow bitsandbytes (`quant_type="fp4"`,
  `blocksize=64`, `compress_statistics=True`).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import Linear4bit
    >>> layer = Linear4bit(64, 32, quant_type="nf4", rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 64))).shape
    (2, 32)
    >>> layer.weight.get_value().quant_state.shape
    (32, 64)

  Args:
    in_features: input features.
    out_features: output features.
    use_bias: whether to add a bias.
    dtype: computation dtype (bitsandbytes' `compute_dtype`); None infers it
      from the input, the bias and the original weight dtype.
    param_dtype: dtype of the initial float kernel and of the bias.
    quant_type: "nf4" or "fp4".
    blocksize: elements per absmax block (32 ... 4096).
    compress_statistics: double-quantize the absmax.
    quant_storage: dtype the packed bytes are viewed as.
    kernel_init: initializer of the float `[in, out]` kernel (quantized
      right away).
    bias_init: initializer of the bias.
    weight: an existing weight `[out_features, in_features]` (then the
      kernel is not initialized and `rngs` may be None): a `Params4bit`,
      used as it is, or a float array, quantized now with `quant_type`,
      `blocksize`, `compress_statistics` and `quant_storage` (as
      `Linear8bitLt(has_fp16_weights=False)` quantizes a float weight).
    bias: an existing float bias `[out_features]` (with `weight`; None
      when `use_bias=False`).
    rngs: random number generators.

  Raises:
    TypeError: a `weight` that is neither a `Params4bit` nor a float array
      (an `Int8Params`, an integer array), or a `bias` that is not a float
      array.
    ValueError: for a bad quant_type, blocksize, a `weight` whose shape is
      not `[out_features, in_features]`, a `bias` whose shape is not
      `[out_features]` (or given with `use_bias=False`), missing `rngs`, or
      for `LinearNF4`/`LinearFP4` a `quant_type` or `weight` of the other
      type.
  """

  _default_quant_type = "fp4"
  _fixed_quant_type = None  # "nf4" / "fp4" in LinearNF4 / LinearFP4

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      quant_type: str = "fp4",
      blocksize: int = 64,
      compress_statistics: bool = True,
      quant_storage: Any = jnp.uint8,
      kernel_init=default_kernel_init,
      bias_init=default_bias_init,
      weight: Params4bit | None = None,
      bias: jax.Array | None = None,
      rngs: nnx.Rngs | None = None,
  ):
    name = type(self).__name__
    in_features = validation.check_positive_int(in_features, "in_features",
                                                name)
    out_features = validation.check_positive_int(out_features,
                                                 "out_features", name)
    _check_config(quant_type, blocksize, name)
    if weight is not None and not isinstance(weight, Params4bit):
      weight = Params4bit.from_float(
          float_weight(weight, in_features, out_features, name,
                       "a Params4bit"),
          blocksize=blocksize, quant_type=quant_type,
          compress_statistics=compress_statistics,
          quant_storage=quant_storage)
    if weight is None:
      if rngs is None:
        raise ValueError(
            f"{name}: `rngs` is required unless `weight` is given."
        )
      kernel = kernel_init(rngs.params(), (in_features, out_features),
                           param_dtype)
      weight = Params4bit.from_float(
          kernel.T, blocksize=blocksize, quant_type=quant_type,
          compress_statistics=compress_statistics,
          quant_storage=quant_storage)
      if use_bias:
        bias = bias_init(rngs.params(), (out_features,), param_dtype)
    elif (self._fixed_quant_type is not None
          and tuple(weight.shape) == (out_features, in_features)
          and weight.quant_state.quant_type != self._fixed_quant_type):
      raise ValueError(
          f"{name}: `weight` must be quantized with quant_type "
          f"{self._fixed_quant_type!r}, got "
          f"{weight.quant_state.quant_type!r}."
      )
    self._init_quantized(in_features, out_features, weight, bias,
                         use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, **kwargs) -> "Linear4bit":
    """Quantizes an existing `nnx.Linear` (its kernel is `[in, out]`).

    Args:
      linear: the float layer.
      **kwargs: `quant_type`, `blocksize`, `compress_statistics`,
        `quant_storage`, `dtype`.

    Returns:
      The 4-bit layer with the same bias.

    Raises:
      ValueError: if `quant_type` conflicts with a fixed-type class
        (`LinearNF4.from_linear(..., quant_type="fp4")`).
    """
    if "quant_type" in kwargs:
      check_fixed_quant_type(cls._fixed_quant_type, kwargs["quant_type"],
                             f"{cls.__name__}.from_linear")
    kernel = linear.kernel[...]
    q_kwargs = {k: kwargs.pop(k) for k in ("quant_type", "blocksize",
                                           "compress_statistics",
                                           "quant_storage") if k in kwargs}
    q_kwargs.setdefault("quant_type", cls._default_quant_type)
    q_kwargs.setdefault("compress_statistics", True)
    weight = Params4bit.from_float(kernel.T, **q_kwargs)
    use_bias = linear.bias is not None
    bias = linear.bias[...] if use_bias else None
    kwargs.setdefault("dtype", linear.dtype)
    kwargs.setdefault("param_dtype", linear.param_dtype)
    return cls(linear.in_features, linear.out_features, use_bias=use_bias,
               weight=weight, bias=bias, **kwargs)

class LinearNF4(Linear4bit):
  """`Linear4bit` with `quant_type="nf4"` (another quant_type is an error)."""

  _default_quant_type = "nf4"
  _fixed_quant_type = "nf4"

  def __init__(self, in_features: int, out_features: int, **kwargs):
    check_fixed_quant_type("nf4", kwargs.get("quant_type", "nf4"),
                           type(self).__name__)
    kwargs["quant_type"] = "nf4"
    super().__init__(in_features, out_features, **kwargs)


class LinearFP4(Linear4bit):
  """`Linear4bit` with `quant_type="fp4"` (another quant_type is an error)."""

  _fixed_quant_type = "fp4"

  def __init__(self, in_features: int, out_features: int, **kwargs):
    check_fixed_quant_type("fp4", kwargs.get("quant_type", "fp4"),
                           type(self).__name__)
    kwargs["quant_type"] = "fp4"
    super().__init__(in_features, out_features, **kwargs)
