"""The optimizer, the jitted train and eval steps, gradient checkpointing.

`train_step` takes `grad_accum` micro-batches `[A, B, T]` and scans over
them inside one `nnx.jit` program: each micro-batch's summed token loss is
differentiated with respect to the adapters only
(`nnx.DiffState(0, nnx.LoRAParam)`), the gradients and token counts are
summed, and the optimizer (`nnx.Optimizer(..., wrt=nnx.LoRAParam)`) gets
their sum divided by the total count: exactly the gradient of the mean
token loss of the whole `[A * B, T]` batch, whatever the masks.

With `remat=True` every decoder layer of the model runs under
`nnx.remat` (`jax.checkpoint`): its activations are recomputed in the
backward pass instead of kept, one layer at a time. The layers are wrapped
only while the loss is traced (the model's structure, and so its module
paths and adapter names, never change).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from jaxbnb._src.optim import aliases as optim_aliases
from jaxbnb._src.train import mesh as mesh_lib
from jaxbnb._src.train.config import TrainConfig
from jaxbnb._src.train.data import TokenizedData
from jaxbnb._src.train.loss import token_nll

__all__ = ["learning_rate_schedule", "make_optimizer", "RematLayer",
           "rematerialized", "decoder_layers", "train_step", "eval_step",
           "commit_to_device", "run_updating", "placements", "constrain",
           "MUTABLE",
           "evaluate"]


def learning_rate_schedule(config: TrainConfig
                           ) -> Callable[[jax.Array], jax.Array]:
  """The learning rate as a function of the optimizer's update count.

  Update `count` (0-based) is step `k = count + 1`: `lr * k / W` for
  `k <= W` (warmup), then `lr * (1 + cos(pi * (k - W - 1) / (S - W))) / 2`
  (a cosine decay from `lr` at step `W + 1` towards 0 after step `S`), with
  `W = warmup_steps`, `S = steps`. This is Hugging Face's
  `get_cosine_schedule_with_warmup` shifted by one step, so no step has a
  learning rate of 0.

  Examples:
    >>> from jaxbnb.train import TrainConfig, learning_rate_schedule
    >>> lr = learning_rate_schedule(TrainConfig(steps=4, warmup_steps=2,
    ...                                         learning_rate=1.0))
    >>> [round(float(lr(c)), 3) for c in range(4)]
    [0.5, 1.0, 1.0, 0.5]
  """
  peak, warm, steps = config.learning_rate, config.warmup_steps, config.steps

  def schedule(count):
    k = jnp.asarray(count, jnp.float32) + 1
    warmup = peak * k / max(warm, 1)
    progress = jnp.clip((k - warm - 1) / max(steps - warm, 1), 0.0, 1.0)
    decay = peak * 0.5 * (1 + jnp.cos(jnp.float32(math.pi) * progress))
    return jnp.where(k <= warm, warmup, decay)

  return schedule


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Clipping, then the configured AdamW on the `learning_rate_schedule`.

  Configs with the same optimizer settings give the same transformation
  object (cached), so their optimizers share a compiled train step.

  Args:
    config: the run's settings (`optimizer`, `learning_rate`,
      `warmup_steps`, `steps`, `weight_decay`, `max_grad_norm`).

  Returns:
    `optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)` (no
    clipping for `max_grad_norm=0`), where adamw is
    `jaxbnb.optim.adamw8bit`, `jaxbnb.optim.paged_adamw8bit` or
    `optax.adamw`.
  """
  return _optimizer(config.optimizer, config.learning_rate,
                    config.warmup_steps, config.steps, config.weight_decay,
                    config.max_grad_norm)


@functools.lru_cache(maxsize=16)
def _optimizer(name: str, learning_rate: float, warmup_steps: int,
               steps: int, weight_decay: float, max_grad_norm: float
               ) -> optax.GradientTransformation:
  lr = learning_rate_schedule(TrainConfig(
      steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps))
  if name == "adamw8bit":
    opt = optim_aliases.adamw8bit(lr, weight_decay=weight_decay)
  elif name == "paged_adamw8bit":
    opt = optim_aliases.paged_adamw8bit(lr, weight_decay=weight_decay)
  else:
    opt = optax.adamw(lr, weight_decay=weight_decay)
  if max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), opt)
  return opt


