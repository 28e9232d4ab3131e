"""docs/benchmark_split_k1536_s50.png: the wgmma GEMM taking split-K
weights from K = 1536 instead of 3584 (fiftieth session; H100, NF4 + DQ,
bf16). For each weight and M, `jaxbnb bench matmul`'s speed against
XLA's bf16 dot in the same run, before and after, from the A/B files
named in docs/benchmarks.md (each pair ran in one call).

    python docs/bench/split_k1536_s50_plot.py
"""
import os

import before_after_bars

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "matmul_2026-12-06_h100_s50_"
# (before, after) per A/B call: GEMM_SPLIT_MIN_K 3584 against 2048 on the
# K = 3072 and 2048 weights; 2048 against 1024 on K = 1536 (1536 and 1024
# route K = 1536 alike; the K = 1024 weights, which stay off, are left out).
PAIRS = (("min_k_3584.json", "min_k_2048.json"),
         ("k1536_min_k_2048.json", "k1536_min_k_1024.json"))


def main():
  before, after = (before_after_bars.speeds(
      [os.path.join(HERE, PREFIX + pair[side]) for pair in PAIRS],
      keep=lambda r: r["k"] >= 1536) for side in (0, 1))
  cases = sorted(set(before) & set(after),
                 key=lambda c: (-before_after_bars.k_of(c), c[0], c[1]))
  before_after_bars.draw(
      cases, before, after,
      ("before (K split from 3584)",
       "after (K split from 1536)"),
      "NF4 + DQ matmul on K = 3072 / 2048 / 1536 weights, before "
      "and after (H100, fiftieth session)",
      os.path.join(HERE, "..", "benchmark_split_k1536_s50.png"), width=12)


if __name__ == "__main__":
  main()
