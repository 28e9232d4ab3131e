"""docs/benchmark_tail_k3584_s49.png: the wgmma GEMM's routing before and
after the forty-ninth session (H100, NF4 + DQ, bf16): a thin last wave
of programs as a tail launch, and Qwen2.5-7B's K = 3584 weights with K
split. For each weight and M, `jaxbnb bench matmul`'s speed against
XLA's bf16 dot in the same run, from the raw files named in
docs/benchmarks.md.

    python docs/bench/tail_k3584_s49_plot.py
"""
import os

import before_after_bars

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "matmul_2026-12-06_h100_s49_"
# The routing before: tail off, K split from 4096.
BEFORE = ("tail_off.json", "before.json")
# After (the defaults): the final run, then the K = 3584 A/B for the
# weight the final run left out (4608x3584 takes no tail either way).
AFTER = ("qwen7b_final.json", "big_final.json", "tail_all_k3584.json")


def main():
  before, after = (
      before_after_bars.speeds([os.path.join(HERE, PREFIX + name)
                                for name in names])
      for names in (BEFORE, AFTER))
  cases = sorted(set(before) & set(after),
                 key=lambda c: (before_after_bars.k_of(c), c[0], c[1]))
  before_after_bars.draw(
      cases, before, after,
      ("before (one launch; K split from 4096)",
       "after (tail launch; K split from 3584)"),
      "NF4 + DQ matmul, the wgmma GEMM's routing before and after "
      "(H100, forty-ninth session)",
      os.path.join(HERE, "..", "benchmark_tail_k3584_s49.png"), width=13)


if __name__ == "__main__":
  main()