# ---------------------------------------------------------------------------
# gradient checkpointing


@nnx.remat
def _checkpointed(layer, x, cos, sin, allowed):
  return layer(x, cos, sin, allowed)[0]


class RematLayer(nnx.Module):
  """A decoder layer whose activations are recomputed in the backward pass.

  Calls without a KV cache go through `nnx.remat`; with a cache (decoding)
  the layer runs as it is.
  """

  def __init__(self, layer: nnx.Module):
    self.layer = layer

  def __call__(self, x, cos, sin, allowed, kv_cache=None, index=None):
    if kv_cache is not None:
      return self.layer(x, cos, sin, allowed, kv_cache, index)
    return _checkpointed(self.layer, x, cos, sin, allowed), (None, None)


def decoder_layers(model: nnx.Module) -> nnx.List:
  """`model.model.layers` of a `LlamaForCausalLM`.

  Raises:
    ValueError: the model has no such list.
  """
  layers = getattr(getattr(model, "model", None), "layers", None)
  if not isinstance(layers, nnx.List):
    raise ValueError(
        "remat=True needs a model whose decoder layers are the nnx.List "
        f"`model.model.layers` (a LlamaForCausalLM); got "
        f"{type(model).__name__}.")
  return layers


@contextlib.contextmanager
def rematerialized(model: nnx.Module) -> Iterator[nnx.Module]:
  """Wraps each decoder layer in a `RematLayer` for the `with` block."""
  layers = decoder_layers(model)
  originals = list(layers)
  for i, layer in enumerate(originals):
    layers[i] = RematLayer(layer)
  try:
    yield model
  finally:
    for i, layer in enumerate(originals):
      layers[i] = layer


# ---------------------------------------------------------------------------
# steps


def commit_to_device(*nodes: nnx.Module, device: jax.Device | None = None
                     ) -> None:
  """Commits the uncommitted arrays of `nodes` to `device` (default: the
  first local device), in place.

  A freshly built model holds uncommitted arrays, while a jitted step
  returns committed ones; `jax.jit` keys its cache on that, so without this
  the second `train_step` compiles the whole step again (measured: a second
  full compilation on the first two steps).
  """
  device = device or jax.local_devices()[0]

  def commit(x):
    # Committed arrays keep their placement (paged optimizer states live in
    # pinned host memory).
    if isinstance(x, jax.Array) and not x.committed:
      return jax.device_put(x, device)
    return x
  for node in nodes:
    nnx.update(node, jax.tree.map(commit, nnx.state(node)))


def _nll(model, input_ids, attention_mask, loss_mask, remat: bool):
  with rematerialized(model) if remat else contextlib.nullcontext():
    logits, _ = model(input_ids, attention_mask=attention_mask)
  return token_nll(logits, input_ids, loss_mask)


_grad_fn = nnx.value_and_grad(_nll, argnums=nnx.DiffState(0, nnx.LoRAParam),
                              has_aux=True)


# What a step changes: the adapters, the optimizer state, the dropout's RNG
# counts. Only these leave the compiled programs; an `nnx.jit` over the
# model would return (so copy) every frozen weight too (measured: the peak
# grew by the base model's size).
MUTABLE = (nnx.LoRAParam, nnx.OptState, nnx.RngState)


def placements(nodes, states=None
               ) -> tuple[tuple[NamedSharding | None, ...], ...] | None:
  """The `NamedSharding` of each `MUTABLE` leaf of each of `nodes` (None
  for a leaf that has none), or None when no leaf is on a multi-device
  mesh. Hashable: a static argument of the jitted steps. `states`: the
  nodes' `MUTABLE` states when the caller already has them (one graph
  walk fewer)."""
  if states is None:
    states = [nnx.state(node, MUTABLE) for node in nodes]
  out, sharded = [], False
  for state in states:
    row = []
    for x in jax.tree.leaves(state):
      s = getattr(x, "sharding", None)
      if isinstance(s, NamedSharding) and s.mesh.size > 1:
        row.append(s)
        sharded = True
      else:
        row.append(None)
    out.append(tuple(row))
  return tuple(out) if sharded else None


