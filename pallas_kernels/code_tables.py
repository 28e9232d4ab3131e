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

__all__ = ["quantize_lut", "quantize_tables", "search_codes"]


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


def search_codes(x: np.ndarray, qmap: np.ndarray) -> np.ndarray:
  """bitsandbytes' `dQuantize<0>` code of float32 `x` (numpy, int32).

  The 7-step binary search from pivot 127 and the midpoint rule, the host
  twin of `optim_8bit`'s `_quantize` and of `jaxbnb`'s reference (used to
  build and check the tables).
  """
  q = np.asarray(qmap, np.float32)
  x = np.asarray(x, np.float32)
  pivot = np.full(x.shape, 127, np.int32)
  upper_pivot = np.full(x.shape, 255, np.int32)
  lower_pivot = np.zeros(x.shape, np.int32)
  lower = np.full(x.shape, -1.0, np.float32)
  upper = np.full(x.shape, 1.0, np.float32)
  val = q[pivot]
  for step in (64, 32, 16, 8, 4, 2, 1):
    go_up = x > val
    lower_pivot = np.where(go_up, pivot, lower_pivot)
    lower = np.where(go_up, val, lower)
    upper_pivot = np.where(go_up, upper_pivot, pivot)
    upper = np.where(go_up, upper, val)
    pivot = np.where(go_up, pivot + step, pivot - step)
    val = q[pivot]
  upper = np.where(upper_pivot == 255, q[255], upper)
  lower = np.where(lower_pivot == 0, q[0], lower)
  above = x > val
  take_up = above & (x > (upper + val) * np.float32(0.5))
  take_lo = ~above & (x < (lower + val) * np.float32(0.5))
  return np.where(take_up, upper_pivot,
                  np.where(take_lo, lower_pivot, pivot)).astype(np.int32)


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
