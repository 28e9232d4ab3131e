"""Plots docs/benchmark_gemm_wgmma_s14.png from the fourteenth session's
sweep (run d, H200): per shape and M, XLA's bf16 dot, the package, the
default tile storing `y.T` (as before) and `y` (now), and the best "ks"
config (docs/benchmarks.md, "wgmma GEMM: `y` stored by the kernel").

    python docs/bench/gemm_wgmma_s14_plot.py OUT.png
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

RUN = os.path.join(os.path.dirname(__file__),
                   "gemm_wgmma_2026-12-03_h200_d.jsonl")
DEFAULTS = {64: [64, 64, 128, 1, 4, "plain"], 128: [64, 128, 128, 1, 3, "ws"],
            256: [64, 256, 64, 1, 4, "ws"]}


def rows():
  """(label, XLA, package, old store, y stored, best ks) per case with M of
  64 or more."""
  out = []
  for line in open(RUN):
    r = json.loads(line)
    if r["m"] not in DEFAULTS:
      continue
    got = {tuple(c): us for c, us, *_ in r["all"] if isinstance(us, float)}
    d = DEFAULTS[r["m"]]
    ks = [us for c, us in got.items() if c[5] == "ks"]
    out.append((f"{r['n']}x{r['k']}\nM={r['m']}", r["xla_bf16"], r["package"],
                got.get(tuple(d + ["old"])), got.get(tuple(d)),
                min(ks) if ks else None))
  return out


def main():
  data = rows()
  names = ["XLA bf16", "package (F.matmul_4bit)", "default tile, y.T (before)",
           "default tile, y stored", "best \"ks\""]
  fig, ax = plt.subplots(figsize=(13, 4.5))
  width = 0.16
  for i, name in enumerate(names):
    xs = [j + (i - 2) * width for j, row in enumerate(data)
          if row[i + 1] is not None]
    vals = [row[i + 1] for row in data if row[i + 1] is not None]
    ax.bar(xs, vals, width, label=name)
  ax.set_xticks(range(len(data)), [row[0] for row in data], fontsize=8)
  ax.set_ylabel("us per matmul (sweep timer)")
  ax.set_title("H200, 2026-12-03: the wgmma GEMM storing y, and the \"ks\" "
               "variant (NF4 + DQ, bf16)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(sys.argv[1] if len(sys.argv) > 1
              else "benchmark_gemm_wgmma_s14.png", dpi=110)


if __name__ == "__main__":
  main()
