"""Where the pieces of a QLoRA run live on a device mesh (FSDP-QLoRA).

`shard_for_training(model, optimizer, mesh)` places every array of a run:

* the frozen base by `ShardingRules` (`jaxbnb.convert.ShardingRules`): a
  4-bit weight split along its output rows over "fsdp" (and "tensor"),
  float matrices along their largest dimension; a base loaded with
  `from_pretrained(..., mesh=mesh)` already is, and stays put;
* each LoRA adapter (`lora_A` `[r, in]`, `lora_B` `[out, r]`) split along
  its largest dimension over the FSDP axis when that axis' size divides
  it, replicated otherwise; vectors (DoRA's magnitude) replicated. The
  adapters are replicated over "data" and "tensor" (they are small; the
  base carries the tensor split). `ShardingRules.overrides` apply to the
  base only;
* the optimizer state follows its parameter: float32 moments (and the
  uint8 `codes` of an 8-bit `Quantized8bit` state) take the parameter's
  spec. The 8-bit state's `absmax` holds one float32 per block of 256
  elements of the FLATTENED parameter, so it splits with the parameter
  only when the parameter is split along dimension 0 alone and each shard
  holds whole blocks (`size / shards % 256 == 0`, e.g. `lora_B` of a large
  projection); otherwise (a `lora_A` split along `in`, whose shards are
  not contiguous in the flat order, or shards cutting a block) the absmax
  is replicated, a float32 per 256 parameters on every device. XLA
  gathers what a quantization step needs; the numbers are those of one
  device;
* everything else (RNG keys and counts, step counters) replicated.

Batches `[..., B, T]` split their batch axis `B` over "data" and the FSDP
axis together (`batch_sharding`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbnb._src.io import sharding as sharding_lib
from jaxbnb._src.optim.state import BLOCKSIZE
from jaxbnb._src.optim.state import Quantized8bit
from jaxbnb._src.quant import weights

__all__ = ["adapter_spec", "batch_axes", "batch_sharding", "check_batch_size",
           "model_mesh", "put", "shard_for_training"]

DATA = "data"
_BASE_LAYER = ".base_layer"


def adapter_spec(shape: tuple[int, ...], mesh: Mesh,
                 fsdp: str | None) -> P:
  """The spec of an adapter of `shape`: its largest dimension (the first on
  a tie) over `fsdp` when the axis' size divides it, else replicated.

  Examples:
    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> adapter_spec((8, 4096), mesh, "fsdp"), adapter_spec((8,), mesh, "fsdp")
    (P(None, 'fsdp'), P())
  """
  if fsdp is None or len(shape) < 2:
    return P()
  d = max(range(len(shape)), key=lambda i: (shape[i], -i))
  if shape[d] % mesh.shape[fsdp]:
    return P()
  return P(*([None] * d), fsdp)


def _absmax_spec(param_spec: P, shape: tuple[int, ...], mesh: Mesh,
                 lead: int) -> P:
  """The spec of a `Quantized8bit.absmax` (`lead` stacked states first)."""
  entries = tuple(param_spec)
  if not entries or entries[0] is None or any(
      e is not None for e in entries[1:]):
    return P()
  axes = entries[0] if isinstance(entries[0], tuple) else (entries[0],)
  shards = math.prod(mesh.shape[a] for a in axes)
  n = math.prod(shape)
  if n % shards or (n // shards) % BLOCKSIZE:
    return P()
  return P(*([None] * lead), entries[0])


def _state_specs(value: Any, tail: tuple[str, ...],
                 param_shape: tuple[int, ...], spec: P, mesh: Mesh) -> Any:
  """Specs for one optimizer state entry of a parameter (see the module
  docstring). `tail` is the entry's path below the parameter's (NNX holds
  a `Quantized8bit`'s `codes` and `absmax` as two variables); anything not
  shaped like the parameter is replicated."""
  def like_param(shape):
    shape = tuple(shape)
    if shape == param_shape:
      return spec
    if shape[1:] == param_shape and len(spec):
      return P(None, *spec)  # stacked states (AdEMAMix)
    return P()

  def absmax(shape):
    lead = len(shape) - 1
    if lead not in (0, 1) or not len(spec):
      return P()
    return _absmax_spec(spec, param_shape, mesh, lead)

  if isinstance(value, Quantized8bit):
    return Quantized8bit(codes=like_param(value.codes.shape),
                         absmax=absmax(value.absmax.shape),
                         signed=value.signed)
  if tail and tail[-1] == "absmax":
    return absmax(np.shape(value))
  return jax.tree.map(lambda x: like_param(np.shape(x)), value)


def _find_param(parts: list[str], params: dict[str, Any]
                ) -> tuple[str | None, tuple[str, ...]]:
  """The parameter path inside an optimizer state path, and what follows
  it (e.g. `("codes",)`); `(None, ())` when there is none."""
  for j in range(len(parts), 0, -1):
    for k in range(j):
      name = ".".join(parts[k:j])
      if name in params:
        return name, tuple(parts[j:])
  return None, ()


def put(x: Any, sharding: NamedSharding) -> jax.Array:
  """`jax.device_put(x, sharding)`, also onto a mesh with devices of other
  processes (`jax.distributed`): there every process holds the same whole
  `x` (a host or local array) and gives its own devices their slices.

  Examples:
    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> put(np.arange(4.0), NamedSharding(mesh, P("fsdp"))).shape
    (4,)
  """
  if sharding.is_fully_addressable or (
      isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key):
    data = put(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda idx: host[idx])


def _put(value: Any, specs: Any, mesh: Mesh) -> Any:
  """`value`'s arrays placed by `specs` (memory kinds kept)."""
  def one(x, spec):
    if not isinstance(x, (jax.Array, np.ndarray)):
      return x
    kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    return put(x, NamedSharding(mesh, spec, memory_kind=kind))
  return jax.tree.map(one, value, specs)


def _replicated(value: Any) -> Any:
  return jax.tree.map(lambda _: P(), value)


def _hf_name(path: str) -> str:
  return path.replace(_BASE_LAYER + ".", ".")


def shard_for_training(model: nnx.Module, optimizer: nnx.Optimizer | None,
                       mesh: Mesh,
                       sharding: sharding_lib.ShardingRules | Mapping | None
                       = None) -> None:
  """Places every array of `model` and `optimizer` on `mesh`, in place.

  See the module docstring for the layout. Arrays already where they
  belong are not moved (a base from `from_pretrained(..., mesh=mesh)`).

  Args:
    model: a Llama-family model (its variables' dotted paths are the HF
      names the rules match), with adapters or not.
    optimizer: its `nnx.Optimizer(..., wrt=nnx.LoRAParam)`, or None.
    mesh: the mesh.
    sharding: `ShardingRules` (or a dict of its fields) for the base;
      default `ShardingRules()`.

  Raises:
    ValueError: an axis of the rules that does not divide the dimension
      it splits, or a row shard cutting a 4-bit block (see
      `ShardingRules`).
  """
  rules = sharding_lib.resolve(sharding)
  fsdp, _ = rules.axes(mesh)
  lora_paths = {}
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    name = ".".join(map(str, path))
    value = var.get_value()
    if isinstance(var, nnx.LoRAParam):
      spec = adapter_spec(tuple(np.shape(value)), mesh, fsdp)
      lora_paths[name] = (tuple(np.shape(value)), spec)
      specs = spec
    elif isinstance(var, nnx.RngState) or isinstance(var, nnx.OptState):
      specs = _replicated(value)
    elif isinstance(value, weights.QuantizedArray):
      specs = sharding_lib.quantized_specs(rules, _hf_name(name), value, mesh)
    elif isinstance(var, nnx.Param):
      specs = rules.spec(_hf_name(name), np.shape(value), mesh)
    else:
      specs = _replicated(value)
    var.set_value(_put(value, specs, mesh))
  if optimizer is None:
    return
  for path, var in nnx.iter_graph(optimizer):
    if not isinstance(var, nnx.Variable):
      continue
    value = var.get_value()
    match, tail = _find_param([str(p) for p in path], lora_paths)
    if match is None:
      specs = _replicated(value)
    else:
      shape, spec = lora_paths[match]
      specs = _state_specs(value, tail, shape, spec, mesh)
    var.set_value(_put(value, specs, mesh))


def batch_axes(mesh: Mesh,
               sharding: sharding_lib.ShardingRules | Mapping | None = None
               ) -> tuple[str, ...]:
  """The mesh axes a batch splits over: "data" and the FSDP axis, those
  the mesh has."""
  fsdp, _ = sharding_lib.resolve(sharding).axes(mesh)
  # dict: once each, also when the rules name "data" as the FSDP axis
  return tuple(dict.fromkeys(a for a in (DATA, fsdp)
                             if a is not None and a in mesh.shape))


def batch_sharding(mesh: Mesh, ndim: int, axis: int,
                   sharding: sharding_lib.ShardingRules | Mapping | None = None
                   ) -> NamedSharding:
  """A `NamedSharding` splitting dimension `axis` of an `ndim`-dimensional
  batch over `batch_axes(mesh)`."""
  axes = batch_axes(mesh, sharding)
  parts = [None] * ndim
  if axes:
    parts[axis] = axes if len(axes) > 1 else axes[0]
  while parts and parts[-1] is None:
    parts.pop()
  return NamedSharding(mesh, P(*parts))


def check_batch_size(batch_size: int, mesh: Mesh,
                     sharding: sharding_lib.ShardingRules | Mapping | None
                     = None, *, prefix: str = "finetune: `batch_size`=",
                     ) -> None:
  """Raises unless `batch_size` splits evenly over `batch_axes(mesh)`.

  Args:
    batch_size: sequences per micro-batch.
    mesh: the mesh.
    sharding: the run's `ShardingRules` (its FSDP axis).
    prefix: starts the message (the argument's name).

  Raises:
    ValueError: naming the argument, the axes and their size.
  """
  axes = batch_axes(mesh, sharding)
  size = math.prod(mesh.shape[a] for a in axes)
  if batch_size % size:
    raise ValueError(
        f"{prefix}{batch_size} must be a multiple of the size of the mesh "
        f"axes a batch splits over, {list(axes)}: {size}.")


def model_mesh(model: nnx.Module) -> Mesh | None:
  """The mesh the model's weights are sharded on (None: no multi-device
  mesh, e.g. a model on one device)."""
  for x in jax.tree.leaves(nnx.state(model)):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
      return s.mesh
  return None
