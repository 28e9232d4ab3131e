"""Host placement of optimizer state for the paged optimizers.

bitsandbytes' paged optimizers keep their state in CUDA unified memory and let
the driver page it in on use. JAX has no unified memory; it has *memory
kinds*: every array lives in one of its device's memories (`"device"`,
`"pinned_host"`, `"unpinned_host"`). A paged jaxbnb optimizer keeps its
state arrays in host memory between steps: `init` returns them through
`to_host`, and `update` brings them in with `to_device`, computes, and sends
the new state back with `to_host`. Inside `jit` the transfers are
`jax.device_put(x, jax.memory.Space.Host / Device)`, which XLA schedules as
asynchronous copies per array, so a step streams each leaf's state in and out
while other leaves compute; the state never has to stay resident on the
accelerator between steps. The cost (PCIe traffic of 2 x state bytes per
step) is measured by `jaxbnb bench optim` (column `paged_adamw8bit`).

The helpers work on any pytree. Leaves that are not arrays (None, Python
numbers) pass through unchanged, and so does everything on a platform whose
devices expose no host memory. On CPU, `"device"` and `"pinned_host"` are
both host RAM: placement is recorded in the array's sharding, and results are
bit-identical to the unpaged optimizer.

An update keeps the state in the memory space it came in
(`in_host_memory`): the memory space is part of an array's type inside
`jit`, and wrappers that select between the old and the new state
(`optax.MultiSteps`, `jax.lax.cond`, a `scan` over steps) need both of the
same type. A paged state that arrives typed as device memory thus stays
there, and the optimizer warns. That is what a checkpoint restore gives:
`jax.eval_shape` drops memory kinds, and orbax restores arrays whose type
says device memory even when their sharding says `pinned_host`;
`jax.device_put(x, jax.memory.Space.Host)` moves them back (type included).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["DEVICE_KIND", "HOST_KINDS", "commit_beside", "host_memory_kind",
           "in_host_memory", "memory_kinds", "place_like", "to_device",
           "to_host"]

DEVICE_KIND = "device"
HOST_KINDS = ("pinned_host", "unpinned_host")


def _kinds(device) -> tuple[str, ...]:
  try:
    return tuple(m.kind for m in device.addressable_memories())
  except Exception:  # pylint: disable=broad-except
    return ()


def host_memory_kind(device: Any = None) -> str | None:
  """The host memory kind for optimizer state on `device`, or None.

  `"pinned_host"` (DMA-able, what XLA's host offloading uses) is preferred
  over `"unpinned_host"`; None means the device has no host memory kind and
  paged state stays in device memory.

  Args:
    device: a `jax.Device`; default `jax.devices()[0]`.

  Returns:
    The memory kind name, or None.

  Examples:
    >>> host_memory_kind() in ("pinned_host", "unpinned_host", None)
    True
  """
  device = jax.devices()[0] if device is None else device
  kinds = _kinds(device)
  for kind in HOST_KINDS:
    if kind in kinds:
      return kind
  return None


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _place(x, kind: str | None, space):
  """Moves one leaf into memory `kind` (eager) or memory space (traced)."""
  if not _is_array(x) or kind is None:
    return x
  if isinstance(x, jax.core.Tracer):
    return jax.device_put(x, space)
  if not isinstance(x, jax.Array):
    x = jax.device_put(x)
  sharding = x.sharding
  if sharding.memory_kind == kind:
    return x
  target = sharding.with_memory_kind(kind)
  try:
    return jax.device_put(x, target)
  except jax.errors.JaxRuntimeError as e:
    # JAX 0.12.1 on the CPU: a jitted program's host-memory output carries
    # a layout (`S(5)`) that `device_put` refuses to copy ("Unsupported
    # layout used for PjRt CPU buffers"); a jitted move does it (a jitted
    # identity would keep the host memory space in the array's type).
    if "Unsupported layout" not in str(e):
      raise
    return jax.jit(lambda a: jax.device_put(a, space),
                   out_shardings=target)(x)


def _tree_kind(tree, want_host: bool) -> str | None:
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      device = next(iter(leaf.sharding.device_set))
      return host_memory_kind(device) if want_host else (
          DEVICE_KIND if DEVICE_KIND in _kinds(device) else None)
  device = jax.devices()[0]
  if want_host:
    return host_memory_kind(device)
  return DEVICE_KIND if DEVICE_KIND in _kinds(device) else None


def in_host_memory(tree) -> bool:
  """Whether the arrays of `tree` are typed as host memory (the paged home).

  Reads the memory space from the arrays' types (`jax.typeof(x).
  memory_space`), which is what `jit` sees, so it works on concrete arrays
  and tracers alike. True as well where there is nothing to page: no
  arrays, or a platform without a host memory kind.

  Args:
    tree: a pytree of arrays (e.g. `Optimizer8bitState.state1`).

  Returns:
    False if an array of `tree` is in device memory, else True.

  Examples:
    >>> import jax.numpy as jnp
    >>> in_host_memory(to_host([jnp.zeros(4)])), in_host_memory([jnp.zeros(4)])
    (True, False)
  """
  if host_memory_kind() is None:
    return True
  for leaf in jax.tree.leaves(tree):
    if _is_array(leaf):
      space = getattr(jax.typeof(leaf), "memory_space", None)
      if space is not None and space != jax.memory.Space.Host:
        return False
  return True


def to_host(tree):
  """Places every array of `tree` in host memory (the paged state home).

  Works eagerly (a `device_put` to the same sharding with a host memory kind)
  and inside `jit` (a transfer to `jax.memory.Space.Host`, so the jitted
  output lands in host memory). Shardings other than the memory kind are
  kept. A no-op where the device has no host memory kind.

  Args:
    tree: a pytree of arrays (e.g. `Optimizer8bitState.state1`).

  Returns:
    The same tree with its arrays in host memory.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = to_host({"m": jnp.zeros(4)})
    >>> memory_kinds(x)["m"] in ("pinned_host", "unpinned_host")
    True
  """
  kind = _tree_kind(tree, want_host=True)
  return jax.tree.map(lambda x: _place(x, kind, jax.memory.Space.Host), tree)


def to_device(tree):
  """Places every array of `tree` in device memory (inverse of `to_host`).

  Args:
    tree: a pytree of arrays.

  Returns:
    The same tree with its arrays in the devices' default memory.

  Examples:
    >>> import jax.numpy as jnp
    >>> memory_kinds(to_device(to_host([jnp.zeros(4)])))
    ['device']
  """
  kind = _tree_kind(tree, want_host=False)
  return jax.tree.map(lambda x: _place(x, kind, jax.memory.Space.Device),
                      tree)


def place_like(tree, like):
  """The arrays of `tree` (one parameter's states) on `like`'s devices.

  `to_host` keeps an array's sharding and changes its memory kind, so the
  states must first be where the parameter is: with a parameter sharded
  over a mesh (`NamedSharding`), a state of its shape is sharded as it is,
  a stacked state (AdEMAMix, `(2, *shape)`) too along the other axes, and
  anything else (the absmax) replicated over the mesh; with a parameter
  committed to one device, the states go to that device. A parameter that
  is not a committed array (traced, uncommitted, numpy) or another kind of
  sharding leaves `tree` as it is.

  Args:
    tree: a pytree of arrays (the states of one parameter).
    like: the parameter.

  Returns:
    `tree` with its arrays placed as described.

  Examples:
    >>> import jax.numpy as jnp
    >>> p = jax.device_put(jnp.ones((4, 3)), jax.devices()[0])
    >>> s = place_like({"m": jnp.zeros((4, 3)), "a": jnp.zeros(1)}, p)
    >>> s["m"].committed, s["a"].sharding == p.sharding
    (True, True)
  """
  if (not isinstance(like, jax.Array) or isinstance(like, jax.core.Tracer)
      or not like.committed):
    return tree
  sharding = like.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (like.ndim - len(sharding.spec))
    mesh = sharding.mesh
    def target(x):
      if tuple(x.shape) == tuple(like.shape):
        return sharding
      if tuple(x.shape[1:]) == tuple(like.shape):
        return jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, *spec))
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  elif len(sharding.device_set) == 1:
    one = jax.sharding.make_single_device_sharding(
        next(iter(sharding.device_set)))
    target = lambda x: one
  else:
    return tree
  return jax.tree.map(
      lambda x: jax.device_put(x, target(x)) if _is_array(x) else x, tree)


def commit_beside(x: jax.Array, tree) -> jax.Array:
  """`x` committed, replicated, to the devices of `tree`'s arrays.

  `to_host` commits the arrays it places (a memory kind needs an explicit
  sharding). A jitted step whose outputs are then all committed would see
  its first input state (the committed host arrays beside an uncommitted
  `count` from `jnp.zeros`) differ from the second one, and compile
  twice; committing `count` too keeps one compiled step. `x` stays as it
  is where `tree` holds no committed array (nothing was placed).

  Args:
    x: a small array (the step count), in device memory.
    tree: a pytree of arrays (the paged states).

  Returns:
    `x`, committed in device memory on `tree`'s devices, or `x` unchanged.

  Examples:
    >>> import jax.numpy as jnp
    >>> count = commit_beside(jnp.zeros([], jnp.int32), to_host([jnp.ones(4)]))
    >>> count.committed if host_memory_kind() else True
    True
  """
  for leaf in jax.tree.leaves(tree):
    if (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        and leaf.committed):
      sharding = leaf.sharding
      if isinstance(sharding, jax.sharding.NamedSharding):
        target = jax.sharding.NamedSharding(sharding.mesh,
                                            jax.sharding.PartitionSpec())
      elif len(sharding.device_set) == 1:
        target = jax.sharding.make_single_device_sharding(
            next(iter(sharding.device_set)))
      else:
        return x
      if DEVICE_KIND in _kinds(next(iter(sharding.device_set))):
        target = target.with_memory_kind(DEVICE_KIND)
      return jax.device_put(x, target)
  return x


def memory_kinds(tree):
  """The memory kind of every concrete array of `tree` (None elsewhere).

  Examples:
    >>> import jax.numpy as jnp
    >>> memory_kinds((jnp.zeros(2), None))
    ('device', None)
  """
  def kind(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      return x.sharding.memory_kind
    return None
  return jax.tree.map(kind, tree, is_leaf=lambda x: x is None)
