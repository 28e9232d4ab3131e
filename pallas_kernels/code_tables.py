"""Lookup tables that quantize to a sorted 8-bit map in two lookups.

bitsandbytes quantizes to its 256-entry dynamic maps (8-bit optimizer
states, double quantization's nested absmax) with a 7-step binary search
and a midpoint rule (`dQuantize<0>`, `search_codes` here). Its result is
monotone in x, so it is the count of 255 thresholds below x: the midpoints
of neighbouring codes, where a tie goes to the even code. Buckets of x by
sign, exponent and a few mantissa bits that hold at most one threshold
each turn the search into two lookups (`quantize_tables`, `quantize_lut`),
bit for bit: the host checks every bucket against the search when it
builds the tables, and `tests/kernels/exhaustive_quantize_tables.py` checks
every float32 in [-1, 1] for bitsandbytes' maps.

A leaf module: jax and numpy only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["quantize_lut", "quantize_tables", "search", "search_codes"]


# |x| below 2**-24 (biased exponent 103) shares the first bucket.
_LUT_MIN_EXPONENT = 103
_LUT_BITS = (5, 6, 7, 8)  # mantissa bits of the bucket key, tried in order


def _lut_bits(nb: int) -> int:
  return ((nb - 1) // (127 - _LUT_MIN_EXPONENT)).bit_length() - 1


def _bucket_key(x, nb, bits):
  """Bucket of fp32 `x`: sign, exponent and the top `bits` mantissa bits
  of |x| (clamped to [2**-24, 1]); the negative buckets follow the
  positive ones. Works on numpy and jax arrays."""
  u = x.view(np.int32) if isinstance(x, np.ndarray) else (
      jax.lax.bitcast_convert_type(x, jnp.int32))
  key = ((u & 0x7FFFFFFF) >> (23 - bits)) - (_LUT_MIN_EXPONENT << bits)
  key = key.clip(0, nb - 1) if isinstance(x, np.ndarray) else jnp.clip(
      key, 0, nb - 1)
  return (np.where if isinstance(x, np.ndarray) else jnp.where)(
      u < 0, key + nb, key)


def quantize_lut(x, lo_ref, aux_ref):
  """`search_codes`' code of fp32 `x` (int32) by two lookups: the bucket's
  lowest code, plus one if `x` is past that code's upper threshold.

  `lo_ref`, `aux_ref`: `quantize_tables`' arrays (refs in a kernel, or
  arrays). Works in a Pallas kernel and in plain jnp.
  """
  nb = lo_ref.shape[0] // 2
  x = jnp.where(x == x, x, jnp.float32(-1.0))  # NaN: code 0, as the search
  lo = lo_ref[_bucket_key(x, nb, _lut_bits(nb))].astype(jnp.int32)
  return lo + (x > aux_ref[lo]).astype(jnp.int32)


def search(x, q_ref, xp=jnp):
  """Nearest code of fp32 `x` by bitsandbytes' binary search (int32).

  Returns (code, its map value). The 7-step search from pivot 127 (steps
  64..1) and the midpoint rule of `dQuantize<0>`; the first two levels
  pick their pivot value from scalars, the rest gather from the map.
  `q_ref`: the map (a ref in a kernel, or an array); `xp`: `jnp` (also in
  a Pallas kernel) or `np` (on the host).
  """
  i32, f32 = xp.int32, xp.float32
  v127 = q_ref[127]
  up0 = x > v127
  pivot = xp.where(up0, i32(191), i32(63))
  lower_pivot = xp.where(up0, i32(127), i32(0))
  upper_pivot = xp.where(up0, i32(255), i32(127))
  lower = xp.where(up0, v127, f32(-1.0))
  upper = xp.where(up0, f32(1.0), v127)
  val = xp.where(up0, q_ref[191], q_ref[63])
  # Level 1 from scalars: pivots 63 / 191 -> 31, 95 / 159, 223.
  up1 = x > val
  lower_pivot = xp.where(up1, pivot, lower_pivot)
  lower = xp.where(up1, val, lower)
  upper_pivot = xp.where(up1, upper_pivot, pivot)
  upper = xp.where(up1, upper, val)
  pivot = xp.where(up1, pivot + 32, pivot - 32)
  val = xp.where(up0, xp.where(up1, q_ref[223], q_ref[159]),
                 xp.where(up1, q_ref[95], q_ref[31]))
  for step in (16, 8, 4, 2, 1):
    go_up = x > val
    lower_pivot = xp.where(go_up, pivot, lower_pivot)
    lower = xp.where(go_up, val, lower)
    upper_pivot = xp.where(go_up, upper_pivot, pivot)
    upper = xp.where(go_up, upper, val)
    pivot = xp.where(go_up, pivot + step, pivot - step)
    val = q_ref[pivot]
  upper = xp.where(upper_pivot == 255, q_ref[255], upper)
  lower = xp.where(lower_pivot == 0, q_ref[0], lower)
  above = x > val
  mid_up = (upper + val) * f32(0.5)
  mid_lo = (lower + val) * f32(0.5)
  take_up = above & (x > mid_up)
  take_lo = (~above) & (x < mid_lo)
  code = xp.where(take_up, upper_pivot, xp.where(take_lo, lower_pivot,
                                                  pivot))
  value = xp.where(take_up, upper, xp.where(take_lo, lower, val))
  return code, value


def search_codes(x: np.ndarray, qmap: np.ndarray) -> np.ndarray:
  """bitsandbytes' `dQuantize<0>` code of float32 `x` (numpy, int32): `search`
  on the host (builds and checks the tables)."""
  q = np.asarray(qmap, np.float32)
  x = np.asarray(x, np.float32)
  return search(x, q, np)[0].astype(np.int32)


@functools.lru_cache(maxsize=8)
def _tables(qmap_bytes: bytes):
  q = np.frombuffer(qmap_bytes, np.float32)
  if q.shape != (256,) or not np.all(np.isfinite(q)) or np.any(
      q[1:] < q[:-1]):
    return None
  neg = np.signbit(q)
  n_neg = int(neg.sum())
  if not np.all(neg[:n_neg]):  # the sign fix reads the sign off the code
    return None
  # The search picks the nearest code; ties between codes i and i + 1 go
  # to the even one: past the midpoint for even i, at it for odd i.
  mid = (q[:-1] + q[1:]) * np.float32(0.5)
  odd = np.arange(255) % 2 == 1
  thr = np.where(odd, np.nextafter(mid, np.float32(-np.inf)), mid)
  aux = np.concatenate([thr, [np.inf, n_neg]]).astype(np.float32)
  for bits in _LUT_BITS:
    nb = ((127 - _LUT_MIN_EXPONENT) << bits) + 1
    first = ((np.arange(nb, dtype=np.int64) + (_LUT_MIN_EXPONENT << bits))
             << (23 - bits))
    first[0] = 0
    last = first + (1 << (23 - bits)) - 1
    last[-1] = 0x7F800000  # the last bucket reaches +inf
    small = first.astype(np.uint32).view(np.float32)
    large = last.astype(np.uint32).view(np.float32)
    lo = np.concatenate([search_codes(small, q), search_codes(-large, q)])
    hi = np.concatenate([search_codes(large, q), search_codes(-small, q)])
    if np.all(hi - lo <= 1):  # one threshold at most per bucket
      return lo.astype(np.uint8), aux
  return None


def quantize_tables(qmap) -> tuple[np.ndarray, np.ndarray] | None:
  """Lookup tables that requantize to `qmap` in two lookups, or None.

  The search's code is monotone in x, so it is the count of the 255
  thresholds below x (`thr[i]`, the midpoint of codes i and i + 1, one
  float lower for odd i where the tie goes up). Buckets of x by sign,
  exponent and a few mantissa bits hold at most one threshold each, so the
  code is `lo[bucket] + (x > thr[lo[bucket]])`: the kernel does two
  lookups where the search does five, and reads the sign off the code.
  Checked on the host bucket by bucket against `search_codes`; a map
  whose buckets would need more than one threshold (none of
  bitsandbytes' maps) returns None, and the kernel searches.

  Args:
    qmap: a sorted float32 `[256]` map (numpy), negative values first.

  Returns:
    `(lo, aux)`: uint8 `[2 * buckets]` lowest codes, float32 `[257]` (the
    255 thresholds, +inf, and the count of negative codes); or None.

  Examples:
    >>> q = np.linspace(-1.0, 1.0, 256, dtype=np.float32)
    >>> lo, aux = quantize_tables(q)
    >>> int(aux[256]), lo.dtype
    (128, dtype('uint8'))
  """
  q = np.ascontiguousarray(np.asarray(qmap, np.float32))
  return _tables(q.tobytes())
