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

**Row-parallel 4-bit layout.** Computed by output rows, o_proj and
down_proj cost two collectives each (their input gathered, their output
gathered for the residual). `row_parallel` (which `Generator` applies to
its own copy of the weights, never to the model) re-lays their 4-bit
weights by input columns: the packed bytes as the `[out, in / 2]` matrix
they are, split over the tensor axis along the second dimension, and the
absmax as `[out, in / blocksize]` float32 split likewise (double-quant
codes dequantized first, as `dequantize_4bit` does, since a column slice
does not fill whole nested blocks). A device's slice is itself a
bitsandbytes 4-bit matrix `[out, in / T]`, so the same kernels run on it
against the device's slice of the input (the heads or hidden units it
already holds), and one all-reduce of the `[..., out]` partial sums (each
rounded to the compute dtype, then added in float32) replaces the two
gathers. It applies where every slice holds
whole blocks (`in` a multiple of T x blocksize) and the layer has no bias;
the others keep the row layout.

A LoRA adapter on a quantized linear (QLoRA) keeps its base on this
path: the base runs per device, and the adapter's small float product is
added under GSPMD (`LoRALinear.add_adapter`). DoRA, which needs the dense
base weight, runs the whole layer under GSPMD (and keeps the row layout).

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
from jaxbnb._src.layers.common import apply_quantized
from jaxbnb._src.layers.lora import LoRALinear
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant import ops
from jaxbnb._src.quant import storage_words
from jaxbnb._src.quant.weights import Int8Params
from jaxbnb._src.quant.weights import Params4bit

__all__ = ["TensorParallel", "activate", "current", "from_arrays", "linear",
           "row_parallel"]

# Leaves of a quantized weight that hold its rows (split with them).
_ROW_LEAVES = ("data", "absmax", "CB", "SCB")
# The projections whose input arrives split over the tensor axis (heads,
# hidden units): laid out by input columns by `row_parallel`.
_ROW_PARALLEL = ("o_proj", "down_proj")

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


def check_mesh(mesh: Mesh, config: LlamaConfig, what: str) -> None:
  """Refuses a mesh whose "tensor" axis does not divide `config`'s heads.

  What `Generator` checks once the model is loaded, for callers that know
  the config before loading it (the CLI's `--mesh`).

  Raises:
    ValueError: starting with `what`, as `TensorParallel.check`.
  """
  if "tensor" in mesh.shape:
    data = "data" if "data" in mesh.shape else None
    TensorParallel(mesh, "tensor", data).check(config, what)


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
  if _by_columns(weight):
    return _columns_call(tp, layer, x)
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
  # Otherwise this shard's absmax dequantized, as `dequantize_4bit` does.
  return Params4bit(weight.data, dataclasses.replace(
      qs, shape=shape, absmax=ops.float_absmax(qs, shard * blocks),
      offset=None, nested_absmax=None, nested_code=None))


def _names(path) -> tuple:
  """The keys and attribute names of a pytree path."""
  return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def _leaf_spec(path, axis: str) -> P:
  """A layer state leaf's spec: the bias and a quantized weight's row
  leaves (packed bytes, absmax; int8 rows, row scales) split over `axis`,
  the small statistics replicated."""
  names = _names(path)
  if names and names[0] == "bias":
    return P(axis)
  return P(axis) if names and names[-1] in _ROW_LEAVES else P()


def _rows_call(tp: TensorParallel, layer, x):
  """`layer(x)` with the layer's rows split over `tp.axis`: each device
  runs the layer's own forward on its rows; the output's last dimension
  comes out split the same way."""
  axis, n = tp.axis, tp.size
  # LLM.int8 with outliers picks its outlier columns over the whole batch:
  # split over a data axis, each shard would pick its own. Such a layer
  # takes the whole batch on every device.
  outliers = (isinstance(layer.weight.get_value(), Int8Params)
              and getattr(layer, "threshold", 0.0) > 0)
  batch = None if outliers else tp.batch_axis(x.shape[0])
  x_spec = P(batch, *([None] * (x.ndim - 1)))
  out_spec = P(batch, *([None] * (x.ndim - 2)), axis)
  graphdef, state = nnx.split(layer)
  paths, treedef = jax.tree_util.tree_flatten_with_path(state)
  state_spec = jax.tree.unflatten(
      treedef, [_leaf_spec(path, axis) for path, _ in paths])
  # Packed bytes in a 16-bit float storage cross into the shard_map (a
  # reshard on an fsdp x tensor mesh) as 32-bit words (`storage_words`).
  words = [storage_words.word_dtype(leaf, n)
           if _names(path)[-1:] == ("data",) else None
           for path, leaf in paths]
  state = jax.tree.unflatten(treedef, [
      leaf if w is None else storage_words.as_words(leaf)
      for w, (_, leaf) in zip(words, paths)])

  def body(x, state):
    state = jax.tree.unflatten(treedef, [
        leaf if w is None else storage_words.from_words(leaf, w)
        for w, leaf in zip(words, jax.tree.leaves(state))])
    local = nnx.merge(graphdef, state)
    local.weight.set_value(_local_weight(local.weight.get_value(), n, axis))
    return local(x)

  # Pallas' interpret mode cannot trace its grid loop under shard_map's
  # varying-axes check (tests/quant/dispatch_test.py); compiled kernels and
  # the jnp reference keep it.
  check = dispatch.resolve() != "interpret"
  return jax.shard_map(body, mesh=tp.mesh, in_specs=(x_spec, state_spec),
                       out_specs=out_spec, check_vma=check)(x, state)


