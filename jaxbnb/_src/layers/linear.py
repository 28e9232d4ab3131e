"""The float linear of the models: PyTorch's `[out, in]` weight orientation.

Hugging Face checkpoints store `weight` as `[out_features, in_features]`;
keeping that orientation makes every model path equal to its checkpoint name
and lets a quantized linear replace a float one without a transpose.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Linear", "precision_for"]


def precision_for(dtype: Any) -> jax.lax.Precision | None:
  """float32 computes in true float32 (transformers' default), not TF32.

  XLA multiplies float32 matrices in TF32 on NVIDIA GPUs unless asked for
  `HIGHEST`; 16-bit dtypes keep the default. A user who asks for TF32 (or any
  precision) with `jax.default_matmul_precision(...)` gets what they asked.
  """
  if jax.config.jax_default_matmul_precision is not None:
    return None
  if dtype is not None and jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return None


class Linear(nnx.Module):
  """Float linear `y = x @ weight.T + bias` with `.weight` `[out, in]`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import Linear
    >>> layer = Linear(8, 4, use_bias=True, dtype=jnp.float32,
    ...                param_dtype=jnp.float32, init_std=0.02,
    ...                rngs=nnx.Rngs(0))
    >>> layer.weight.shape, layer(jnp.ones((2, 8))).shape
    ((4, 8), (2, 4))

  Args:
    in_features: input features.
    out_features: output features.
    use_bias: whether to add a (zero-initialised) bias.
    dtype: computation dtype.
    param_dtype: dtype of the weight and bias.
    init_std: standard deviation of the normal weight initializer.
    rngs: random number generators.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
               dtype: Any, param_dtype: Any, init_std: float,
               rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.weight = nnx.Param(nnx.initializers.normal(init_std)(
        rngs.params(), (out_features, in_features), param_dtype))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype))
                 if use_bias else nnx.data(None))

  def __call__(self, x: jax.Array, *, float32_out: bool = False) -> jax.Array:
    """`x @ weight.T + bias`; `float32_out` keeps the float32 accumulator."""
    w = self.weight[...].astype(self.dtype)
    y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), w,
                   precision=precision_for(self.dtype),
                   preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y if float32_out else y.astype(self.dtype)
