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

Host time: the model and optimizer are walked once (`_Plan`,
`_UpdatePlan`), which keep each layer's, the embedding's, the head's and
the update's `Variable`s in the order of their states' leaves, and
compiled programs that take those leaves (graphdefs bound, never hashed
per call). Each step reads and writes the values directly (raw, where no
hook asks for more), after checking every graph node's attributes against
the plan (names, and the identity of each variable and child): anything
added, removed or replaced since makes it check and walk everything
again. Walking the NNX graphs every step cost most of the step's host
time (measured: 63% on a CPU for the layers alone), and a step on the GPU
waited for it; building the update's states from their leaves, copying
each value on read and write, and hashing graphdefs cost about half of
what remained (a 32-layer tiny model on a CPU: 211 -> 110 ms a step).
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
from flax.nnx import graphlib
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbnb._src.models import llama
from jaxbnb._src.models import rope
from jaxbnb._src.quant import storage_words
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


_IS_VARIABLE = lambda x: isinstance(x, nnx.Variable)  # noqa: E731


def _value(v: nnx.Variable):
  """`v.get_value()`, without its copy when no hook or reference needs
  it (4.5 to 19 us a variable measured on a CPU, thousands per step)."""
  meta = v.get_metadata()
  if meta.get("ref") or "on_get_value" in meta:
    return v.get_value()
  return v.get_raw_value()


def _assign(v: nnx.Variable, value) -> None:
  """`v.set_value(value)`, without its copy when no hook or reference
  needs it (`value` is a fresh container here)."""
  meta = v.get_metadata()
  if meta.get("ref") or "on_set_value" in meta:
    v.set_value(value)
  else:
    v.set_raw_value(value)


def _leaves(variables) -> list:
  """The leaves of `variables`' values, in order (a state's leaves)."""
  return [x for v in variables for x in jax.tree.leaves(_value(v))]


def _child(node, key):
  if isinstance(key, str) and hasattr(node, key):
    return getattr(node, key)
  return node[key]


class _Plan:
  """One walk of a model's decoder layers, reused by every step.

  `variables[i]` holds layer i's `Variable`s in the order of
  `nnx.state(layer)`; their values' leaves, in that order, are the state's
  leaves (`treedef`; a 4-bit weight's value has several). `programs`
  gives the compiled forward and backward layer programs taking those
  leaves, per set of mesh axes the batch is split over (FSDP: the leaves
  are gathered over those axes inside the programs).
  `updates` holds the `_UpdatePlan` of each optimizer used with the model,
  whose `valid` tells whether anything in either changed.
  """

  def __init__(self, model: nnx.Module):
    layers = decoder_layers(model)
    self.layers = tuple(layers)
    self.graphdef = nnx.graphdef(layers[0])
    state = nnx.state(layers[0])
    self.treedef = jax.tree.structure(state)
    self.variables = tuple(
        tuple(jax.tree.leaves(nnx.variables(layer), is_leaf=_IS_VARIABLE))
        for layer in layers)
    self.rng = tuple(i for i, v in enumerate(self.variables[0])
                     if isinstance(v, nnx.RngState))
    self._programs = {}
    self.embed = _Part(model.model.embed_tokens)
    self.head = _Part(_Head(model))
    self.updates: "weakref.WeakKeyDictionary[Any, _UpdatePlan]" = (
        weakref.WeakKeyDictionary())

  def programs(self, batch_axes: frozenset):
    """The compiled `(forward, backward)` for batches split over
    `batch_axes`, which the layer's leaves are gathered over."""
    if batch_axes not in self._programs:
      gathered = _gathered(self.variables[0], batch_axes)
      self._programs[batch_axes] = (
          jax.jit(functools.partial(_forward_leaves, self.graphdef,
                                    self.treedef, gathered)),
          jax.jit(functools.partial(_backward_leaves, self.graphdef,
                                    self.treedef, gathered),
                  donate_argnums=5))
    return self._programs[batch_axes]

  def values(self, i: int) -> list[jax.Array]:
    """Layer i's state leaves, read off its variables."""
    return _leaves(self.variables[i])

  def set_rng(self, i: int, values) -> None:
    for j, value in zip(self.rng, values):
      _assign(self.variables[i][j], value)


def _without(spec: P, axes: frozenset) -> P:
  """`spec` with the mesh axes `axes` taken out of every entry."""
  parts = []
  for entry in spec:
    names = entry if isinstance(entry, tuple) else (entry,)
    kept = tuple(a for a in names if a is not None and a not in axes)
    parts.append(kept if len(kept) > 1 else (kept[0] if kept else None))
  return P(*parts)


