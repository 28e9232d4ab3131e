"""docs/benchmark_split_k1536_s50.png: the wgmma GEMM taking split-K
weights from K = 1536 instead of 3584 (fiftieth session; H100, NF4 + DQ,
bf16). For each weight and M, `jaxbnb bench matmul`'s speed against
XLA's bf16 dot in the same run, before and after, from the A/B files
named in docs/benchmarks.md (each pair ran in one call).

    python docs/bench/split_k1536_s50_plot.py
"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "matmul_2026-12-06_h100_s50_"
# (before, after) per A/B call: GEMM_SPLIT_MIN_K 3584 against 2048 on the
# K = 3072 and 2048 weights; 2048 against 1024 on K = 1536 (1536 and 1024
# route K = 1536 alike; the K = 1024 weights, which stay off, are left out).
PAIRS = (("min_k_3584.json", "min_k_2048.json"),
         ("k1536_min_k_2048.json", "k1536_min_k_1024.json"))


def speeds(name):
  """{(shape, k, m): jaxbnb's speed against XLA bf16} of a file."""
  with open(os.path.join(HERE, PREFIX + name)) as f:
    return {(r["shape"], r["k"], r["m"]):
            r["us"]["xla-bf16"] / r["us"]["jaxbnb"]
            for r in json.load(f)["results"] if r["k"] >= 1536}


def main():
  before, after = {}, {}
  for b, a in PAIRS:
    before.update(speeds(b))
    after.update(speeds(a))
  cases = sorted(set(before) & set(after), key=lambda c: (-c[1], c[0], c[2]))
  fig, ax = plt.subplots(figsize=(12, 4.8))
  xs = range(len(cases))
  ax.bar([x - 0.2 for x in xs], [before[c] for c in cases], 0.4,
         label="before (K split from 3584)")
  ax.bar([x + 0.2 for x in xs], [after[c] for c in cases], 0.4,
         label="after (K split from 1536)")
  ax.axhline(1.0, color="k", lw=1)
  ax.set_xticks(list(xs))
  ax.set_xticklabels([f"{s}\nM={m}" for s, _, m in cases], fontsize=6.5,
                     rotation=90)
  ax.set_ylabel("speed against XLA's bf16 dot (> 1 is faster)")
  ax.set_title("NF4 + DQ matmul on K = 3072 / 2048 / 1536 weights, before "
               "and after (H100, fiftieth session)", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  out = os.path.join(HERE, "..", "benchmark_split_k1536_s50.png")
  fig.savefig(out, dpi=110)
  print("wrote", os.path.normpath(out))


if __name__ == "__main__":
  main()
