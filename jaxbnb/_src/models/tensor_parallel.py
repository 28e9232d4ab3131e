"""Tensor-parallel decoding of a model whose weights are sharded on a mesh.

A model loaded with `from_pretrained(..., mesh=mesh)` holds `jax.Array`s
with `NamedSharding`s. Under `jax.jit`, GSPMD partitions the float parts of
the model by itself (a column-parallel linear splits its output, a
row-parallel one its input and all-reduces). Two things it cannot do well
are done here:

* **The KV cache** is sharded by key/value heads over the tensor axis (and
  its rows over the data axis when the batch divides), so each device
  attends with its own heads only. That needs `num_key_value_heads` to be a
  multiple of the tensor axis size.
* **Quantized linears** run through `jax.shard_map`. A `Params4bit` is
  stored flat (the `[out, in]` matrix row-major, blocks along the flat
  array), so the loader splits it along its OUTPUT rows only: every
  device holds whole rows and whole blocks. A Pallas kernel (the 4-bit
  GEMV, the dequantize kernel) is opaque to GSPMD, which would all-gather
  the whole packed weight before it, at every step. Inside `shard_map`
  each device runs the kernel (or the jnp reference) on its own rows: the
  activation `[..., in]` is replicated over the tensor axis and the
  output `[..., out]` comes out split over it. For the column-parallel
  linears (q/k/v/gate/up) that is what the next op wants. For the
  row-parallel ones (o_proj, down_proj) a split of the input dimension
  would cut every row of the flat layout into strided pieces, so they are
  also computed by output rows: GSPMD all-gathers their (small) input
  activation instead of all-reducing their output. At decode time both are
  a few KiB per layer; the weight never moves.

With double quantization the absmax codes are split with the rows, and the
nested statistics (one float per 256 absmax values, the offset) are
replicated. A shard whose blocks fill whole nested blocks takes its slice
of the nested absmax; otherwise its absmax is dequantized to float32 first
(the same arithmetic as `dequantize_4bit`, bit for bit).

A LoRA adapter on a quantized linear (QLoRA) keeps its base on this
path: the base runs per device, and the adapter's small float product is
added under GSPMD (`LoRALinear.add_adapter`). DoRA, which needs the dense
base weight, runs the whole layer under GSPMD.

`activate(tp)` turns this on while a function is traced; `Generator` does
it for its compiled functions when the model's weights live on a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbnb._src.layers.common import QuantizedLinear
from jaxbnb._src.layers.lora import LoRALinear
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant.weights import Int8Params
from jaxbnb._src.quant.weights import Params4bit

__all__ = ["TensorParallel", "activate", "current", "from_arrays", "linear"]

# Leaves of a quantized weight that hold its rows (split with them).
_ROW_LEAVES = ("data", "absmax", "CB", "SCB")

_CURRENT: contextvars.ContextVar["TensorParallel | None"] = (
    contextvars.ContextVar("jaxbnb_tensor_parallel", default=None))


@dataclasses.dataclass(frozen=True)
class TensorParallel:
  """Where a sharded model's decoding runs.

  Attributes:
    mesh: the device mesh the weights live on.
    axis: the tensor-parallel mesh axis (heads and linear rows are split
      over it), or None.
    data_axis: the mesh axis batch rows are split over, or None.
  """

  mesh: Mesh
  axis: str | None = "tensor"
  data_axis: str | None = "data"

  def __post_init__(self):
    for field in ("axis", "data_axis"):
      name = getattr(self, field)
      if name is not None and name not in self.mesh.shape:
        raise ValueError(
            f"TensorParallel: `{field}` must be an axis of the mesh "
            f"{list(self.mesh.axis_names)}, got {name!r}.")

  @property
  def size(self) -> int:
    """Devices along the tensor axis (1 without one)."""
    return 1 if self.axis is None else int(self.mesh.shape[self.axis])

  def check(self, config: LlamaConfig, what: str = "Generator") -> None:
    """Raises ValueError if the tensor axis does not divide the heads."""
    n = self.size
    for field in ("num_key_value_heads", "num_attention_heads"):
      heads = getattr(config, field)
      if heads % n:
        raise ValueError(
            f"{what}: mesh axis {self.axis!r} (size {n}) must divide the "
            f"model's {field}, got {heads}: the KV cache is split by "
            f"key/value heads over {self.axis!r}. Use a tensor axis size "
            f"that divides {config.num_key_value_heads}.")

  def batch_axis(self, batch: int) -> str | None:
    """The data axis if it splits `batch` rows evenly, else None."""
    if self.data_axis is None:
      return None
    size = int(self.mesh.shape[self.data_axis])
    return self.data_axis if size > 1 and batch % size == 0 else None

  def cache_sharding(self, batch: int) -> NamedSharding:
    """Sharding of the stacked `[layers, B, S, kv_heads, head_dim]` K/V."""
    return NamedSharding(self.mesh, P(None, self.batch_axis(batch), None,
                                      self.axis, None))

  def rows_sharding(self, batch: int, ndim: int) -> NamedSharding:
    """Sharding of a `[B, ...]` array of per-row data."""
    return NamedSharding(self.mesh, P(self.batch_axis(batch),
                                      *([None] * (ndim - 1))))


def from_arrays(tree: Any, *, axis: str | None = "tensor",
                data_axis: str | None = "data") -> TensorParallel | None:
  """The `TensorParallel` of a pytree of arrays on a mesh, or None.

  The mesh is the first `NamedSharding` mesh of more than one device found
  among the leaves; `axis` / `data_axis` are used where it has them.

  Args:
    tree: e.g. the `nnx.State` of a model.
    axis: the tensor axis name to look for.
    data_axis: the data axis name to look for.

  Returns:
    None when no leaf lives on a multi-device mesh, or the mesh has neither
    axis.
  """
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      mesh = sharding.mesh
      names = mesh.shape
      tp = TensorParallel(mesh, axis if axis in names else None,
                          data_axis if data_axis in names else None)
      if tp.axis is None and tp.data_axis is None:
        return None
      return tp
  return None


def current() -> TensorParallel | None:
  """The `TensorParallel` active for tracing, if any."""
  return _CURRENT.get()


@contextlib.contextmanager
def activate(tp: TensorParallel | None) -> Iterator[None]:
  """Traces the enclosed model calls for `tp` (None: plain calls)."""
  token = _CURRENT.set(tp)
  try:
    yield
  finally:
    _CURRENT.reset(token)


def linear(layer, x: jax.Array) -> jax.Array:
  """`layer(x)`, through `shard_map` when it is quantized and a
  `TensorParallel` is active (see the module docstring)."""
  tp = _CURRENT.get()
  if tp is None or tp.axis is None or tp.size == 1 or x.ndim < 2:
    return layer(x)
  if (isinstance(layer, LoRALinear)
      and isinstance(layer.base_layer, QuantizedLinear)
      and layer.lora_magnitude_vector is None):
    # QLoRA: the quantized base per device, the (small, float) adapter
    # term under GSPMD. (DoRA needs the dense base weight: GSPMD.)
    return layer.add_adapter(x, linear(layer.base_layer, x))
  if not isinstance(layer, QuantizedLinear):
    return layer(x)
  weight = layer.weight.get_value()
  bias = None if layer.bias is None else layer.bias[...]
  if not _splits(weight, bias, tp.size):
    return layer(x)
  return _rows_call(tp, layer, x)


def _splits(weight, bias, n: int) -> bool:
  """Whether each of `n` row shards of `weight` holds whole blocks."""
  if not isinstance(weight, (Params4bit, Int8Params)):
    return False
  out, inn = (int(d) for d in weight.shape)
  if out % n or (bias is not None and bias.shape[0] % n):
    return False
  if isinstance(weight, Params4bit):
    qs = weight.quant_state
    rows_elems = out // n * inn
    data = weight.data
    return (rows_elems % qs.blocksize == 0 and rows_elems % 2 == 0
            and data.shape[0] % n == 0 and qs.absmax.shape[0] % n == 0
            and data.shape[0] // n * data.dtype.itemsize * math.prod(
                data.shape[1:]) == rows_elems // 2)
  return True


def _local_weight(weight, n: int, axis: str):
  """This device's rows of `weight` (inside `shard_map`) as a weight."""
  if isinstance(weight, Int8Params):
    return weight  # its shape is that of its (local) rows
  qs = weight.quant_state
  out, inn = qs.shape
  shape = (out // n, inn)
  if not qs.nested:
    return Params4bit(weight.data, dataclasses.replace(qs, shape=shape))
  blocks = qs.absmax.shape[0]  # absmax codes of this shard
  nb = qs.nested_blocksize
  shard = jax.lax.axis_index(axis)
  if blocks % nb == 0:  # whole nested blocks: slice their statistics
    nested = jax.lax.dynamic_slice_in_dim(
        qs.nested_absmax, shard * (blocks // nb), blocks // nb)
    return Params4bit(weight.data, dataclasses.replace(
        qs, shape=shape, nested_absmax=nested))
  # Dequantize this shard's absmax as `dequantize_4bit` does: the fp32
  # product code * nested absmax, then (not fused into an FMA) + offset.
  index = shard * blocks + jnp.arange(blocks, dtype=jnp.int32)
  deq = (qs.nested_code.astype(jnp.float32)[qs.absmax.astype(jnp.int32)]
         * qs.nested_absmax.astype(jnp.float32)[index // nb])
  absmax = jax.lax.optimization_barrier(deq) + qs.offset.astype(jnp.float32)
  return Params4bit(weight.data, dataclasses.replace(
      qs, shape=shape, absmax=absmax, offset=None, nested_absmax=None,
      nested_code=None))


def _leaf_spec(path, axis: str) -> P:
  """A layer state leaf's spec: the bias and a quantized weight's row
  leaves (packed bytes, absmax; int8 rows, row scales) split over `axis`,
  the small statistics replicated."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  if names and names[0] == "bias":
    return P(axis)
  return P(axis) if names and names[-1] in _ROW_LEAVES else P()


def _rows_call(tp: TensorParallel, layer, x):
  """`layer(x)` with the layer's rows split over `tp.axis`: each device
  runs the layer's own forward on its rows; the output's last dimension
  comes out split the same way."""
  axis, n = tp.axis, tp.size
  batch = tp.batch_axis(x.shape[0])
  x_spec = P(batch, *([None] * (x.ndim - 1)))
  out_spec = P(batch, *([None] * (x.ndim - 2)), axis)
  graphdef, state = nnx.split(layer)
  paths, treedef = jax.tree_util.tree_flatten_with_path(state)
  state_spec = jax.tree.unflatten(
      treedef, [_leaf_spec(path, axis) for path, _ in paths])

  def body(x, state):
    local = nnx.merge(graphdef, state)
    local.weight.set_value(_local_weight(local.weight.get_value(), n, axis))
    return local(x)

  # Pallas' interpret mode cannot trace its grid loop under shard_map's
  # varying-axes check (tests/quant/dispatch_test.py); compiled kernels and
  # the jnp reference keep it.
  check = dispatch.resolve() != "interpret"
  return jax.shard_map(body, mesh=tp.mesh, in_specs=(x_spec, state_spec),
                       out_specs=out_spec, check_vma=check)(x, state)