def constrain(states, where):
  """`states` (one per node) with each leaf constrained to its `where`
  entry (`placements`), so a step returns the adapters, optimizer state
  and RNG state sharded as they came in: the next step then reuses the
  compiled program, and XLA never picks another layout for them."""
  if where is None:
    return states
  out = []
  for state, row in zip(states, where):
    leaves, treedef = jax.tree.flatten(state)
    if len(leaves) != len(row):  # a bug: the same filter, the same tree
      raise AssertionError(f"{len(leaves)} leaves, {len(row)} placements")
    out.append(jax.tree.unflatten(treedef, [
        x if s is None else jax.lax.with_sharding_constraint(x, s)
        for x, s in zip(leaves, row)]))
  return tuple(out)


_BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


def check_batch(fn: str, batch: Any, layout: str) -> dict[str, Any]:
  """`batch` as a dict, after checking it holds `input_ids`,
  `attention_mask` and `loss_mask` of one shape with `layout` (`"[A, B, T]"`
  or `"[B, T]"`: one dimension per letter).

  Raises:
    TypeError: `batch` is not a mapping, or `input_ids` is not integer.
    ValueError: a key is missing, or a shape is not `layout` or differs
      from `input_ids`'.
  """
  if not isinstance(batch, Mapping):
    raise TypeError(f"{fn}: `batch` must be a mapping with keys "
                    f"{list(_BATCH_KEYS)}, got {type(batch).__name__}.")
  missing = [k for k in _BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"{fn}: `batch` must hold {list(_BATCH_KEYS)}; "
                     f"missing {missing} (got keys {sorted(batch)}).")
  ndim = len(layout.split(","))
  want = None
  for key in _BATCH_KEYS:
    shape = tuple(getattr(batch[key], "shape", ()))
    if len(shape) != ndim:
      raise ValueError(
          f"{fn}: `batch[{key!r}]` must have shape {layout}"
          + (" (A micro-batches of B sequences of T tokens; add a leading "
             "axis of 1 for one micro-batch)" if ndim == 3 else "")
          + f", got shape {shape}.")
    if want is None:
      want = shape
    elif shape != want:
      raise ValueError(f"{fn}: `batch[{key!r}]` must have the shape of "
                       f"`batch['input_ids']` {want}, got {shape}.")
  dtype = getattr(batch["input_ids"], "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{fn}: `batch['input_ids']` must hold integer token "
                    f"ids, got dtype {dtype}.")
  return dict(batch)


def no_adapters_error(fn: str) -> ValueError:
  """The error for a model without `nnx.LoRAParam`s to train."""
  return ValueError(
      f"{fn}: `model` has no adapters (no nnx.LoRAParam) to train; add them "
      "with jaxbnb.lora.apply_lora(model, LoRAConfig(...), rngs=...) before "
      "building `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`.")


