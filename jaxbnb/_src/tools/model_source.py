"""A loaded model seen as a checkpoint, so `from_pretrained` can re-read it.

`jaxbnb merge --quant nf4` folds an adapter into a float model and then
quantizes the merged weights: `from_pretrained(ModelSource(merged),
quantization=...)` does that with the same code (and the same skip list and
tensor-by-tensor quantization) as loading a checkpoint from disk.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb import models
from jaxbnb.functional import QuantizedArray

__all__ = ["ModelSource"]


class ModelSource:
  """A float `LlamaForCausalLM` as a `jaxbnb.convert.CheckpointSource`.

  Args:
    model: a model whose weights are all float (no quantized linears, no
      adapters).
    path: the checkpoint it came from: `from_pretrained` records it, so a
      model loaded from this source is never saved over that checkpoint.

  Raises:
    ValueError: the model holds a quantized weight.

  Examples:
    >>> from flax import nnx
    >>> from jaxbnb import models
    >>> cfg = models.LlamaConfig(vocab_size=64, hidden_size=64,
    ...                          intermediate_size=128, num_hidden_layers=1,
    ...                          num_attention_heads=4, num_key_value_heads=2)
    >>> src = ModelSource(models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)),
    ...                   "in-memory")
    >>> w = "model.layers.0.mlp.up_proj.weight"
    >>> src.shape(w), src.dtype(w), src.load(w).shape, len(src.names())
    ((128, 64), dtype('float32'), (128, 64), 12)

    `jaxbnb.convert.from_pretrained(src, quantization=...)` then loads it
    as it loads a checkpoint folder, quantizing tensor by tensor.
  """

  def __init__(self, model: models.LlamaForCausalLM, path: str):
    self.path = path
    self._vars = {}
    for name, var in model.iter_variables():
      value = var.get_value()
      if isinstance(value, QuantizedArray):
        raise ValueError(f"ModelSource: {name} is quantized; merge into a "
                         "float model.")
      self._vars[name] = value
    self.config: dict[str, Any] = model.config.to_hf()
    self.config["torch_dtype"] = jnp.dtype(model.param_dtype).name
    self.config["dtype"] = jnp.dtype(model.param_dtype).name

  @property
  def quantization_config(self) -> dict[str, Any] | None:
    return None

  def names(self) -> list[str]:
    return list(self._vars)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._vars[name].shape)

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(self._vars[name].dtype)

  def load(self, name: str) -> np.ndarray:
    return np.asarray(jax.device_get(self._vars[name]))

  def describe(self, name: str) -> str:
    return f"{self.path} (in memory):{name}"
