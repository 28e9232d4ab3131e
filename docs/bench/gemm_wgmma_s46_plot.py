"""Plots docs/benchmark_gemm_wgmma_s46.png from the forty-sixth session's
H100 sweep run t (docs/benchmarks.md, "The wgmma GEMM past M = 256"): per
shape and M, XLA's bf16 time over dequantize + dot (the package's path
there before the session) and over the wgmma GEMM's config the package
now takes up to M = 1024 (both from the same run, the sweep timer).

    python docs/bench/gemm_wgmma_s46_plot.py OUT.png
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
RAW = os.path.join(HERE, "gemm_wgmma_sweep_2026-12-06_h100_s46_t.jsonl")
DEFAULT = (64, 256, 128, 1, 2, "ws", "dqpf")  # the package's config now


def main():
  out = sys.argv[1] if len(sys.argv) > 1 else "benchmark_gemm_wgmma_s46.png"
  labels, before, now = [], [], []
  for rec in map(json.loads, open(RAW)):
    times = {tuple(c): t for c, t, _ in rec["all"]}
    labels.append(f"{rec['n']}x{rec['k']}\nM = {rec['m']}")
    before.append(rec["xla_bf16"] / rec["package"])
    now.append(rec["xla_bf16"] / times[DEFAULT])
  fig, ax = plt.subplots(figsize=(10, 4))
  xs = range(len(labels))
  ax.bar([x - 0.2 for x in xs], before, 0.4, label="dequantize + dot")
  ax.bar([x + 0.2 for x in xs], now, 0.4,
         label="wgmma GEMM (routed at M <= 1024)")
  ax.axhline(1.0, color="k", lw=0.8, ls="--")
  ax.set_xticks(list(xs), labels, fontsize=8)
  ax.set_ylabel("XLA bf16 time / 4-bit time")
  ax.set_ylim(0, 1.1)
  ax.set_title("NF4 + DQ past M = 256 on an H100 (sweep run t, 2026-12-06)")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


if __name__ == "__main__":
  main()