def run_updating(jitted, nodes, *args):
  """Calls `jitted(graphdef, changing, frozen, *args, placements(nodes))`
  -> `(out, states)` and writes each node's returned state back into it.

  On a single device the last argument is None (no constraint)."""
  graphdef, changing, frozen = nnx.split(tuple(nodes), MUTABLE, ...)
  # A node without mutable state (a model without adapters or dropout RNG)
  # has no entry in `changing`.
  where = placements(nodes, [changing[i] if i in changing else nnx.State({})
                             for i in range(len(nodes))])
  out, states = jitted(graphdef, changing, frozen, *args, where)
  for node, state in zip(nodes, states):
    nnx.update(node, state)
  return out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _train_step(graphdef, changing, frozen, batch, remat, where=None):
  model, optimizer = nnx.merge(graphdef, changing, frozen)
  if not jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
    # Checked while tracing: a model without adapters has its own graphdef,
    # so this costs nothing per step.
    raise no_adapters_error("train_step")
  # The whole state is the scan's carry: NNX merges graph nodes only from
  # values of the current trace level (the frozen weights pass through
  # unchanged; the RNG counts of the adapter dropout advance).
  graphdef, state = nnx.split(model)

  def micro(carry, mb):
    state, gsum, count = carry
    m = nnx.merge(graphdef, state)
    (nll, n), g = _grad_fn(m, mb["input_ids"], mb["attention_mask"],
                           mb["loss_mask"], remat)
    _, state = nnx.split(m)
    return (state, jax.tree.map(jnp.add, gsum, g), count + n), nll

  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.LoRAParam))
  (state, gsum, count), nlls = jax.lax.scan(
      micro, (state, zeros, jnp.zeros((), jnp.int32)), dict(batch))
  nnx.update(model, state)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g / denom, gsum)
  grad_norm = optax.tree.norm(grads)
  optimizer.update(model, grads)
  out = {"loss": jnp.sum(nlls) / denom, "grad_norm": grad_norm,
         "targets": count}
  return out, constrain((nnx.state(model, MUTABLE),
                        nnx.state(optimizer, MUTABLE)), where)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer,
               batch: Mapping[str, jax.Array], *, remat: bool = False
               ) -> dict[str, jax.Array]:
  """One optimizer step over `grad_accum` micro-batches.

  Args:
    model: the model with adapters (`nnx.LoRAParam`), updated in place.
    optimizer: `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`.
    batch: `input_ids`, `attention_mask`, `loss_mask`, each `[A, B, T]`
      (A micro-batches of B sequences).
    remat: recompute each decoder layer in the backward pass.

  Returns:
    `loss` (mean over the target tokens of all micro-batches, float32),
    `grad_norm` (global norm of that mean's gradient, before clipping) and
    `targets` (number of target tokens).

  Raises:
    ValueError: `model` has no adapters, or a `batch` entry is missing or
      not `[A, B, T]` (all of one shape).
    TypeError: `batch` is not a mapping, or `input_ids` is not integer.
  """
  batch = check_batch("train_step", batch, "[A, B, T]")
  return run_updating(_train_step, (model, optimizer), batch, remat)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _eval_step(graphdef, changing, frozen, batch, where=None):
  (model,) = nnx.merge(graphdef, changing, frozen)
  logits, _ = model(batch["input_ids"],
                    attention_mask=batch["attention_mask"])
  out = token_nll(logits, batch["input_ids"], batch["loss_mask"])
  return out, constrain((nnx.state(model, MUTABLE),), where)


def eval_step(model: nnx.Module, batch: Mapping[str, jax.Array]
              ) -> tuple[jax.Array, jax.Array]:
  """`(nll_sum, count)` of the target tokens of a `[B, T]` batch
  (`input_ids`, `attention_mask`, `loss_mask`)."""
  return run_updating(_eval_step, (model,),
                      check_batch("eval_step", batch, "[B, T]"))


def evaluate(model: nnx.Module, data: TokenizedData, batch_size: int, *,
             mesh: jax.sharding.Mesh | None = None, sharding: Any = None
             ) -> tuple[float, float]:
  """Mean token loss and perplexity of `model` on `data`.

  The model is called as it is (call `model.eval()` first to turn the
  adapter dropout off). The last batch is padded with empty rows, so one
  program serves every batch.

  Args:
    model: the model.
    data: the held-out sequences.
    batch_size: sequences per batch.
    mesh: a device mesh to split each batch over ("data" x the FSDP axis
      of `sharding`, see `jaxbnb.train.finetune`); None: as it comes.
    sharding: the `ShardingRules` (or a dict of its fields) of the run.

  Returns:
    `(loss, perplexity)`: the mean negative log-likelihood per target token
    (summed in float64 across batches) and its exp.
  """
  if mesh is not None:
    where = mesh_lib.batch_sharding(mesh, 2, 0, sharding)
  total, count = 0.0, 0
  n = len(data)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    part = data.take(idx)
    arrays = {"input_ids": part.input_ids,
              "attention_mask": part.attention_mask,
              "loss_mask": part.loss_mask}
    pad = batch_size - len(idx)
    if pad:
      arrays = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:],
                                                v.dtype)])
                for k, v in arrays.items()}
    if mesh is None:
      batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    else:
      batch = {k: mesh_lib.put(v, where) for k, v in arrays.items()}
    nll, c = eval_step(model, batch)
    total += float(nll)
    count += int(c)
  loss = total / max(count, 1)
  return loss, math.exp(min(loss, 700.0))
