"""PEFT's LoRA `bias` option: the model's biases trained beside the adapters.

`LoraConfig(bias="all")` makes every bias of the model trainable,
`bias="lora_only"` the biases of the adapted linears; PEFT saves them in
the adapter file under the model's own names, so an adapted linear's bias
is `<path>.base_layer.bias` and another module's `<path>.bias`. jaxbnb
models keep those names, so the dotted variable path is the key.

The selected biases become `LoRABias` variables, a kind of
`nnx.LoRAParam`: `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains
them with the adapters, and merging or unloading turns them back into
`nnx.Param`s holding the trained values (PEFT trains them in place).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

__all__ = ["BIASES", "LoRABias", "train_biases", "trained_biases"]

# LoraConfig.bias values.
BIASES = ("none", "all", "lora_only")


class LoRABias(nnx.LoRAParam):
  """A model bias trained beside the LoRA adapters (`LoRAConfig.bias`).

  An `nnx.LoRAParam`, so `wrt=nnx.LoRAParam` selects it; its own type
  keeps it apart from the modules trained whole (`modules_to_save`).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.lora import LoRABias
    >>> isinstance(LoRABias(jnp.zeros(3)), nnx.LoRAParam)
    True
  """


def _path(path: tuple[Any, ...]) -> str:
  return ".".join(map(str, path))


def _bias_of(module: Any) -> nnx.Variable | None:
  var = vars(module).get("bias") if isinstance(module, nnx.Module) else None
  return var if isinstance(var, nnx.Variable) else None


def train_biases(model: nnx.Module, bias: str,
                 adapted: list[nnx.Module]) -> None:
  """Makes the biases `bias` selects `LoRABias`es, in place: every
  `nnx.Param` named `bias` ("all"), or those of the `adapted` linears'
  base layers ("lora_only"); none for "none". A bias that is a
  `LoRAParam` already (a module trained whole) stays as it is."""
  if bias not in BIASES:
    raise ValueError(f"bias: expected one of {BIASES}, got {bias!r}")
  if bias == "none":
    return
  owners = ([node for _, node in nnx.iter_graph(model)] if bias == "all"
            else [layer.base_layer for layer in adapted])
  for module in owners:
    var = _bias_of(module)
    if type(var) is nnx.Param:  # pylint: disable=unidiomatic-typecheck
      module.bias = LoRABias(var.get_value(), **var.get_metadata())


def trained_biases(model: nnx.Module) -> dict[str, LoRABias]:
  """`{dotted variable path: variable}` of the model's `LoRABias`es, in
  graph order (an adapted linear's as `<path>.base_layer.bias`)."""
  return {_path(p): node for p, node in nnx.iter_graph(model)
          if isinstance(node, LoRABias)}
