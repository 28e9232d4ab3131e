"""Plots docs/benchmark_gemm_wgmma_s15.png from the fifteenth session's
sweeps (runs g and h, H200): per shape and M, XLA's bf16 dot, the old
default tile, and the tile with the weight swizzled and the table words
from memory ("sw", "lt"), with and without the overlapped parts ("ov")
(docs/benchmarks.md, "wgmma GEMM: what limits it under Nsight Compute").

    python docs/bench/gemm_wgmma_s15_plot.py OUT.png
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
RUNS = ("g", "h")
OLD = {64: (64, 64, 128, 1, 4, "plain"), 128: (64, 128, 128, 1, 3, "ws"),
       256: (64, 256, 64, 1, 4, "ws")}
# The series after XLA and the old default: (label, config by M).
SERIES = [
    ("swizzle + table loads (M 64: 256 columns a step)",
     {64: (64, 64, 256, 1, 2, "plain", "swlt"),
      128: (64, 128, 128, 1, 3, "ws", "lt"),
      256: (64, 256, 64, 1, 4, "ws", "swlt")}),
    ("the same, parts overlapped",
     {64: (64, 64, 256, 1, 2, "plain", "ovswlt"),
      128: (64, 128, 128, 1, 3, "ws", "ovlt"),
      256: (64, 256, 128, 1, 2, "ws", "ovlt")}),
]


def rows(run):
  """(label, XLA, old default, each series' time or None) per timed case
  of a shape the package sends to the kernel."""
  out = []
  path = os.path.join(HERE, f"gemm_wgmma_2026-12-03_h200_{run}.jsonl")
  for line in open(path):
    r = json.loads(line)
    if r["m"] not in OLD or r["n"] < 10240:  # the shapes the kernel serves
      continue
    got = {tuple(c): us for c, us, *_ in r["all"] if isinstance(us, float)}
    out.append((f"{r['n']}x{r['k']}\nM={r['m']}", r["xla_bf16"],
                got.get(OLD[r["m"]]),
                *[got.get(cfg[r["m"]]) for _, cfg in SERIES]))
  return out


def main():
  fig, axes = plt.subplots(1, len(RUNS), figsize=(14, 4.8), sharey=True)
  names = ["XLA bf16", "old default"] + [s[0] for s in SERIES]
  for ax, run in zip(axes, RUNS):
    data = rows(run)
    width = 0.8 / len(names)
    for j, name in enumerate(names):
      xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(data))]
      ys = [d[1 + j] or 0.0 for d in data]
      ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(data)))
    ax.set_xticklabels([d[0] for d in data], fontsize=8)
    ax.set_title(f"run {run} (sweep timer, one H200)")
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("us per matmul (NF4 + DQ, bf16)")
  axes[0].legend(fontsize=8, loc="upper left")
  fig.suptitle("4-bit wgmma GEMM, fifteenth session: a missing bar was not "
               "timed in that run")
  fig.tight_layout()
  fig.savefig(sys.argv[1] if len(sys.argv) > 1 else "out.png", dpi=110)


if __name__ == "__main__":
  main()
