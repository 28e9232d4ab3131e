"""A training step driven one decoder layer at a time.

`train_step(..., remat=True)` traces every decoder layer into one program:
for a 32-layer model XLA compiles 32 copies of the layer, forward,
recomputation and backward (minutes on a GPU). The decoder layers of a
Llama are all the same program on different weights, so
`layerwise_train_step` compiles one layer's forward and one layer's
backward once and runs them layer after layer from Python:

* forward: the embedding, then each layer on the previous output, keeping
  only each layer's input (what `jax.checkpoint` per layer keeps);
* head: the final norm, the output head and the loss in chunks of
  `chunk` tokens, each chunk's logits recomputed in its backward pass, so
  the `[tokens, vocab]` float32 logits never exist at once; its gradient
  with respect to the last hidden states;
* backward: each layer, last to first, recomputes its forward from its
  saved input (with the same dropout masks: the layer's state from before
  its forward pass) and returns the gradients of its input and adapters.

The result equals `train_step(..., remat=True)` up to float summation order
(the loss is summed per chunk). It needs the adapters (`nnx.LoRAParam`) to
live in the decoder layers only, as `apply_lora` puts them on the
projections; `supports_layerwise` says whether a model qualifies.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxbnb._src.models import llama
from jaxbnb._src.models import rope
from jaxbnb._src.train import step as step_lib
from jaxbnb._src.train.step import decoder_layers

__all__ = ["layerwise_train_step", "supports_layerwise"]

DEFAULT_CHUNK = 1024  # tokens per chunk of the output head and the loss
_UNSUPPORTED = (
    "layerwise_train_step: the model's adapters must all be in its decoder "
    "layers (`model.model.layers`, one structure for all); use "
    "train_step(..., remat=True) for other models.")


def _lora_paths(node) -> list[tuple[Any, ...]]:
  return [p for p, _ in nnx.to_flat_state(nnx.state(node, nnx.LoRAParam))]


# Models `layerwise_train_step` has checked (the check walks every layer's
# graph: measured 0.6 s of host time per step for 32 layers on a CPU).
# A structure changed afterwards is still caught: each step counts the
# model's adapters against the first layer's, and merging a layer's state
# into another structure fails.
_CHECKED: "weakref.WeakKeyDictionary[nnx.Module, bool]" = (
    weakref.WeakKeyDictionary())


def supports_layerwise(model: nnx.Module) -> bool:
  """Whether every adapter of `model` sits in one of its decoder layers and
  the layers share one structure (one compiled program serves them all)."""
  layers = getattr(getattr(model, "model", None), "layers", None)
  if not isinstance(layers, nnx.List) or not len(layers):
    return False
  inside = sum(len(_lora_paths(layer)) for layer in layers)
  if inside == 0 or inside != len(_lora_paths(model)):
    return False
  first = nnx.graphdef(layers[0])
  return all(nnx.graphdef(layer) == first for layer in layers)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, input_ids):
  return nnx.merge(graphdef, state)(input_ids)


@functools.partial(jax.jit, static_argnums=0)
def _layer_forward(graphdef, state, x, cos, sin, allowed):
  layer = nnx.merge(graphdef, state)
  y, _ = layer(x, cos, sin, allowed)
  return y, nnx.state(layer, nnx.RngState)  # the dropout's advanced counts


def _pullback(layer, x, cos, sin, allowed, grad_out):
  # <layer(x), grad_out>: its gradient is the vector-Jacobian product (an
  # `nnx.grad`, so the dropout may advance its RNG count while traced).
  y = layer(x, cos, sin, allowed)[0]
  return jnp.sum(y.astype(jnp.float32) * grad_out.astype(jnp.float32))


_pullback_grad = nnx.grad(_pullback, argnums=(nnx.DiffState(0, nnx.LoRAParam),
                                              1))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=6)
def _layer_backward(graphdef, state, x, cos, sin, allowed, grad_out):
  layer = nnx.merge(graphdef, state)
  grad_lora, grad_x = _pullback_grad(layer, x, cos, sin, allowed, grad_out)
  return grad_x, grad_lora


class _Head(nnx.Module):
  """The final norm and the output head of a `LlamaForCausalLM` (the tied
  embedding when it has no `lm_head`)."""

  def __init__(self, model: nnx.Module):
    self.norm = model.model.norm
    self.lm_head = model.lm_head
    self.embed = model.model.embed_tokens if model.lm_head is None else None

  def __call__(self, hidden):
    return llama.output_logits(self.lm_head, self.embed, self.norm(hidden))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _head_loss(graphdef, state, hidden, input_ids, loss_mask, chunk):
  """`(nll_sum, count, d nll_sum / d hidden)`, the head run in chunks."""
  b, t, h = hidden.shape
  targets = input_ids[:, 1:].reshape(-1)
  mask = jnp.asarray(loss_mask[:, 1:], bool).reshape(-1)
  n = targets.shape[0]
  pad = -n % chunk
  targets = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
  mask = jnp.pad(mask, (0, pad)).reshape(-1, chunk)

  def total(hidden):
    flat = jnp.pad(hidden[:, :-1].reshape(n, h), ((0, pad), (0, 0)))
    flat = flat.reshape(-1, chunk, h)

    @jax.checkpoint
    def one(args):
      x, tgt, m = args
      logits = nnx.merge(graphdef, state)(x).astype(jnp.float32)
      logp = jax.nn.log_softmax(logits, axis=-1)
      nll = -jnp.take_along_axis(logp, tgt[:, None], axis=-1)[:, 0]
      return jnp.sum(jnp.where(m, nll, 0.0))

    return jnp.sum(jax.lax.map(one, (flat, targets, mask)))

  nll, grad = jax.value_and_grad(total)(hidden)
  return nll, jnp.sum(mask, dtype=jnp.int32), grad


def _add(a, b):
  return b if a is None else jax.tree.map(jnp.add, a, b)


def _micro_batch(model, layers, head, input_ids, attention_mask, loss_mask,
                 chunk):
  """Loss, count, per-layer adapter gradients of one micro-batch, and each
  layer's state after its forward pass (its dropout RNG counts advanced),
  for the caller to write back: the model itself is left as it was."""
  inner = model.model
  inputs = inner.attention_inputs(input_ids, attention_mask=attention_mask)
  embed_def, embed_state = nnx.split(inner.embed_tokens)
  x = _embed(embed_def, embed_state, input_ids)
  cos, sin = rope.rope_cos_sin(inner.config, inputs["positions"], x.dtype)
  graphdef = nnx.graphdef(layers[0])
  saved, afters = [], []
  for i, layer in enumerate(layers):
    # The backward pass recomputes the forward from this state (the same
    # dropout masks); the caller writes `after` back once all is queued.
    before = nnx.state(layer)
    saved.append((before, x))
    x, after = _layer_forward(graphdef, before, x, cos, sin,
                              inputs["masks"][i])
    afters.append(after)
  head_def, head_state = nnx.split(head)
  nll, count, grad = _head_loss(head_def, head_state, x, input_ids,
                                loss_mask, chunk)
  grads = [None] * len(layers)
  for i in reversed(range(len(layers))):
    before, x_in = saved.pop()
    grad, grads[i] = _layer_backward(graphdef, before, x_in, cos, sin,
                                     inputs["masks"][i], grad)
  return nll, count, grads, afters


@functools.partial(jax.jit, static_argnums=(0, 5))
def _apply(graphdef, changing, frozen, grads, denom, where=None):
  """`optimizer.update(model, grads / denom)` and the gradient norm; only
  what changes leaves the program (`step.run_updating`)."""
  model, optimizer = nnx.merge(graphdef, changing, frozen)
  grads = jax.tree.map(lambda g: g / denom, grads)
  norm = optax.tree.norm(grads)
  optimizer.update(model, grads)
  return norm, step_lib.constrain((nnx.state(model, step_lib.MUTABLE),
                                   nnx.state(optimizer, step_lib.MUTABLE)),
                                  where)


def layerwise_train_step(model: nnx.Module, optimizer: nnx.Optimizer,
                         batch: Mapping[str, jax.Array], *,
                         chunk: int = DEFAULT_CHUNK) -> dict[str, jax.Array]:
  """`train_step(model, optimizer, batch, remat=True)`, one layer at a time.

  Args:
    model: a `LlamaForCausalLM` whose adapters are all in its decoder
      layers (`supports_layerwise`), updated in place.
    optimizer: `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`.
    batch: `input_ids`, `attention_mask`, `loss_mask`, each `[A, B, T]`.
    chunk: tokens per chunk of the output head and loss.

  Returns:
    As `train_step`: `loss`, `grad_norm` and `targets`.

  Raises:
    ValueError: a model `supports_layerwise` refuses, or `chunk` < 1.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb import lora, models, train
    >>> cfg = models.LlamaConfig(vocab_size=64, hidden_size=32,
    ...     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...     num_key_value_heads=2)
    >>> model = lora.apply_lora(
    ...     models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)),
    ...     lora.LoRAConfig(r=4, target_modules="all-linear"),
    ...     rngs=nnx.Rngs(1))
    >>> opt = nnx.Optimizer(model, train.make_optimizer(train.TrainConfig()),
    ...                     wrt=nnx.LoRAParam)
    >>> ids = jnp.arange(16, dtype=jnp.int32).reshape(1, 2, 8)
    >>> ones = jnp.ones(ids.shape, bool)
    >>> out = train.layerwise_train_step(model, opt, {"input_ids": ids,
    ...     "attention_mask": ones, "loss_mask": ones})
    >>> int(out["targets"])
    14
  """
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"layerwise_train_step: `chunk` must be an int >= 1, "
                     f"got {chunk!r}")
  if not _CHECKED.get(model, False):
    if not supports_layerwise(model):
      raise ValueError(_UNSUPPORTED)
    _CHECKED[model] = True
  layers = decoder_layers(model)
  head = _Head(model)
  total_nll, total_count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
  layer_grads = [None] * len(layers)
  template = None
  for a in range(batch["input_ids"].shape[0]):
    nll, count, grads, afters = _micro_batch(
        model, layers, head, batch["input_ids"][a],
        batch["attention_mask"][a], batch["loss_mask"][a], chunk)
    if template is None:
      # A cheap recheck (one layer's walk; done while the device runs the
      # queued layers): the adapters are still all in the layers. Nothing
      # in the model has changed yet if this raises.
      template = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
      if len(template) != len(layers) * len(_lora_paths(layers[0])):
        _CHECKED.pop(model, None)
        raise ValueError(_UNSUPPORTED)
    for layer, after in zip(layers, afters):
      nnx.update(layer, after)
    total_nll, total_count = total_nll + nll, total_count + count
    layer_grads = [_add(s, g) for s, g in zip(layer_grads, grads)]
  # The per-layer gradients in the structure of the model's adapters.
  by_path = {}
  for i, g in enumerate(layer_grads):
    for path, leaf in nnx.to_flat_state(g):
      by_path[("model", "layers", i) + tuple(path)] = leaf
  flat = [(p, by_path[tuple(p)]) for p, _ in template]
  grads = nnx.from_flat_state(flat)
  denom = jnp.maximum(total_count, 1).astype(jnp.float32)
  norm = step_lib.run_updating(_apply, (model, optimizer), grads, denom)
  return {"loss": total_nll / denom, "grad_norm": norm,
          "targets": total_count}
