"""docs/benchmark_split_ways_s51.png: the wgmma GEMM splitting K 3, 6, 9
or 12 ways where K takes them, against powers of two only (fifty-first
session; H100, NF4 + DQ, bf16). For each weight and M whose split
changed, `jaxbnb bench matmul`'s speed against XLA's bf16 dot in the same
run, before and after, from the A/B files named in docs/benchmarks.md
(both ran in one call).

    python docs/bench/split_ways_s51_plot.py
"""
import os

import before_after_bars

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "matmul_2026-12-06_h100_s51_split_ways_"
# Qwen2.5-14B's down projection splits as before at M = 64 (one way: 80
# programs) and 256 ("plain" unsplit); only its M = 128 changed.
UNCHANGED = {("5120x13824", 64), ("5120x13824", 256)}


def main():
  before, after = (
      before_after_bars.speeds(
          [os.path.join(HERE, PREFIX + name)],
          keep=lambda r: (r["shape"], r["m"]) not in UNCHANGED)
      for name in ("pow2.json", "any.json"))
  cases = sorted(set(before) & set(after),
                 key=lambda c: (before_after_bars.k_of(c), c[0], c[1]))
  before_after_bars.draw(
      cases, before, after,
      ("before (K split 1, 2, 4, 8 or 16 ways)",
       "after (also 3, 6, 9 or 12 where K takes them)"),
      "NF4 + DQ matmul, Gemma-2-2B's K = 2304 / 9216 and Qwen2.5-14B's "
      "5120x13824: K split\nin powers of two only, then also 3, 6, 9, 12 "
      "ways (H100, fifty-first session)",
      os.path.join(HERE, "..", "benchmark_split_ways_s51.png"), width=9)


if __name__ == "__main__":
  main()
