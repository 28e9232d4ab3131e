"""The fused "mma" kernel at M = 64-256, against the path that serves
those M today (docs/benchmarks.md, eleventh session; run on the GPU).

    python docs/bench/gemv_large_m_sweep.py a 280    # M = 64-256; budget, s
    python docs/bench/gemv_large_m_sweep.py b 280    # M = 96 and 128

M above `GEMV_MAX_M` (64) is served by the dequantize kernel and XLA's
dot. Here the "mma" variant of `gemv_4bit` (the byte-permute decode and
tensor-core products, x whole in one tile) is timed at M = 64, 128 and
256 on several tiles, next to `F.matmul_4bit` (the package's own path)
and XLA's bf16 matmul, each with `measure.time_jax` over three rotating
weights; each result is compared with `x @ dequantize(W).T`. NF4 + DQ,
bf16. One JSON line per (shape, M) goes to $OUT/gemv_large_m_<set>.jsonl.
"""
import os
import sys
import time

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import baseline, checked, each_case, record, split_for  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit as gk  # pylint: disable=g-import-not-at-top,wrong-import-position

LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
CASES = [((14336, 4096), 256), ((14336, 4096), 128), ((14336, 4096), 64),
         ((4096, 14336), 256), ((4096, 14336), 64), ((4096, 4096), 256),
         ((4096, 4096), 64)]
# (block_n, block_kb, warps, stages, prefetch)
TILES = [(64, 2, 8, 3, 1), (128, 2, 8, 3, 1), (64, 1, 4, 3, 1),
         (64, 2, 4, 3, 1), (64, 4, 8, 3, 1), (128, 1, 8, 3, 1),
         (128, 2, 8, 3, 0), (64, 2, 8, 1, 2), (128, 4, 8, 3, 1),
         (256, 1, 8, 3, 1), (128, 2, 4, 3, 1)]
# Set b: the tiles that led set a at M = 128, on every shape.
CASES_B = [((n, k), m) for m in (128, 96)
           for n, k in ((14336, 4096), (4096, 14336), (4096, 4096),
                        (1024, 4096), (6144, 4096))]
TILES_B = [(64, 2, 4, 3, 1), (64, 1, 4, 3, 1), (128, 1, 8, 3, 1),
           (128, 2, 8, 3, 0)]


def main(which, budget_s):
  out = open(os.path.join(os.environ.get("OUT", "/tmp"),
                          f"gemv_large_m_{which}.jsonl"), "w")
  t_end = time.time() + float(budget_s)
  cases, tiles = (CASES, TILES) if which == "a" else (CASES_B, TILES_B)
  for n, k, m, base, x in each_case(cases, t_end):
    rec, ref, scale = baseline(
        x, base, n=n, k=k, m=m,
        floor=(n * k / 2 + n * k / 64 + m * k * 2 + m * n * 2) / 4.8e12 * 1e6)
    args = [(x,) + s[:5] for s in base]
    res = []
    for bn, kb, warps, stages, pf in tiles:
      if time.time() > t_end:
        break
      cfg = ("mma", bn, kb, split_for(n, k, bn, kb), warps, stages, "prmt",
             pf)
      f = lambda *a, c=cfg: gk.gemv_4bit(  # noqa: E731
          a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64,
          nested=(a[3], a[4], a[5]), config=c, code=CODE)
      res.append((str(cfg),) + checked(f, args, ref, scale))
    record(out, rec, res, f"N={n} K={k} M={m}: bf16 {rec['xla_bf16']:.1f} "
           f"package {rec['package']:.1f}")


if __name__ == "__main__":
  main(*sys.argv[1:])
