"""The shared-memory table on a persistent grid, swept on the GPU
(docs/benchmarks.md, eleventh session).

    git checkout 71388c5 -- pallas_kernels   # the table "smem" (reverted)
    python docs/bench/gemv_smem_sweep.py 240      # time budget, seconds

Table "smem" and config index 8 (programs) exist only in commit 71388c5:
they never beat the default and were reverted.

NF4 + double quantization, bf16, M = 1 (and 2 on the first shape). Each
configuration of `gemv_4bit`'s "reduce" variant with table "smem" is timed
with `measure.time_jax` over three rotating weights, next to the default
configuration (`code` given, as the layers call it) and XLA's bf16 matmul;
each result is also compared with the default's output. One JSON line per
(shape, M) goes to $OUT/gemv_smem_sweep.jsonl.
"""
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import gemv_sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit as gk  # pylint: disable=g-import-not-at-top,wrong-import-position

LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096),
          (6144, 4096)]


def smem_configs(n, k, full):
  """(variant, block_n, block_kb, split_k, warps, 1, "smem", prefetch,
  programs): tiles of 16-64 rows, 128 or 256 bytes a row a step, one or
  two steps an item, and persistent grids of 2-8 programs an SM."""
  nkb = k // 64
  tiles = ((32, 8, 4), (64, 8, 8), (16, 8, 4), (32, 4, 4), (64, 4, 4))
  if not full:
    tiles = tiles[:2]
  out = []
  for (bn, kb, warps), steps, per_sm in itertools.product(
      tiles, (1, 2), (2, 4, 6)):
    split = max(1, nkb // (kb * steps))
    items = -(-n // bn) * split
    programs = min(items, 132 * per_sm)
    for pf in ((0, 1) if steps > 1 else (0,)):
      out.append(("reduce", bn, kb, split, warps, 1, "smem", pf, programs))
  return out


def main(budget_s):
  out = open(os.path.join(os.environ.get("OUT", "/tmp"),
                          "gemv_smem_sweep.jsonl"), "w")
  t_end = time.time() + float(budget_s)
  for n, k in SHAPES:
    base = gemv_sweep.make(n, k)
    first = (n, k) == SHAPES[0]
    for m in ((1, 2) if first else (1,)):
      if time.time() > t_end:
        break
      x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
      rec = dict(n=n, k=k, m=m,
                 xla_bf16=gemv_sweep.median_us(lambda x, w: x @ w.T,
                                               [(x, s[5]) for s in base]),
                 floor=(n * k / 2 + n * k / 64 + m * k * 2) / 4.8e12 * 1e6)
      args = [(x,) + s[:5] + (s[5][:1, :1],) for s in base]

      def call(c, *a):
        return gk.gemv_4bit(a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64,
                            nested=(a[3], a[4], a[5]), config=c, code=CODE)
      ref = np.asarray(jax.jit(lambda *a: call(None, *a))(*args[0]),
                       np.float32)
      res = []
      for c in [None] + smem_configs(n, k, first and m == 1):
        if time.time() > t_end:
          break
        f = lambda *a, c=c: call(c, *a)  # noqa: E731
        res.append((str(c),) + gemv_sweep.checked(
            f, args, ref, float(np.max(np.abs(ref)))))
      gemv_sweep.record(out, rec, res, f"N={n} K={k} M={m}: bf16 "
                        f"{rec['xla_bf16']:.1f} default {res[0][1]}", top=4)


if __name__ == "__main__":
  main(*sys.argv[1:])
