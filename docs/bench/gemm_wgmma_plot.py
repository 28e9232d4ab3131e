"""Plots docs/benchmark_gemm_wgmma.png from two `jaxbnb bench matmul` runs
on the H200: the twelfth session's (the package before the wgmma GEMM) and
the thirteenth's (after), at M = 64, 128 and 256 on the shapes it serves
and one it does not (docs/benchmarks.md, "4-bit GEMM on wgmma").

    python docs/bench/gemm_wgmma_plot.py OUT.png
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
BEFORE = os.path.join(HERE, "matmul_2026-12-02_h200_s12.json")
AFTER = os.path.join(HERE, "matmul_2026-12-02_h200_s13_wgmma.json")
SHAPES = ["14336x4096", "11008x4096", "4096x14336"]
MS = [64, 128, 256]


def table(path):
  out = {}
  for r in json.load(open(path))["results"]:
    out[(r["shape"], r["m"])] = r["us"]
  return out


def main():
  before, after = table(BEFORE), table(AFTER)
  fig, axes = plt.subplots(1, len(SHAPES), figsize=(13, 4), sharey=False)
  width = 0.2
  for ax, shape in zip(axes, SHAPES):
    xs = range(len(MS))
    cols = [("jaxbnb before (s12)", [before[(shape, m)]["jaxbnb"] for m in MS]),
            ("jaxbnb now", [after[(shape, m)]["jaxbnb"] for m in MS]),
            ("XLA bf16", [after[(shape, m)]["xla-bf16"] for m in MS]),
            ("bitsandbytes", [after[(shape, m)]["bnb"] for m in MS])]
    for i, (name, vals) in enumerate(cols):
      ax.bar([x + (i - 1.5) * width for x in xs], vals, width, label=name)
    ax.set_xticks(list(xs), [f"M={m}" for m in MS])
    ax.set_title(f"NF4 + DQ, W {shape}" + (" (not served)"
                                            if shape == "4096x14336" else ""))
    ax.set_ylabel("us per matmul")
  axes[0].legend(fontsize=8)
  fig.suptitle("H200, 2026-12-02: the wgmma GEMM at M = 64-256 "
               "(jaxbnb bench matmul)")
  fig.tight_layout()
  fig.savefig(sys.argv[1] if len(sys.argv) > 1 else "benchmark_gemm_wgmma.png",
              dpi=110)


if __name__ == "__main__":
  main()
