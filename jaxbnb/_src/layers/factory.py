"""The linear factory: one function builds every linear of a model.

`make_linear` turns a `QuantizationConfig` and a module path into the layer
that path gets: a float `Linear`, a 4-bit `Linear4bit` or an LLM.int8
`Linear8bitLt`. `quantize_weight` is the same decision for a single
float weight (the converters use it). Adding a layer type means one branch
here and a new file beside this one.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxbnb._src.layers.linear import Linear
from jaxbnb._src.layers.linear4bit import Linear4bit
from jaxbnb._src.layers.linear8bit import Linear8bitLt
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.quant import int8
from jaxbnb._src.quant.weights import Params4bit
from jaxbnb._src.quant.weights import QuantizedArray

__all__ = ["weight_format", "make_linear", "quantize_weight"]

def weight_format(quantization: QuantizationConfig | None,
                  path: str) -> str | None:
  """The weight format of the linear at dotted `path`: None (float),
  "4bit" or "int8".

  Examples:
    >>> from jaxbnb.models import QuantizationConfig
    >>> from jaxbnb.nnx import weight_format
    >>> q = QuantizationConfig.nf4()
    >>> weight_format(q, "model.layers.0.mlp.up_proj"), weight_format(q, "lm_head")
    ('4bit', None)
  """
  if quantization is None or quantization.skips(path):
    return None
  return "int8" if quantization.load_in_8bit else "4bit"


def _params4bit_kwargs(q: QuantizationConfig) -> dict[str, Any]:
  """The one mapping from `QuantizationConfig` to 4-bit weight arguments."""
  return dict(quant_type=q.bnb_4bit_quant_type,
              blocksize=q.bnb_4bit_blocksize,
              compress_statistics=q.bnb_4bit_use_double_quant,
              quant_storage=q.quant_storage)


def quantize_weight(quantization: QuantizationConfig | None, path: str,
                    weight: jax.Array) -> jax.Array | QuantizedArray:
  """The float `[out, in]` weight of the linear at `path` as it is stored.

  Returns `weight` unchanged where the path stays in full precision, a
  `Params4bit` for `load_in_4bit` and, for `load_in_8bit`, the
  `Int8Params` bitsandbytes' `Int8Params` makes (row-wise int8 of the
  float16-cast weight).
  """
  fmt = weight_format(quantization, path)
  if fmt is None:
    return weight
  if fmt == "4bit":
    return Params4bit.from_float(weight, **_params4bit_kwargs(quantization))
  return int8.quantize_int8_weight(weight)


def make_linear(in_features: int, out_features: int, *, use_bias: bool,
                path: str, dtype: Any, param_dtype: Any, init_std: float,
                quantization: QuantizationConfig | None,
                rngs: nnx.Rngs) -> nnx.Module:
  """The linear layer for the module at dotted `path`.

  Args:
    in_features: input features.
    out_features: output features.
    use_bias: whether the layer has a bias.
    path: the Hugging Face module path, e.g. "model.layers.0.mlp.up_proj".
    dtype: computation dtype of a float layer and of an 8-bit layer's
      input and output (a 4-bit layer computes in
      `quantization.compute_dtype`).
    param_dtype: dtype of float weights and biases.
    init_std: standard deviation of the normal weight initializer.
    quantization: the model's `QuantizationConfig`, or None for float.
    rngs: random number generators.

  Returns:
    A `Linear`, a `Linear4bit` or, for `load_in_8bit`, a frozen
    `Linear8bitLt` (`has_fp16_weights=False`, `threshold =
    quantization.llm_int8_threshold`; `llm_int8_has_fp16_weight` is
    recorded only, not honoured). Every layer takes `[..., in_features]`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.models import QuantizationConfig
    >>> from jaxbnb.nnx import make_linear
    >>> layer = make_linear(64, 32, use_bias=False, path="mlp.up_proj",
    ...                     dtype=jnp.float32, param_dtype=jnp.float32,
    ...                     init_std=0.02, rngs=nnx.Rngs(0),
    ...                     quantization=QuantizationConfig.nf4())
    >>> type(layer).__name__
    'Linear4bit'
  """
  fmt = weight_format(quantization, path)
  if fmt is None:
    return Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                  param_dtype=param_dtype, init_std=init_std, rngs=rngs)
  if fmt == "4bit":
    return Linear4bit(
        in_features, out_features, use_bias=use_bias,
        dtype=quantization.compute_dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(init_std), rngs=rngs,
        **_params4bit_kwargs(quantization))
  return Linear8bitLt(
      in_features, out_features, use_bias=use_bias, has_fp16_weights=False,
      threshold=quantization.llm_int8_threshold, dtype=dtype,
      param_dtype=param_dtype, kernel_init=nnx.initializers.normal(init_std),
      rngs=rngs)
