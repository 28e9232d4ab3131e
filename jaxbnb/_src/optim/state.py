"""8-bit blockwise optimizer state, stored as bitsandbytes stores it.

A `Quantized8bit` holds one optimizer state tensor as uint8 codes into a
256-entry dynamic map plus one float32 absmax per block of 256 elements
(bitsandbytes' `state1`/`absmax1`/`qmap1` triple). The signed map serves the
first-moment-like states (and every 1-state optimizer, as in bnb), the
unsigned map the second moment.

Requantization follows bnb's CUDA optimizer kernels (`csrc/kernels.cu`,
`kOptimizerStatic8bit{1,2}StateBlockwise`):

* absmax = max |s| over each block of 256 (the state after the update);
* x = s / absmax (bnb: `__fdividef`, i.e. a fast approximate division under
  `--use_fast_math`; we use IEEE division, which differs by at most 2 ulp and
  can move a code only when x sits on a midpoint);
* code = `quantize_2D<SIGNED>(x)`: the 7-step binary search from pivot 127 of
  `dQuantize`, with `lower` starting at -1 (signed) / 0 (unsigned) and
  `upper` at 1, *without* replacing them by code[0]/code[255] at the ends.
  Both differences from `dQuantize` only matter when the search ends at
  pivot 0, where every branch returns 0, so `reference.quantize_8bit_codes`
  gives the same codes;
* sign fix (signed maps only): if `signbit(qmap[c]) != signbit(s)` then
  `c += 1` if `s > 0` else `c -= 1` (uint8 wrap-around, as in CUDA);
* an all-zero block has absmax 0, x = 0/0 = NaN, the search returns code 0
  and, for signed maps, the sign fix (signbit(-0.99) != signbit(+0.0), s not
  > 0) wraps it to code 255 (= +1.0). The dequantized value is 0 * 1.0 = 0
  either way; the stored codes match bnb's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import reference

__all__ = [
    "BLOCKSIZE",
    "Optimizer8bitState",
    "Quantized8bit",
    "dequantize",
    "is_box",
    "num_blocks",
    "quantize_state",
    "signed_map",
    "unsigned_map",
]

BLOCKSIZE = 256


@functools.cache
def _map_np(signed: bool) -> np.ndarray:
  return np.asarray(codebooks.create_dynamic_map(signed=signed), np.float32)


def signed_map() -> np.ndarray:
  """bnb's signed 8-bit dynamic map (`qmap1`), float32 [256].

  Examples:
    >>> float(signed_map()[127]), float(signed_map()[255])
    (0.0, 1.0)
  """
  return _map_np(True)


def unsigned_map() -> np.ndarray:
  """bnb's unsigned 8-bit dynamic map (`qmap2`), float32 [256].

  Examples:
    >>> float(unsigned_map()[0]), float(unsigned_map()[255])
    (0.0, 1.0)
  """
  return _map_np(False)


def num_blocks(size: int) -> int:
  """Number of 256-element blocks of a leaf with `size` elements."""
  return max(1, math.ceil(size / BLOCKSIZE))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized8bit:
  """One optimizer state tensor in bnb's 8-bit blockwise layout.

  Attributes:
    codes: uint8 codes, the leaf's shape (AdEMAMix `state1`: `(2, *shape)`).
    absmax: float32 absmax per 256-block of the flattened leaf, `[nblocks]`
      (AdEMAMix `state1`: `[2, nblocks]`).
    signed: which map the codes index (static): True -> signed `qmap1`,
      False -> unsigned `qmap2`.

  Examples:
    >>> q = Quantized8bit.zeros((4, 300), signed=True)
    >>> q.codes.shape, q.absmax.shape, float(q.dequantize().sum())
    ((4, 300), (5,), 0.0)
  """

  codes: jax.Array
  absmax: jax.Array
  signed: bool = dataclasses.field(default=True, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def qmap(self) -> np.ndarray:
    return signed_map() if self.signed else unsigned_map()

  def dequantize(self) -> jax.Array:
    """float32 state: `qmap[codes] * absmax[block]` (bnb's fp32 product)."""
    return dequantize(self)

  @classmethod
  def zeros(cls, shape, signed: bool, leading: int | None = None
            ) -> "Quantized8bit":
    """bnb's initial state: codes 0 and absmax 0 (dequantizes to zeros).

    Args:
      shape: the leaf's shape.
      signed: which map (see the class docstring).
      leading: optional stacked-state count (AdEMAMix state1 uses 2).
    """
    shape = tuple(int(d) for d in shape)
    nb = num_blocks(math.prod(shape))
    lead = () if leading is None else (int(leading),)
    return cls(codes=jnp.zeros(lead + shape, jnp.uint8),
               absmax=jnp.zeros(lead + (nb,), jnp.float32), signed=signed)


_VALUE_PATH = (jax.tree_util.GetAttrKey("value"),)


def is_box(x) -> bool:
  """Whether `x` boxes one array: a pytree node whose one child is `.value`.

  `nnx.state(model)` boxes every parameter in an `nnx.Variable`,
  `nnx.Optimizer` every optimizer state array in an `OptVariable` /
  `OptArray`, and linen's `nn.with_partitioning` a parameter in an
  `nn.Partitioned`, with metadata (sharding) in the node's static data.

  Args:
    x: any pytree node or leaf.

  Returns:
    True for such a box, False otherwise (arrays, containers, None).

  Examples:
    >>> is_box(jnp.zeros(3)), is_box({"value": jnp.zeros(3)})
    (False, False)
  """
  if x is None or isinstance(x, (jax.Array, np.ndarray, np.generic, dict,
                                 list, tuple, Quantized8bit)):
    return False
  children = jax.tree_util.tree_flatten_with_path(
      x, is_leaf=lambda y: y is not x)[0]
  return (len(children) == 1 and children[0][0] == _VALUE_PATH
          and hasattr(children[0][1], "shape"))


class Optimizer8bitState(NamedTuple):
  """Optax state of every `jaxbnb.optim` optimizer (8-bit, 32-bit, paged).

  `state1` and `state2` mirror the parameter tree down to one entry per
  parameter leaf: a `Quantized8bit` (8-bit state), a float32 array (32-bit
  state) or None (`state2` of the 1-state optimizers). Static settings
  (which leaves are 8-bit, the map of each state) live in the tree
  structure, never in a leaf, so the state passes through `jax.jit`,
  `flax.nnx.Optimizer`, orbax and optax's wrappers unchanged.

  Attributes:
    count: the number of updates done. bitsandbytes keeps the same number
      per parameter as `step` (it increments `step` before each update, so
      after k updates its `step` is k), and `to_bnb_state_dict` writes
      `step = count`.
    state1: first state per leaf (AdEMAMix: leading axis 2, `[m1; m2]`).
    state2: second moment per leaf for Adam/AdEMAMix, else None per leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import optim
    >>> state = optim.adam8bit().init({"w": jnp.zeros((64, 64))})
    >>> type(state).__name__, state.count.dtype, state.state1["w"].codes.dtype
    ('Optimizer8bitState', dtype('int32'), dtype('uint8'))
    >>> params = {"w": jnp.zeros((64, 64))}
    >>> tx = optim.adam8bit()
    >>> _, state = tx.update({"w": jnp.ones((64, 64))}, tx.init(params), params)
    >>> sd = optim.to_bnb_state_dict(state, params)
    >>> int(state.count), sd["['w']"]["step"]
    (1, 1)
  """

  count: jax.Array  # shape=(), dtype=jnp.int32.
  state1: Any
  state2: Any


def _pad_blocks(flat: jax.Array) -> jax.Array:
  """[n] -> [nblocks, 256], zero padded."""
  n = flat.shape[-1]
  nb = num_blocks(n)
  pad = nb * BLOCKSIZE - n
  if pad:
    flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
  return flat.reshape(flat.shape[:-1] + (nb, BLOCKSIZE))


def dequantize(q: Quantized8bit) -> jax.Array:
  """float32 values of a `Quantized8bit` (any leading stacking).

  Args:
    q: the quantized state.

  Returns:
    float32 array of `q.codes`' shape.

  Examples:
    >>> x = jnp.linspace(-1.0, 1.0, 512)
    >>> y = dequantize(quantize_state(x, True))
    >>> y.shape, y.dtype, bool(jnp.max(jnp.abs(y - x)) < 0.02)
    ((512,), dtype('float32'), True)
  """
  lead = q.absmax.shape[:-1]
  shape = q.codes.shape[len(lead):]
  n = math.prod(shape)
  table = jnp.asarray(q.qmap, jnp.float32)
  vals = table[q.codes.reshape(lead + (n,)).astype(jnp.int32)]
  blocks = _pad_blocks(vals) * q.absmax[..., None].astype(jnp.float32)
  return blocks.reshape(lead + (-1,))[..., :n].reshape(q.codes.shape)


def requantize_blocks(s_blocks: jax.Array, absmax: jax.Array, signed: bool
                      ) -> jax.Array:
  """Codes for fp32 states `[..., nblocks, 256]` given the block absmax.

  The CUDA requantization step: `quantize_2D(s / absmax)` then the sign fix
  for signed maps. Padding elements (zeros) are quantized too; callers drop
  them.
  """
  table = jnp.asarray(_map_np(signed), jnp.float32)
  x = s_blocks / absmax[..., None]
  codes = reference.quantize_8bit_codes(x, table)
  if signed:
    flip = jnp.signbit(table[codes.astype(jnp.int32)]) != jnp.signbit(s_blocks)
    step = jnp.where(s_blocks > 0, jnp.uint8(1), jnp.uint8(255))
    codes = jnp.where(flip, codes + step, codes)  # uint8 wraps like CUDA
  return codes


def quantize_state(x: jax.Array, signed: bool, *, stacked: bool = False
                   ) -> Quantized8bit:
  """Quantizes an fp32 state as bnb's optimizer kernels do.

  Args:
    x: float array, the leaf's shape (or `(k, *shape)` with `stacked`).
    signed: use the signed map with the sign fix (True) or the unsigned map.
    stacked: treat dim 0 as k separate states (AdEMAMix's `[m1; m2]`), each
      with its own blocks, so absmax is `[k, nblocks]`.

  Returns:
    A `Quantized8bit` with absmax = max|x| per 256-block of the flat leaf.

  Examples:
    >>> q = quantize_state(jnp.array([0.5, -0.25, 0.0, 1e-3]), signed=True)
    >>> q.codes.dtype, q.absmax.tolist()
    (dtype('uint8'), [0.5])
    >>> [round(v, 3) for v in q.dequantize().tolist()[:3]]
    [0.5, -0.25, 0.0]
  """
  x = jnp.asarray(x, jnp.float32)
  lead = x.shape[:1] if stacked else ()
  n = math.prod(x.shape[len(lead):])
  blocks = _pad_blocks(x.reshape(lead + (n,)))
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  codes = requantize_blocks(blocks, absmax, signed)
  codes = codes.reshape(lead + (-1,))[..., :n].reshape(x.shape)
  return Quantized8bit(codes=codes, absmax=absmax, signed=signed)
