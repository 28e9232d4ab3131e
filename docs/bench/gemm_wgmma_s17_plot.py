"""Plots docs/benchmark_gemm_wgmma_s17.png from the seventeenth session's
H200 runs (docs/benchmarks.md, "wgmma GEMM: K splits for 4096-row weights,
the scale words made ahead at M = 256"): left, `jaxbnb bench matmul`'s
speed against XLA's bf16 dot of the same run, per shape and M, at the
session's start (run a, 10240 rows or more only), after the 256-row
prefetch default (b) and after the K-split route (c); right, Nsight
Compute's kernel times at M = 256 with the statistics, without and with
`prefetch`, in 64- and 128-column steps (`gemm_absmax_cost.py ncupf`).

    python docs/bench/gemm_wgmma_s17_plot.py OUT.png
"""
import json
import os
import re
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(__file__))
from gemm_wgmma_s16_plot import bars  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
RUNS = [("a: session start", "s17a"),
        ("b: M = 129-256 decode the statistics, prefetch", "s17b"),
        ("c: b, and K splits for 4096-row weights", "s17c")]
CASES = [(n, k, m) for n, k in ((14336, 4096), (11008, 4096), (4096, 14336),
                                (4096, 4096)) for m in (64, 128, 256)]
# gemm_absmax_cost.py ncupf: per case, each config without and with
# prefetch, each a warm-up and a timed call.
NCU_CASES = [(14336, 64, 1), (14336, 128, 1), (14336, 256, 2),
             (11008, 64, 1), (11008, 256, 2)]


def speedups(tag):
  """{(n, k, m): XLA bf16 time / jaxbnb time} of a run."""
  res = json.load(open(os.path.join(
      HERE, f"matmul_2026-12-03_h200_{tag}.json")))["results"]
  return {(r["n"], r["k"], r["m"]): r["us"]["xla-bf16"] / r["us"]["jaxbnb"]
          for r in res}


def ncu_m256():
  """{(n, tile_k, prefetch): kernel us} at M = 256, the timed calls."""
  times, name = [], None
  for line in open(os.path.join(HERE, "ncu_prefetch_2026-12-03_h200.txt")):
    if re.match(r"^  \w", line):
      name = line.strip()
    elif "gpu__time_duration" in line and name.startswith(
        "jaxbnb_gemm_4bit_wgmma"):
      times.append(float(line.split()[-1]))
  out, i = {}, 0
  for n, m, cfgs in NCU_CASES:
    for c in range(cfgs):
      for pf in (False, True):
        if m == 256:
          out[(n, (64, 128)[c], pf)] = times[i + 1]
        i += 2
  return out


def main():
  fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.8),
                                    gridspec_kw={"width_ratios": [3, 1.5]})
  bars(left, RUNS, CASES, speedups)
  left.set_xticklabels([f"{n}x{k}\nM={m}" for n, k, m in CASES], fontsize=7)
  left.set_ylabel("speed vs XLA bf16 (same run)")
  left.set_title("jaxbnb bench matmul, NF4 + DQ, bf16 (H200)")
  left.set_ylim(0, 1.6)
  left.legend(fontsize=7, loc="upper right")
  ncu = ncu_m256()
  keys = sorted(ncu)
  right.bar(range(len(keys)), [ncu[k] for k in keys], 0.6,
            color=["tab:orange" if k[2] else "tab:blue" for k in keys])
  right.axhline(48.6 + 7.6, color="k", lw=0.8, ls="--",
                label="before: kernel 48.6 + XLA passes 7.6 (14336)")
  right.set_xticks(range(len(keys)))
  right.set_xticklabels([f"{n}\nstep {tk}\n{'pf' if pf else '-'}"
                         for n, tk, pf in keys], fontsize=7)
  right.set_xlabel("weight rows, K step, pf: scale words made a step ahead",
                   fontsize=7)
  right.set_ylabel("us (Nsight Compute, kernel)")
  right.set_title("M = 256, statistics decoded in the kernel")
  right.set_ylim(0, 70)
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(sys.argv[1] if len(sys.argv) > 1 else "out.png", dpi=110)


if __name__ == "__main__":
  main()
