"""PEFT's `modules_to_save`: whole modules trained beside the adapters.

PEFT wraps each module whose name ends with a `modules_to_save` entry (a
plain suffix test, `"norm"` selects `model.norm` and every
`input_layernorm`) in a `ModulesToSaveWrapper` holding the frozen original
and a trainable copy; the copy computes, is saved in the adapter file
under the module's own names (`base_model.model.lm_head.weight`) and
replaces the original on `merge_and_unload()` and on `unload()`.

jaxbnb does the same in place: the selected modules' `nnx.Param`s become
`nnx.LoRAParam`s, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains
them with the adapters and `save_adapter` writes them; merging or
unloading turns them back into `nnx.Param`s holding the trained values.
The original values are not kept: PEFT uses them only when the adapter is
disabled, which jaxbnb does not offer. On a model with tied embeddings
(`lm_head` None) selecting the head or the embeddings unties the pair
first (`untie`), as PEFT's copy does: the trained side changes, the other
keeps the original weight.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxbnb._src.layers.linear import Linear
from jaxbnb._src.layers.lora_bias import LoRABias

__all__ = ["find_modules_to_save", "trained_modules", "make_trainable",
           "make_frozen", "module_params", "module_at", "tied_embedding",
           "untie", "TIED_HEAD"]

# A tied model's output head: PEFT's key list has it (transformers makes
# an `lm_head` whose weight is the embedding), jaxbnb's model has None.
TIED_HEAD = "lm_head"


def _path(path: tuple[Any, ...]) -> str:
  return ".".join(map(str, path))


def module_params(module: nnx.Module) -> dict[str, nnx.Param]:
  """`{dotted name under module: variable}` of its `nnx.Param`s
  (`LoRAParam`s included), in graph order."""
  out = {}
  for p, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Param) and p:
      out[_path(p)] = node
  return out


def _frozen_nonfloat(module: nnx.Module) -> str | None:
  """The first variable of `module` that cannot be trained as a float
  weight (a quantized weight, an integer array), or None."""
  for p, node in nnx.iter_graph(module):
    if not isinstance(node, nnx.Variable) or isinstance(
        node, (nnx.RngState, nnx.Cache)):
      continue
    if not isinstance(node, nnx.Param):
      return f"{_path(p)} ({type(node).__name__})"
    value = node.get_value()
    if not jnp.issubdtype(getattr(value, "dtype", jnp.int32), jnp.floating):
      return f"{_path(p)} ({getattr(value, 'dtype', type(value).__name__)})"
  return None


def find_modules_to_save(model: nnx.Module, names: tuple[str, ...] | None,
                         targets: list[str], *, fn: str,
                         missing_ok: bool = False) -> list[str]:
  """The dotted paths of the modules `names` selects, PEFT's way.

  A module is selected when its path ends with an entry (`str.endswith`,
  no "." boundary: PEFT's `_set_trainable`); a selected module's
  submodules are not listed again. The root and paths inside a LoRA
  target are never selected.

  Args:
    model: the model.
    names: `LoRAConfig.modules_to_save`.
    targets: the paths of the LoRA-adapted linears.
    fn: the caller, for messages.
    missing_ok: an entry that selects nothing is a warning (PEFT ignores
      it; loading its files must too), not an error.

  Returns:
    The selected paths, in graph order.

  Raises:
    ValueError: an entry selects nothing (unless `missing_ok`), a LoRA
      target (or a module holding one), or a module with a quantized or
      integer variable.
  """
  if not names:
    return []
  found: list[str] = []
  for p, node in nnx.iter_graph(model):
    path = _path(p)
    if not path or not isinstance(node, nnx.Module):
      continue
    if not any(path.endswith(n) for n in names):
      continue
    for t in targets:
      if t == path or t.startswith(path + ".") or path.startswith(t + "."):
        raise ValueError(
            f"{fn}: modules_to_save={list(names)!r} selects {path!r}, which "
            f"{'is' if t == path else 'overlaps'} the LoRA target {t!r}; a "
            "module is either adapted or fully trained.")
    bad = _frozen_nonfloat(node)
    if bad is not None:
      raise ValueError(
          f"{fn}: modules_to_save={list(names)!r} selects {path!r}, a "
          f"{type(node).__name__} with {bad}: only float modules can be "
          "trained whole (PEFT cannot train a bitsandbytes weight either); "
          "keep the module in float (the quantization config's skip "
          "modules) or adapt it with LoRA instead.")
    found.append(path)
  # the graph is walked children first: keep the outermost selections
  found = [f for f in found if not any(f.startswith(g + ".") for g in found)]
  if tied_embedding(model) is not None and any(
      TIED_HEAD.endswith(n) for n in names):
    # transformers' tied head is a module of its own: PEFT selects it
    found.append(TIED_HEAD)
  missing = [n for n in names if not any(f.endswith(n) for f in found)]
  if missing:
    message = (
        f"{fn}: modules_to_save entries {missing!r} select no module of "
        f"this {type(model).__name__} (a module is selected when its path "
        "ends with the entry, e.g. 'lm_head' or 'model.norm').")
    if not missing_ok:
      raise ValueError(message)
    warnings.warn(message, stacklevel=3)
  return found


def _retype(module: nnx.Module, old: type, new: type) -> None:
  """Replaces every variable of exact type `old` under `module` by a `new`
  holding the same value and metadata."""
  for _, node in list(nnx.iter_graph(module)):
    if not isinstance(node, nnx.Module):
      continue
    for name, value in list(vars(node).items()):
      if type(value) is old:  # pylint: disable=unidiomatic-typecheck
        setattr(node, name, new(value.get_value(), **value.get_metadata()))


def module_at(model: nnx.Module, path: str) -> nnx.Module:
  """The module at dotted `path` of `model`."""
  node = model
  for part in path.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


def tied_embedding(model: nnx.Module) -> nnx.Module | None:
  """The input embeddings a model's absent head is tied to, or None (a
  jaxbnb Llama model with `tie_word_embeddings`: `lm_head` is None)."""
  if getattr(model, TIED_HEAD, False) is not None:
    return None
  return getattr(getattr(model, "model", None), "embed_tokens", None)


def untie(model: nnx.Module) -> None:
  """Gives a tied model an `lm_head` of its own holding a copy of the
  embedding weight (same logits), and `tie_word_embeddings=False`.

  What PEFT's `modules_to_save` does to a tied pair: its copy of one side
  is trained while the other keeps the original weight (PEFT's
  `merge_and_unload` then sets `tie_word_embeddings=False`).
  """
  embed = tied_embedding(model)
  weight = embed.weight.get_value()
  vocab, hidden = weight.shape
  head = Linear(hidden, vocab, use_bias=False, dtype=embed.dtype,
                param_dtype=weight.dtype, init_std=0.0, rngs=nnx.Rngs(0))
  head.weight.set_value(jnp.array(weight, copy=True))
  setattr(model, TIED_HEAD, head)
  for owner in (model, getattr(model, "model", None)):
    config = getattr(owner, "config", None)
    if getattr(config, "tie_word_embeddings", False):
      owner.config = dataclasses.replace(config, tie_word_embeddings=False)


def make_trainable(model: nnx.Module, paths: list[str]) -> None:
  """The `nnx.Param`s of the modules at `paths` become `nnx.LoRAParam`s;
  a tied model is untied first (`untie`) when its head or its embeddings
  are among them."""
  if tied_embedding(model) is not None and any(
      p == TIED_HEAD or p.rsplit(".", 1)[-1] == "embed_tokens"
      for p in paths):
    untie(model)
  for path in paths:
    _retype(module_at(model, path), nnx.Param, nnx.LoRAParam)


def trained_modules(model: nnx.Module, is_adapter) -> dict[str, nnx.Param]:
  """`{dotted variable path: variable}` of the `nnx.LoRAParam`s outside
  the adapter layers (`is_adapter(node)`): the modules to save."""
  nodes = list(nnx.iter_graph(model))
  skip = [_path(p) for p, node in nodes if is_adapter(node)]
  out = {}
  for p, node in nodes:
    path = _path(p)
    if isinstance(node, nnx.LoRAParam) and not isinstance(
        node, LoRABias) and not any(
            not s or path.startswith(s + ".") for s in skip):
      out[path] = node
  return dict(sorted(out.items()))


def make_frozen(model: nnx.Module, is_adapter) -> None:
  """The `nnx.LoRAParam`s (and trained biases, `LoRABias`) outside the
  adapter layers become `nnx.Param`s (PEFT's merge and unload keep the
  trained copy)."""
  skip = [n for _, n in nnx.iter_graph(model) if is_adapter(n)]
  for _, node in list(nnx.iter_graph(model)):
    if not isinstance(node, nnx.Module) or any(node is s for s in skip):
      continue
    for name, value in list(vars(node).items()):
      if type(value) in (nnx.LoRAParam, LoRABias):  # pylint: disable=unidiomatic-typecheck
        setattr(node, name, nnx.Param(value.get_value(),
                                      **value.get_metadata()))
