"""Plots docs/benchmark_gemm_wgmma_s23.png from the twenty-third session's
H200 sweep runs q, r and s (docs/benchmarks.md, "wgmma GEMM: one wave of
programs"): per shape and M, XLA's bf16 time over the path before the
session and over the config it made the default (the sweep timer, one
run per case, both columns from the same run).

    python docs/bench/gemm_wgmma_s23_plot.py OUT.png
"""
import functools
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
# (run, n, k, m, config before or None for the run's package column,
# config now): configs as the sweep writes them.
CASES = [
    ("q", 6144, 4096, 256, None, [64, 256, 128, 1, 2, "plain", "dqpf"]),
    ("q", 8192, 4096, 256, None, [64, 256, 128, 1, 2, "plain", "dqpf"]),
    ("r", 3072, 4096, 256, [64, 256, 64, 4, 2, "ks", "dqlt"],
     [64, 256, 128, 2, 2, "plain", "dqpf"]),
    ("s", 6144, 4096, 64, [64, 64, 256, 2, 2, "ks", "dqswlt"],
     [64, 64, 256, 1, 2, "ks", "dqswlt"]),
    ("s", 6144, 4096, 128, [64, 128, 128, 4, 3, "ws", "dqlt"],
     [64, 128, 128, 2, 3, "ws", "dqlt"]),
    ("s", 3072, 4096, 64, [64, 64, 256, 4, 2, "ks", "dqswlt"],
     [64, 64, 256, 2, 2, "ks", "dqswlt"]),
]


@functools.cache
def load(run):
  """{(n, k, m): record} of a sweep run's JSON lines."""
  path = os.path.join(HERE, f"gemm_wgmma_2026-12-04_h200_{run}.jsonl")
  return {(r["n"], r["k"], r["m"]): r
          for r in map(json.loads, open(path))}


def main():
  out = sys.argv[1] if len(sys.argv) > 1 else "benchmark_gemm_wgmma_s23.png"
  labels, before, now = [], [], []
  for run, n, k, m, cfg_before, cfg_now in CASES:
    rec = load(run)[(n, k, m)]
    times = {tuple(c): t for c, t, _ in rec["all"]}
    t_before = rec["package"] if cfg_before is None else times[
        tuple(cfg_before)]
    labels.append(f"{n}x{k}\nM = {m}")
    before.append(rec["xla_bf16"] / t_before)
    now.append(rec["xla_bf16"] / times[tuple(cfg_now)])
  fig, ax = plt.subplots(figsize=(9, 4))
  xs = range(len(labels))
  ax.bar([x - 0.2 for x in xs], before, 0.4, label="path before")
  ax.bar([x + 0.2 for x in xs], now, 0.4, label="default now")
  ax.axhline(1.0, color="k", lw=0.8, ls="--")
  ax.set_xticks(list(xs), labels, fontsize=8)
  ax.set_ylabel("XLA bf16 time / jaxbnb time")
  ax.set_title("wgmma GEMM, NF4 + DQ, H200: K splits within one wave "
               "(sweep runs q, r, s)", fontsize=10)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == "__main__":
  main()
