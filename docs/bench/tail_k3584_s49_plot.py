"""docs/benchmark_tail_k3584_s49.png: the wgmma GEMM's routing before and
after the forty-ninth session (H100, NF4 + DQ, bf16): a thin last wave
of programs as a tail launch, and Qwen2.5-7B's K = 3584 weights with K
split. For each weight and M, `jaxbnb bench matmul`'s speed against
XLA's bf16 dot in the same run, from the raw files named in
docs/benchmarks.md.

    python docs/bench/tail_k3584_s49_plot.py
"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "matmul_2026-12-06_h100_s49_"
# The routing before: tail off, K split from 4096.
BEFORE = ("tail_off.json", "before.json")
# After (the defaults): the final run, then the K = 3584 A/B for the
# weight the final run left out (4608x3584 takes no tail either way).
AFTER = ("qwen7b_final.json", "big_final.json", "tail_all_k3584.json")


def speeds(names):
  """{(shape, m): jaxbnb's speed against XLA bf16}, the first file
  holding a case winning."""
  out = {}
  for name in names:
    with open(os.path.join(HERE, PREFIX + name)) as f:
      for r in json.load(f)["results"]:
        out.setdefault((r["shape"], r["m"]),
                       r["us"]["xla-bf16"] / r["us"]["jaxbnb"])
  return out


def main():
  before, after = speeds(BEFORE), speeds(AFTER)
  cases = sorted(set(before) & set(after),
                 key=lambda c: (int(c[0].split("x")[1]), c[0], c[1]))
  fig, ax = plt.subplots(figsize=(13, 4.8))
  xs = range(len(cases))
  ax.bar([x - 0.2 for x in xs], [before[c] for c in cases], 0.4,
         label="before (one launch; K split from 4096)")
  ax.bar([x + 0.2 for x in xs], [after[c] for c in cases], 0.4,
         label="after (tail launch; K split from 3584)")
  ax.axhline(1.0, color="k", lw=1)
  ax.set_xticks(list(xs))
  ax.set_xticklabels([f"{s}\nM={m}" for s, m in cases], fontsize=6.5,
                     rotation=90)
  ax.set_ylabel("speed against XLA's bf16 dot (> 1 is faster)")
  ax.set_title("NF4 + DQ matmul, the wgmma GEMM's routing before and after "
               "(H100, forty-ninth session)", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  out = os.path.join(HERE, "..", "benchmark_tail_k3584_s49.png")
  fig.savefig(out, dpi=110)
  print("wrote", os.path.normpath(out))


if __name__ == "__main__":
  main()