def _gathered(variables, axes: frozenset) -> tuple:
  """Per state leaf: the sharding it is gathered to inside the layer's
  programs (None: as it comes), the FSDP way: a leaf split over the mesh
  axes the batch splits over (`axes`) is gathered over them; a split over
  another axis (tensor parallelism) stays.

  Left to XLA's sharding propagation, an 8B layer split over `fsdp=2`
  spent 117 ms of a 2-GPU step in NCCL send/receive kernels (what
  all-to-alls and collective permutes run on); on the CPU the same
  programs moved activations by all-to-alls and gathered dequantized
  float32 weights. The gathers here move the stored bytes once, at the
  start of the program.
  """
  out = []
  for x in _leaves(variables):
    sharding = getattr(x, "sharding", None)
    spec = (_without(sharding.spec, axes)
            if isinstance(sharding, NamedSharding) else None)
    out.append(None if spec is None or spec == sharding.spec
               else NamedSharding(sharding.mesh, spec))
  return tuple(out)


def _split_axes(x) -> frozenset:
  """The mesh axes `x` is split over (none off a `NamedSharding`)."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return frozenset()
  return frozenset(a for entry in sharding.spec if entry is not None
                   for a in (entry if isinstance(entry, tuple) else (entry,)))


def _gather(leaves, gathered):
  """`leaves` constrained to `gathered` (None: as they are); packed bytes
  in a 16-bit float storage move as 32-bit words (`storage_words`)."""
  return [x if s is None else storage_words.with_sharding_constraint(x, s)
          for x, s in zip(leaves, gathered, strict=True)]


def _fingerprint(node) -> tuple:
  """A graph node's attributes: names and the identity of each value.

  A variable or child replaced or added changes it, and so does a static
  attribute set to another value (`model.eval()` sets the dropout's
  `deterministic`, which the cached graphdef holds)."""
  return tuple((key, id(value)) for key, value in
               graphlib.get_node_impl(node).node_dict(node).items())


class _UpdatePlan:
  """One walk of `(model, optimizer)` for the update program.

  Holds the split's graphdef, the `MUTABLE` ("changing") and other
  ("frozen") variables in the order of their states' leaves, and the
  fingerprint of every graph node below the two roots. The plan keeps
  those nodes and their attributes' values, so the identities it compares
  stay unique; it keeps no reference to the roots themselves, whose
  fingerprints it compares too. `valid` re-resolves each node's path and
  compares fingerprints: any variable or module added, removed or replaced
  anywhere in the model or optimizer invalidates it.
  """

  def __init__(self, nodes):
    graphdef, changing, frozen = nnx.split(nodes, step_lib.MUTABLE, ...)
    self.graphdef = graphdef
    self.treedefs = (jax.tree.structure(changing), jax.tree.structure(frozen))
    cvars, fvars = nnx.variables(nodes, step_lib.MUTABLE, ...)
    self.variables = tuple(
        tuple(jax.tree.leaves(v, is_leaf=_IS_VARIABLE)) for v in (cvars, fvars))
    self.value_defs = tuple(jax.tree.structure(v.get_value())
                            for v in self.variables[0])
    self._apply = {}
    self.roots = tuple(_fingerprint(n) for n in nodes)
    self.graph = []
    for path, node in nnx.iter_graph(nodes):
      if (len(path) > 1 and graphlib.is_graph_node(node)
          and not isinstance(node, nnx.Variable)):
        attrs = tuple(graphlib.get_node_impl(node).node_dict(node).values())
        self.graph.append((tuple(path), node, _fingerprint(node), attrs))
    # The roots' attribute values too (the ids compared must stay unique).
    self.root_attrs = tuple(
        tuple(graphlib.get_node_impl(n).node_dict(n).values()) for n in nodes)
    # The leaves read off the variables must be the split's, in order.
    for state, variables in zip((changing, frozen), self.variables):
      if [id(x) for x in jax.tree.leaves(state)] != [
          id(x) for x in _leaves(variables)]:
        raise ValueError("layerwise_train_step: the split's leaves do not "
                         "follow its variables")

  def valid(self, nodes) -> bool:
    if tuple(_fingerprint(n) for n in nodes) != self.roots:
      return False
    for path, node, fingerprint, _ in self.graph:
      current = nodes
      try:
        for key in path:
          current = _child(current, key)
      except (AttributeError, IndexError, KeyError, TypeError):
        return False
      if current is not node or _fingerprint(node) != fingerprint:
        return False
    return True

  def read(self):
    """The leaves of `(changing, frozen)`, as `nnx.split(nodes, MUTABLE,
    ...)` gives those states."""
    return tuple(_leaves(variables) for variables in self.variables)

  def apply(self, where):
    """The update program (`_apply_leaves`) for the placements `where`."""
    if where not in self._apply:
      self._apply[where] = jax.jit(functools.partial(
          _apply_leaves, self.graphdef, self.treedefs, where))
    return self._apply[where]

  def write(self, leaves) -> None:
    """Writes the update's `MUTABLE` leaves (both nodes', in order) back."""
    at = 0
    for variable, treedef in zip(self.variables[0], self.value_defs):
      k = treedef.num_leaves
      _assign(variable, jax.tree.unflatten(treedef, leaves[at:at + k]))
      at += k
    if at != len(leaves):  # a bug: the same filter, the same tree
      raise AssertionError(f"{len(leaves)} leaves, {at} expected")


# Each model's `_Plan` (walking every layer's graph each step measured 0.6 s
# of host time per step for 32 layers on a CPU).
_PLANS: "weakref.WeakKeyDictionary[nnx.Module, _Plan]" = (
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


def _embed_leaves(graphdef, treedef, leaves, input_ids):
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(input_ids)


class _Part:
  """A module's graphdef, state treedef and `Variable`s (in the order of
  its state's leaves), walked once: its programs take the leaves, so a
  step neither splits the module nor hashes its graphdef (about 10 ms a
  call measured on a CPU for the output head's)."""

  def __init__(self, module: nnx.Module):
    self.graphdef, state = nnx.split(module)
    self.treedef = jax.tree.structure(state)
    self.variables = tuple(jax.tree.leaves(nnx.variables(module),
                                           is_leaf=_IS_VARIABLE))
    if [id(x) for x in jax.tree.leaves(state)] != [
        id(x) for x in _leaves(self.variables)]:
      raise ValueError("layerwise_train_step: the state's leaves do not "
                       "follow its variables")
    self._jitted = {}

  def jit(self, fn, *static):
    """`fn` jitted with `(graphdef, treedef, *static)` bound, cached."""
    key = (fn, *static)
    if key not in self._jitted:
      self._jitted[key] = jax.jit(functools.partial(
          fn, self.graphdef, self.treedef, *static))
    return self._jitted[key]

  def values(self) -> list[jax.Array]:
    return _leaves(self.variables)


def _forward_leaves(graphdef, treedef, gathered, leaves, x, cos, sin,
                    allowed):
  """One layer's forward from its state's leaves: the output and its RNG
  variables' values afterwards (the dropout's advanced counts)."""
  leaves = _gather(leaves, gathered)
  layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
  y, _ = layer(x, cos, sin, allowed)
  return y, jax.tree.leaves(nnx.state(layer, nnx.RngState))


def _pullback(layer, x, cos, sin, allowed, grad_out):
  # <layer(x), grad_out>: its gradient is the vector-Jacobian product (an
  # `nnx.grad`, so the dropout may advance its RNG count while traced).
  y = layer(x, cos, sin, allowed)[0]
  return jnp.sum(y.astype(jnp.float32) * grad_out.astype(jnp.float32))


_pullback_grad = nnx.grad(_pullback, argnums=(nnx.DiffState(0, nnx.LoRAParam),
                                              1))


def _backward_leaves(graphdef, treedef, gathered, leaves, x, cos, sin,
                     allowed, grad_out):
  """One layer's backward from its state's leaves (before its forward)."""
  leaves = _gather(leaves, gathered)
  layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
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


def _head_loss(graphdef, treedef, chunk, leaves, hidden, input_ids,
               loss_mask):
  """`(nll_sum, count, d nll_sum / d hidden)`, the head run in chunks."""
  state = jax.tree.unflatten(treedef, leaves)
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


def _micro_batch(model, plan, input_ids, attention_mask, loss_mask, chunk):
  """Loss, count, per-layer adapter gradients of one micro-batch, and each
  layer's RNG leaves after its forward pass (its dropout counts advanced),
  for the caller to write back: the model itself is left as it was."""
  inner = model.model
  inputs = inner.attention_inputs(input_ids, attention_mask=attention_mask)
  x = plan.embed.jit(_embed_leaves)(plan.embed.values(), input_ids)
  cos, sin = rope.rope_cos_sin(inner.config, inputs["positions"], x.dtype)
  forward, backward = plan.programs(_split_axes(input_ids))
  saved, afters = [], []
  for i in range(len(plan.layers)):
    # The backward pass recomputes the forward from these leaves (the same
    # dropout masks); the caller writes `after` back once all is queued.
    before = plan.values(i)
    saved.append((before, x))
    x, after = forward(before, x, cos, sin, inputs["masks"][i])
    afters.append(after)
  nll, count, grad = plan.head.jit(_head_loss, chunk)(
      plan.head.values(), x, input_ids, loss_mask)
  grads = [None] * len(plan.layers)
  for i in reversed(range(len(plan.layers))):
    before, x_in = saved.pop()
    grad, grads[i] = backward(before, x_in, cos, sin, inputs["masks"][i],
                              grad)
  return nll, count, grads, afters


def _apply_leaves(graphdef, treedefs, where, changing, frozen, grads, denom):
  """`optimizer.update(model, grads / denom)` and the gradient norm, from
  and to the leaves of the split's states (`_UpdatePlan`): only what
  changes leaves the program (`step.run_updating`), each leaf pinned to
  its `where` entry (None: as XLA places it)."""
  changing = jax.tree.unflatten(treedefs[0], changing)
  frozen = jax.tree.unflatten(treedefs[1], frozen)
  model, optimizer = nnx.merge(graphdef, changing, frozen)
  grads = jax.tree.map(lambda g: g / denom, grads)
  norm = optax.tree.norm(grads)
  optimizer.update(model, grads)
  leaves = jax.tree.leaves((nnx.state(model, step_lib.MUTABLE),
                            nnx.state(optimizer, step_lib.MUTABLE)))
  if where is not None:
    leaves = [x if w is None else jax.lax.with_sharding_constraint(x, w)
              for x, w in zip(leaves, where, strict=True)]
  return norm, leaves


def _where(leaves) -> tuple | None:
  """Each leaf's `NamedSharding` on a multi-device mesh (else None), or
  None when no leaf has one (`step.placements`, per leaf)."""
  out = []
  for x in leaves:
    s = getattr(x, "sharding", None)
    out.append(s if isinstance(s, NamedSharding) and s.mesh.size > 1
               else None)
  return tuple(out) if any(w is not None for w in out) else None


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
    ValueError: a model without adapters or one `supports_layerwise`
      refuses, `chunk` < 1, or a `batch` entry missing or not `[A, B, T]`.
    TypeError: `batch` is not a mapping, or `input_ids` is not integer.

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
  batch = step_lib.check_batch("layerwise_train_step", batch, "[A, B, T]")
  plan = _PLANS.get(model)
  update = None if plan is None else plan.updates.get(optimizer)
  if update is None or not update.valid((model, optimizer)):
    # First step, a new optimizer, or something in either changed: check
    # and walk everything again.
    _PLANS.pop(model, None)
    if not _lora_paths(model):
      raise step_lib.no_adapters_error("layerwise_train_step")
    if not supports_layerwise(model):
      raise ValueError(_UNSUPPORTED)
    plan = _PLANS[model] = _Plan(model)
    update = plan.updates[optimizer] = _UpdatePlan((model, optimizer))
  total_nll, total_count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
  layer_grads = [None] * len(plan.layers)
  for a in range(batch["input_ids"].shape[0]):
    nll, count, grads, afters = _micro_batch(
        model, plan, batch["input_ids"][a],
        batch["attention_mask"][a], batch["loss_mask"][a], chunk)
    for i, after in enumerate(afters):
      plan.set_rng(i, after)
    total_nll, total_count = total_nll + nll, total_count + count
    layer_grads = [_add(s, g) for s, g in zip(layer_grads, grads)]
  # The per-layer gradients in the structure of the model's adapters.
  flat = []
  for i, g in enumerate(layer_grads):
    for path, leaf in nnx.to_flat_state(g):
      flat.append((("model", "layers", i) + tuple(path), leaf))
  grads = nnx.from_flat_state(flat)
  denom = jnp.maximum(total_count, 1).astype(jnp.float32)
  changing, frozen = update.read()
  norm, leaves = update.apply(_where(changing))(changing, frozen, grads,
                                                denom)
  update.write(leaves)
  return {"loss": total_nll / denom, "grad_norm": norm,
          "targets": total_count}
