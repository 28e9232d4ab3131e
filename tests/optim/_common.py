"""Shared helpers of the optim tests (paged, checkpoint, interop, wrappers)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxbnb import optim
from tests.helpers import assert_trees_bitwise_equal  # pylint: disable=unused-import


@functools.cache
def optimizer(name: str):
  """(optax transformation, jitted step) of `jaxbnb.optim.<name>(1e-3)`.

  Cached so that the tests share one compiled step per optimizer.
  """
  opt = getattr(optim, name)(1e-3)
  return opt, make_step(opt)


def make_params(seed: int = 0):
  """A small tree: two 8-bit leaves (one with a partial block), one 32-bit."""
  k = jax.random.split(jax.random.key(seed), 3)
  return {"dense": {"kernel": jax.random.normal(k[0], (64, 80)),
                    "bias": jax.random.normal(k[1], (80,))},
          "embed": jax.random.normal(k[2], (33, 130))}


def grads_at(params, step: int):
  """Deterministic gradients for step `step` (of `make_params`' tree)."""
  del params  # always make_params()' structure
  return _grads(step)


@functools.cache
def _grads(step: int):
  return _grads_jit(step)


@jax.jit
def _grads_jit(step):
  leaves, treedef = jax.tree.flatten(jax.eval_shape(make_params))
  keys = jax.random.split(jax.random.fold_in(jax.random.key(1000), step),
                          len(leaves))
  return treedef.unflatten([0.01 * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def make_step(opt):
  """A jitted train step that counts its traces in `step.traces`."""
  traces = []

  def step(params, state, grads):
    traces.append(1)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step)
  jitted.traces = traces
  return jitted


def train(name: str, params, state, start: int, stop: int):
  """Steps start..stop-1 of optimizer `name` (the cached compiled step)."""
  step_fn = optimizer(name)[1]
  for i in range(start, stop):
    params, state = step_fn(params, state, grads_at(params, i))
  return params, state


def state_of(opt_state):
  """The Optimizer8bitState inside an optax state (maybe a chain)."""
  cls = optim.Optimizer8bitState
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
  assert len(found) == 1, opt_state
  return found[0]


def zeros_like_tree(tree):
  return jax.tree.map(jnp.zeros_like, tree)
