"""Plots docs/benchmark_quantize_s20.png from the twentieth session's H200
runs (docs/benchmarks.md, "Quantize: the code tables in shared memory"):
left, Nsight Compute's times of the 4-bit quantize kernel per size, the
global-memory lookups against the shared-memory tables in two tiles and
with the swizzled layout, relative to the global lookups, each bar
labelled with its instructions (run b); right, `jaxbnb bench quant`'s
quantize + double quantization as a share of the copy bandwidth in the
eighteenth, nineteenth and twentieth sessions' runs, against issue 14's
80%.

    python docs/bench/quantize_s20_plot.py OUT.png
"""
import json
import os
import re
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
SIZES = [(1 << 28, "2^28"), (14336 * 4096, "14336x4096"), (1 << 24, "2^24")]
# Run b's Nsight Compute file: per size these variants, two launches each.
NCU_B = "ncu_quantize_smem_2026-12-03_h200_b.txt"
NCU_VARIANTS = ["global lookups (64 x 8)", "shared tables (64 x 8)",
                "shared tables (128 x 16, now)", "swizzled (128 x 16)"]
BENCH = [("s18", "quant_2026-12-03_h200_s18.json"),
         ("s19", "quant_2026-12-03_h200_s19.json"),
         ("s20", "quant_2026-12-03_h200_s20.json")]


def ncu_kernels(name):
  """[{metric: value}] per kernel in the Nsight Compute file `name`."""
  out = []
  for line in open(os.path.join(HERE, name)):
    if re.match(r"\s+jaxbnb_quantize_nf4 \(", line):
      out.append({})
      continue
    m = re.match(r"\s+(\S+)\s+(?:\S+\s+)?([\d,.]+)$", line)
    if m and out:
      out[-1][m.group(1)] = float(m.group(2).replace(",", ""))
  return out


def bench_pct(name):
  """{numel: % of copy bandwidth} of quantize + DQ in a bench JSON."""
  doc = json.load(open(os.path.join(HERE, name)))
  return {r["numel"]: r["pct_copy_bw"]["jaxbnb"] for r in doc["results"]
          if r["op"] == "quantize" and r["double_quant"]}


def main(out_png):
  fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
  kernels = ncu_kernels(NCU_B)
  per = len(NCU_VARIANTS) * 2
  width = 0.2
  for v, label in enumerate(NCU_VARIANTS):
    rel, instr = [], []
    for s in range(len(SIZES)):
      runs = kernels[s * per + 2 * v: s * per + 2 * v + 2]
      base = kernels[s * per: s * per + 2]
      t = np.mean([k["gpu__time_duration.sum"] for k in runs])
      t0 = np.mean([k["gpu__time_duration.sum"] for k in base])
      rel.append(t / t0)
      instr.append(runs[0]["smsp__inst_executed.sum"] / 1e6)
    x = np.arange(len(SIZES)) + (v - 1.5) * width
    a.bar(x, rel, width * 0.95, label=label)
    for xi, r, i in zip(x, rel, instr):
      a.text(xi, r + 0.005, f"{i:.0f}M", ha="center", va="bottom",
             fontsize=6, rotation=90)
  a.axhline(1.0, color="k", lw=0.8)
  a.set_xticks(range(len(SIZES)), [s for _, s in SIZES])
  a.set_ylim(0.85, 1.12)
  a.set_ylabel("kernel time / global lookups' (Nsight Compute)")
  a.set_title("4-bit quantize kernel, bf16 NF4 (H200; labels: "
              "warp instructions)", fontsize=9)
  a.legend(fontsize=7, loc="upper left")
  for j, (tag, name) in enumerate(BENCH):
    pct = bench_pct(name)
    x = np.arange(len(SIZES)) + (j - 1) * 0.27
    vals = [pct.get(n, np.nan) for n, _ in SIZES]
    b.bar(x, vals, 0.25, label=f"{tag} session")
    for xi, val in zip(x, vals):
      b.text(xi, val + 0.5, f"{val:.1f}", ha="center", va="bottom",
             fontsize=7)
  b.axhline(80, color="r", ls="--", lw=1, label="issue 14's target (80%)")
  b.set_xticks(range(len(SIZES)), [s for _, s in SIZES])
  b.set_ylim(0, 90)
  b.set_ylabel("% of copy bandwidth")
  b.set_title("jaxbnb bench quant: quantize + double quantization",
              fontsize=9)
  b.legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
