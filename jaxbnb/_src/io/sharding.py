"""Where each parameter of a Llama model lives on a device mesh.

`ShardingRules` maps a Hugging Face parameter name and shape to a
`jax.sharding.PartitionSpec` for a mesh whose axes are among "data",
"fsdp" and "tensor" (other names are allowed and left replicated):

* tensor parallelism ("tensor"): the column-parallel linears
  (`q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`) split their output
  dimension, the row-parallel ones (`o_proj`, `down_proj`) their input
  dimension; the embedding and `lm_head` split the vocabulary;
* FSDP ("fsdp"): every matrix splits its largest dimension that tensor
  parallelism leaves free (the first one on a tie);
* "data" never splits a parameter (it splits batches);
* vectors (norm weights, biases) are replicated, except the bias of a
  column-parallel linear, which follows its output dimension over "tensor".

A quantized weight is stored flat (`Params4bit`: the `[out, in]` matrix
flattened row-major, packed two codes a byte, one absmax per `blocksize`
elements), so it is split along its OUTPUT rows only, over every axis the
float rule would use (fsdp and tensor together): each device then holds
whole rows and whole quantization blocks, which needs
`(rows per shard * in_features) % blocksize == 0`. The packed bytes and the
absmax (float32, or the uint8 codes of double quantization) are split
alike; the small statistics (`code`, double quant's `offset`,
`nested_absmax`, `nested_code`) are replicated, so the nested blocks of 256
absmax values never need to line up with a shard. An `Int8Params` weight
splits its int8 rows `CB` and row scales `SCB` the same way.

Bad input raises `ValueError` naming the axis, the parameter and the
dimension: an axis (or product of axes) whose size does not divide the
dimension it splits, a row shard that cuts a quantization block, an axis
name the mesh does not have.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbnb._src.quant import weights

__all__ = ["ShardingRules", "param_spec", "parse_mesh", "quantized_specs"]

_COLUMN = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
_ROW = re.compile(r"(^|\.)(o_proj|down_proj)\.weight$")
_VOCAB = re.compile(r"(^|\.)(embed_tokens|lm_head)\.weight$")
# Leaves of a quantized weight that hold its rows (split); all others are
# small statistics (replicated).
_ROW_LEAVES = {"data", "absmax", "CB", "SCB"}
# The mesh axes the rules and the training loop know.
MESH_AXES = ("data", "fsdp", "tensor")
_MESH_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([^,=]*?)\s*$")


def parse_mesh(spec: str, devices: Sequence[Any] | None = None,
               *, axis_names: Sequence[str] = MESH_AXES,
               flag: str = "--mesh") -> Mesh:
  """A `Mesh` from a command-line spec such as `"data=2,fsdp=4"`.

  The axes come in the order written; the devices fill them row-major
  (the last axis varies fastest, so it spans neighbouring devices).

  Args:
    spec: comma-separated `name=size` items, e.g. `"fsdp=8"`,
      `"data=2,fsdp=2,tensor=2"`.
    devices: the devices to lay out (default: `jax.devices()`); the sizes
      must multiply to exactly their number.
    axis_names: the axis names accepted (default: "data", "fsdp",
      "tensor").
    flag: the option named in error messages.

  Returns:
    A `jax.sharding.Mesh` over `devices`.

  Raises:
    ValueError: naming `flag`, if an item is not `name=size`, a name is
      unknown or repeated, a size is not a positive integer, or the sizes
      do not multiply to the number of devices.

  Examples:
    >>> import jax
    >>> mesh = parse_mesh("fsdp=1", jax.devices()[:1])
    >>> dict(mesh.shape)
    {'fsdp': 1}
  """
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"{flag}: expected comma-separated name=size items "
                     f"such as 'data=2,fsdp=4', received {spec!r}.")
  names: list[str] = []
  sizes: list[int] = []
  for item in spec.split(","):
    m = _MESH_ITEM.match(item)
    if m is None:
      raise ValueError(
          f"{flag}: expected comma-separated name=size items such as "
          f"'data=2,fsdp=4', received {spec!r} (bad item {item.strip()!r}).")
    name, size = m.group(1), m.group(2)
    if name not in axis_names:
      raise ValueError(f"{flag}: unknown mesh axis {name!r} in {spec!r}; "
                       f"expected one of {list(axis_names)}.")
    if name in names:
      raise ValueError(f"{flag}: mesh axis {name!r} is given twice in "
                       f"{spec!r}.")
    if not re.fullmatch(r"[0-9]+", size) or int(size) < 1:
      raise ValueError(f"{flag}: the size of mesh axis {name!r} must be a "
                       f"positive integer, received {size!r} in {spec!r}.")
    names.append(name)
    sizes.append(int(size))
  total = math.prod(sizes)
  if total != len(devices):
    raise ValueError(
        f"{flag}: the axis sizes of {spec!r} multiply to {total}, expected "
        f"the number of devices, {len(devices)}.")
  return Mesh(np.array(devices, dtype=object).reshape(sizes), tuple(names))


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How `from_pretrained(..., mesh=mesh)` places parameters on `mesh`.

  Attributes:
    fsdp: the mesh axis FSDP splits parameters over. None (default): the
      axis named "fsdp" if the mesh has one, else no FSDP.
    tensor: the mesh axis of tensor parallelism. None (default): the axis
      named "tensor" if the mesh has one, else none.
    overrides: `(regex, PartitionSpec)` pairs tried in order against each
      HF parameter name (`re.search`); the first match's spec is used
      instead of the default rule. For a quantized weight the spec is of
      its logical `[out, in]` shape and may only split dimension 0.

  Examples:
    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
    ...             ("fsdp", "tensor"))
    >>> rules = ShardingRules()
    >>> rules.spec("model.layers.0.self_attn.q_proj.weight", (128, 64), mesh)
    P('tensor', 'fsdp')
    >>> rules.spec("model.layers.0.mlp.down_proj.weight", (64, 256), mesh)
    P('fsdp', 'tensor')
  """

  fsdp: str | None = None
  tensor: str | None = None
  overrides: tuple[tuple[str, P], ...] = ()

  def _axes(self, mesh: Mesh) -> tuple[str | None, str | None]:
    names = tuple(mesh.axis_names)
    out = []
    for field, default in (("fsdp", "fsdp"), ("tensor", "tensor")):
      given = getattr(self, field)
      if given is None:
        out.append(default if default in names else None)
      elif given not in names:
        raise ValueError(
            f"ShardingRules.{field}={given!r}: the mesh has no axis "
            f"{given!r} (its axes: {list(names)}).")
      else:
        out.append(given)
    if out[0] is not None and out[0] == out[1]:
      raise ValueError(f"ShardingRules: fsdp and tensor are the same mesh "
                       f"axis {out[0]!r}.")
    return out[0], out[1]

  def axes(self, mesh: Mesh) -> tuple[str | None, str | None]:
    """`(fsdp axis, tensor axis)` these rules use on `mesh` (None: none).

    Raises:
      ValueError: a named axis the mesh lacks, or fsdp == tensor.
    """
    return self._axes(mesh)

  def spec(self, name: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The `PartitionSpec` of the float parameter `name` of `shape`.

    Checked against `mesh`: every axis exists and divides its dimension.
    """
    shape = tuple(int(d) for d in shape)
    for pattern, spec in self.overrides:
      if re.search(pattern, name):
        spec = P(*spec)
        _check_spec(name, shape, spec, mesh)
        return spec
    fsdp, tensor = self._axes(mesh)
    parts: list[Any] = [None] * len(shape)
    if tensor is not None and shape:
      if _COLUMN.search(name) or _VOCAB.search(name):
        parts[0] = tensor
      elif _ROW.search(name) and len(shape) == 2:
        parts[1] = tensor
    if fsdp is not None and len(shape) >= 2:
      free = [d for d in range(len(shape)) if parts[d] is None]
      if free:
        parts[max(free, key=lambda d: (shape[d], -d))] = fsdp
    while parts and parts[-1] is None:
      parts.pop()
    spec = P(*parts)
    _check_spec(name, shape, spec, mesh)
    return spec

  def row_axes(self, name: str, shape: Sequence[int],
               mesh: Mesh) -> tuple[str, ...]:
    """The axes a quantized `[out, in]` weight splits its rows over.

    Those of the float spec (fsdp before tensor), or an override's
    dimension-0 axes.
    """
    shape = tuple(int(d) for d in shape)
    for pattern, spec in self.overrides:
      if re.search(pattern, name):
        spec = P(*spec)
        _check_spec(name, shape, spec, mesh)
        if any(_entry_axes(e) for e in tuple(spec)[1:]):
          raise ValueError(
              f"ShardingRules.overrides: {pattern!r} gives the quantized "
              f"weight {name!r} the spec {spec}; a quantized weight is "
              "stored flat and can only be split along dimension 0 (its "
              "output rows).")
        return _entry_axes(tuple(spec)[0]) if len(spec) else ()
    float_spec = self.spec(name, shape, mesh)
    used = {a for e in float_spec for a in _entry_axes(e)}
    fsdp, tensor = self._axes(mesh)
    return tuple(a for a in (fsdp, tensor) if a is not None and a in used)


def _entry_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _check_spec(name: str, shape: tuple[int, ...], spec: P,
                mesh: Mesh) -> None:
  if len(spec) > len(shape):
    raise ValueError(
        f"Sharding spec {spec} of parameter {name!r} has {len(spec)} "
        f"entries but the parameter has {len(shape)} dimension(s) "
        f"(shape {list(shape)}).")
  seen = set()
  for d, entry in enumerate(spec):
    axes = _entry_axes(entry)
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(
            f"Sharding spec {spec} of parameter {name!r} names mesh axis "
            f"{a!r}, which the mesh does not have (its axes: "
            f"{list(mesh.axis_names)}).")
      if a in seen:
        raise ValueError(f"Sharding spec {spec} of parameter {name!r} uses "
                         f"mesh axis {a!r} twice.")
      seen.add(a)
    size = _axes_size(mesh, axes)
    if axes and shape[d] % size:
      raise ValueError(
          f"Mesh axis {_show(axes)} (size {size}) does not divide dimension "
          f"{d} (size {shape[d]}) of parameter {name!r} (shape "
          f"{list(shape)}, spec {spec}).")


def _show(axes: Sequence[str]) -> str:
  return repr(axes[0]) if len(axes) == 1 else repr(tuple(axes))


def param_spec(rules: ShardingRules, name: str, shape: Sequence[int],
               mesh: Mesh) -> P:
  """`rules.spec(name, shape, mesh)`: the spec of a float parameter."""
  return rules.spec(name, shape, mesh)


def quantized_specs(rules: ShardingRules, name: str,
                    value: weights.QuantizedArray, mesh: Mesh):
  """A pytree of `PartitionSpec`s shaped like the quantized `value`.

  Row leaves (packed bytes, absmax; int8 rows and row scales) split their
  dimension 0 over `rules.row_axes`; other leaves are replicated.

  Raises:
    ValueError: if the row axes do not divide the output rows, or a row
      shard would cut a quantization block of a 4-bit weight.
  """
  out, inn = (int(d) for d in value.shape)
  axes = rules.row_axes(name, (out, inn), mesh)
  size = _axes_size(mesh, axes)
  if isinstance(value, weights.Params4bit) and axes:
    bs = value.quant_state.blocksize
    if (out // size * inn) % bs:
      raise ValueError(
          f"Mesh axis {_show(axes)} (size {size}) splits the {out} output "
          f"rows of the 4-bit parameter {name!r} (shape [{out}, {inn}]) "
          f"into shards of {out // size} rows = {out // size * inn} "
          f"elements, not a multiple of its blocksize {bs}: a shard must "
          "hold whole quantization blocks.")
  elif not isinstance(value, (weights.Params4bit, weights.Int8Params)):
    raise NotImplementedError(
        f"Sharding a {type(value).__name__} weight ({name!r}) is not "
        "supported.")
  row = axes if len(axes) > 1 else (axes[0] if axes else None)

  def leaf_spec(path, leaf):
    key = path[-1]
    field = getattr(key, "name", None)
    if field in _ROW_LEAVES and row is not None:
      return P(row, *([None] * (len(leaf.shape) - 1)))
    return P()

  return jax.tree_util.tree_map_with_path(leaf_spec, value)


def row_shards(spec: P, mesh: Mesh) -> int:
  """How many row shards dimension 0 of `spec` makes on `mesh`."""
  return _axes_size(mesh, _entry_axes(spec[0])) if len(spec) else 1


def place(host: Any, specs: Any, mesh: Mesh) -> Any:
  """Each leaf of the numpy tree `host` as a `jax.Array` sharded by `specs`.

  Every device receives only its slice (`make_array_from_callback`).
  """
  def one(x, spec):
    x = np.asarray(x)
    return jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])
  return jax.tree.map(one, host, specs)


def read_sharded(shape: Sequence[int], spec: P, mesh: Mesh,
                 read: Callable[[tuple[slice, ...]], np.ndarray],
                 cast: Callable[[np.ndarray], Any]) -> jax.Array:
  """A sharded array whose devices each read only their slice.

  Args:
    shape: the global shape.
    spec: its `PartitionSpec` on `mesh`.
    mesh: the mesh.
    read: reads the slice `idx` (a tuple of slices) from the checkpoint.
    cast: converts a read slice to the stored dtype (host numpy).
  """
  cache: dict[Any, np.ndarray] = {}

  def cb(idx):
    key = tuple((s.start, s.stop) for s in idx)
    if key not in cache:  # replicated shards: read once
      cache[key] = cast(read(idx))
    return cache[key]

  return jax.make_array_from_callback(tuple(shape), NamedSharding(mesh, spec),
                                      cb)


def slice_reader(src: Any, name: str
                 ) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """A function reading `idx` of tensor `name`, from disk when it can.

  A source with `load_slice` (safetensors folders) reads only the slice;
  other sources (torch `.bin`, GGUF) load the tensor once and slice it on
  the host.
  """
  if hasattr(src, "load_slice"):
    return functools.partial(src.load_slice, name)
  whole: list[np.ndarray] = []

  def read_loaded(idx):
    if not whole:
      whole.append(np.asarray(src.load(name)))
    return whole[0][tuple(idx)]
  return read_loaded


def resolve(sharding: ShardingRules | Mapping | None) -> ShardingRules:
  """`sharding` as `ShardingRules` (None: the defaults; a mapping: its
  fields, e.g. `{"tensor": "model"}`)."""
  if sharding is None:
    return ShardingRules()
  if isinstance(sharding, ShardingRules):
    return sharding
  if isinstance(sharding, Mapping):
    unknown = set(sharding) - {"fsdp", "tensor", "overrides"}
    if unknown:
      raise ValueError(f"from_pretrained: unknown `sharding` keys "
                       f"{sorted(unknown)}; known: fsdp, tensor, overrides.")
    kw = dict(sharding)
    if "overrides" in kw:
      ov = kw["overrides"]
      ov = ov.items() if isinstance(ov, Mapping) else ov
      kw["overrides"] = tuple((k, P(*v)) for k, v in ov)
    return ShardingRules(**kw)
  raise TypeError("from_pretrained: `sharding` must be a ShardingRules, a "
                  f"dict or None, got {type(sharding).__name__}.")


def build_by_rows(abstract: Any, specs: Any, mesh: Mesh, n_shards: int,
                  make_shard: Callable[[int], Any]) -> Any:
  """A sharded quantized weight built one row shard at a time.

  `make_shard(i)` returns the weight of row shard `i` of `n_shards` (e.g.
  those rows read and quantized alone); each device takes its leaves from
  the shard it holds, replicated leaves from one this process built.
  Correct when the rows of a shard are quantized independently of the
  others (whole blocks, no statistics over the whole tensor: not double
  quantization, whose `offset` is the mean of every absmax).

  Args:
    abstract: the weight's abstract value (global shapes, static fields).
    specs: `quantized_specs` for it.
    mesh: the mesh.
    n_shards: row shards dimension 0 of the row leaves is split into.
    make_shard: builds shard `i`'s weight.
  """
  cache: dict[int, list[np.ndarray]] = {}

  def shard(i):
    if i not in cache:
      cache[i] = [np.asarray(x) for x in jax.tree.leaves(make_shard(i))]
    return cache[i]

  leaves, treedef = jax.tree.flatten(abstract)
  spec_leaves = treedef.flatten_up_to(specs)
  out = []
  for j, (a, s) in enumerate(zip(leaves, spec_leaves)):
    split = len(s) > 0 and s[0] is not None
    n0 = a.shape[0] // n_shards if split else 0

    def cb(idx, j=j, split=split, n0=n0):
      if split:
        i = (idx[0].start or 0) // n0
        return shard(i)[j][(slice(None),) + tuple(idx[1:])]
      # A replicated leaf is the same in every shard: take it from one this
      # process has already built (the row leaves come first), so that on
      # several hosts each process reads only its own rows.
      return shard(min(cache) if cache else 0)[j][tuple(idx)]

    out.append(jax.make_array_from_callback(
        tuple(a.shape), NamedSharding(mesh, s), cb))
  return jax.tree.unflatten(treedef, out)