def _by_columns(weight) -> bool:
  """Whether `weight` is in `row_parallel`'s layout (packed bytes as the
  `[out, in / 2]` matrix, not bitsandbytes' `[n / 2, 1]`)."""
  return (isinstance(weight, Params4bit) and weight.data.ndim == 2
          and weight.data.shape[1] > 1)


def _column_split(weight, has_bias: bool, n: int) -> bool:
  """Whether `weight` can be laid out by input columns over `n` devices:
  a 4-bit weight without bias whose column slices hold whole blocks."""
  if not isinstance(weight, Params4bit) or has_bias or n < 2:
    return False
  out, inn = (int(d) for d in weight.quant_state.shape)
  bs = weight.quant_state.blocksize
  return (inn % (n * bs) == 0
          and (out * inn // 2) % weight.data.dtype.itemsize == 0)


def row_parallel(state: Any, tp: TensorParallel | None) -> Any:
  """`state` with its 4-bit o_proj/down_proj weights laid out by input
  columns over `tp.axis` (see the module docstring); other leaves as they
  are. A new state: the arrays it was given are not changed.

  Args:
    state: an `nnx.State` of a model on `tp.mesh` (e.g. `Generator`'s).
    tp: the tensor-parallel setup; None or a tensor axis of size 1 returns
      `state` unchanged.

  Returns:
    The state, with the new layout where a weight allows it (no bias,
    whole blocks per column slice, not under DoRA).
  """
  if tp is None or tp.axis is None or tp.size < 2:
    return state
  is_w = lambda x: isinstance(x, Params4bit)  # noqa: E731
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_w)
  names = [_names(path) for path, _ in leaves]
  present = {name for name, (_, leaf) in zip(names, leaves)
             if leaf is not None}
  dora = {name[:-2] for name in present
          if name[-2:] == ("lora_magnitude_vector", "value")}
  n, axis = tp.size, tp.axis
  cols = NamedSharding(tp.mesh, P(None, axis))

  @jax.jit
  def relayout(weight):
    qs = weight.quant_state
    out, inn = qs.shape
    data = weight.data
    if data.dtype != jnp.uint8:  # another quant_storage: its bytes
      data = jax.lax.bitcast_convert_type(data, jnp.uint8)
    data = jax.lax.with_sharding_constraint(
        data.reshape(out, inn // 2), cols)
    absmax = jax.lax.with_sharding_constraint(
        ops.float_absmax(qs).reshape(out, inn // qs.blocksize), cols)
    return Params4bit(data, dataclasses.replace(
        qs, absmax=absmax, offset=None, nested_absmax=None,
        nested_code=None))

  new = []
  for name, (_, leaf) in zip(names, leaves):
    if is_w(leaf) and len(name) >= 2 and "weight" in name:
      layer = name[:name.index("weight")]
      owner = layer[:-1] if layer and layer[-1] == "base_layer" else layer
      has_bias = layer + ("bias", "value") in present
      if (owner and owner[-1] in _ROW_PARALLEL and owner not in dora
          and _column_split(leaf, has_bias, n)):
        leaf = relayout(leaf)
    new.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, new)


def _columns_call(tp: TensorParallel, layer, x):
  """`layer(x)` for a weight in `row_parallel`'s layout: each device
  multiplies its slice of `x`'s last dimension by its column slice of the
  weight; the partial sums are added over `tp.axis` in float32."""
  axis, n = tp.axis, tp.size
  if layer.bias is not None:
    raise ValueError("row_parallel layout: the layer must have no bias")
  batch = tp.batch_axis(x.shape[0])
  x_spec = P(batch, *([None] * (x.ndim - 2)), axis)
  out_spec = P(batch, *([None] * (x.ndim - 1)))
  graphdef, state = nnx.split(layer)
  paths, treedef = jax.tree_util.tree_flatten_with_path(state)

  def spec(path):
    names = _names(path)
    return P(None, axis) if names and names[-1] in ("data", "absmax") else P()

  state_spec = jax.tree.unflatten(treedef, [spec(p) for p, _ in paths])

  def body(x, state):
    local = nnx.merge(graphdef, state)
    w = local.weight.get_value()
    qs = w.quant_state
    out, inn = qs.shape
    w = Params4bit(w.data.reshape(-1, 1), dataclasses.replace(
        qs, shape=(out, inn // n), absmax=qs.absmax.reshape(-1)))
    y = apply_quantized(x, w, None, local.dtype)
    return jax.lax.psum(y.astype(jnp.float32), axis).astype(y.dtype)

  check = dispatch.resolve() != "interpret"
  return jax.shard_map(body, mesh=tp.mesh, in_specs=(x_spec, state_spec),
                       out_specs=out_spec, check_vma=check)(x, state)
