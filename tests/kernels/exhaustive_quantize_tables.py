"""Every float32 in [-1, 1] through `quantize_tables` against the search.

Not part of the pytest run (about 15 minutes on two CPU cores): run it
after changing `pallas_kernels.code_tables` with

    python -m tests.kernels.exhaustive_quantize_tables

It compares the two-lookup code (the numpy twin of `_quantize_lut`) with
bitsandbytes' binary search (`search_codes`) for every float32 of
magnitude <= 1 (both signs, subnormals and zeros included), plus NaN,
+-inf and +-1.5, for bitsandbytes' signed and unsigned dynamic maps, and
exits non-zero on any difference.
"""

from __future__ import annotations

import sys

import numpy as np

from jaxbnb._src.optim import state as optim_state
from pallas_kernels import code_tables


def lut_codes(x: np.ndarray, lo: np.ndarray, aux: np.ndarray) -> np.ndarray:
  """numpy twin of `code_tables.quantize_lut`."""
  nb = lo.shape[0] // 2
  x = np.where(np.isnan(x), np.float32(-1.0), x).astype(np.float32)
  key = code_tables._bucket_key(x, nb, code_tables._lut_bits(nb))
  code = lo[key].astype(np.int32)
  return code + (x > aux[code])


def main() -> int:
  chunk = 1 << 24
  last = int(np.float32(1.0).view(np.uint32))
  bad = 0
  for name, qmap in (("signed", optim_state.signed_map()),
                     ("unsigned", optim_state.unsigned_map())):
    lo, aux = code_tables.quantize_tables(qmap)
    for sign in (0, 0x80000000):
      for start in range(0, last + 1, chunk):
        u = np.arange(start, min(start + chunk, last + 1), dtype=np.uint32)
        x = (u | np.uint32(sign)).view(np.float32)
        bad += int(np.sum(code_tables.search_codes(x, qmap)
                          != lut_codes(x, lo, aux)))
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 1.5, -1.5], np.float32)
    bad += int(np.sum(code_tables.search_codes(x, qmap)
                      != lut_codes(x, lo, aux)))
    print(f"{name} map: {bad} mismatches so far", flush=True)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
