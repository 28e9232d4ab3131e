"""Plot of the twenty-sixth session's TMA warp GEMV sweep (docs/benchmarks.md):

    python docs/bench/gemv_warp_tma_s26_plot.py docs/benchmark_gemv_warp_tma_s26.png \
        docs/bench/gemv_warp_tma_sweep_2026-12-04_h200.jsonl
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(png, path):
  recs = [json.loads(l) for l in open(path) if l.strip()]
  labels, series = [], {"XLA bf16": [], '"warp" (before)': [],
                        "warp_tma (stages 4)": [], "warp_tma (stages 6)": []}
  for r in recs:
    ns = "+".join(str(n) for n in r["ns"])
    labels.append(f"{ns}x{r['k']}\nM = {r['m']}")
    series["XLA bf16"].append(r["xla_bf16"])
    series['"warp" (before)'].append(r["warp"][0])
    series["warp_tma (stages 4)"].append(r["warp_tma"][0])
    series["warp_tma (stages 6)"].append(r['warp_tma {"stages": 6}'][0])
  x = np.arange(len(labels))
  width = 0.2
  fig, ax = plt.subplots(figsize=(11, 4.5))
  for i, (name, ys) in enumerate(series.items()):
    ax.bar(x + (i - 1.5) * width, ys, width, label=name)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, fontsize=8)
  ax.set_ylabel("us per call (median)")
  ax.set_title("4-bit GEMV at M = 2..8, NF4 + DQ, bf16, H200 (2026-12-04): "
               "the TMA warp GEMV against \"warp\"")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=120)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
