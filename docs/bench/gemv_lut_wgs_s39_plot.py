"""Plots the thirty-ninth session's table GEMV with two and three compute
warpgroups (`gemv_lut_wgs_2026-12-05_h100_s39_wgs3.txt`, the probe's
printed lines: its jsonl was cut off with the call) into
docs/benchmark_gemv_lut_wgs_s39.png.

    python docs/bench/gemv_lut_wgs_s39_plot.py
"""
import ast
import os
import re

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
RAW = os.path.join(HERE, "gemv_lut_wgs_2026-12-05_h100_s39_wgs3.txt")
PNG = os.path.join(HERE, "..", "benchmark_gemv_lut_wgs_s39.png")


def rows():
  """(shape label, {warpgroups: [us a round]}) for each printed line."""
  for line in open(RAW):
    shape = re.match(r"\((\d+),\)x(\d+)", line)
    runs = re.findall(r"wgs (\d): (\[[^\]]*\])", line)
    if shape and runs:
      yield (f"{shape[1]}x{shape[2]}",
             {int(w): ast.literal_eval(v) for w, v in runs})


def main():
  data = list(rows())
  fig, ax = plt.subplots(figsize=(7, 3.8))
  for i, (label, runs) in enumerate(data):
    for j, (w, color) in enumerate(((2, "tab:blue"), (3, "tab:orange"))):
      xs = [i + (j - 0.5) * 0.3] * len(runs[w])
      ax.scatter(xs, runs[w], color=color, s=22,
                 label=f"{w} compute warpgroups" if i == 0 else None)
  ax.set_xticks(range(len(data)), [d[0] for d in data])
  ax.set_ylabel("us a call (3 rounds each)")
  ax.set_ylim(bottom=0)
  ax.set_title("Table GEMV, M = 1, NF4 + DQ, bf16: 2 against 3 compute "
               "warpgroups\n(H100 80GB HBM3, jax 0.11.2, 2026-12-05)",
               fontsize=9)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(PNG, dpi=110)


if __name__ == "__main__":
  main()
