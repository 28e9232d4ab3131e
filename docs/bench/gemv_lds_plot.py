"""Plot of the seventh session's ncu profiles (docs/benchmark_gemv_lds.png).

    python docs/bench/gemv_lds_plot.py docs/benchmark_gemv_lds.png

Reads the four ncu reports of the shared-memory pair table ("lds")
experiment (14336x4096, M = 1, NF4 + DQ, bf16, H200, 2026-12-01) and plots
each kernel's duration against its warp instructions: fewer instructions
did not give a shorter kernel.
"""
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = "docs/bench/"
# Kernels in each report, in launch order (the scripts' config lists).
REPORTS = {  # None: not plotted (the default again); "": plotted, unlabeled
    "ncu_gemv_tma_lds_v1_2026-12-01_h200.txt": [
        "reduce (default)", "tma lds v1, 256 B, 1 split", "",
        "tma lds v1, 64 B steps"],
    "ncu_gemv_tma_lds_v2_2026-12-01_h200.txt": [
        None, "tma lds v2 (x from L1)", "", "", ""],
    "ncu_gemv_tma_lds_v3_2026-12-01_h200.txt": [
        None, "tma lds v3 (swizzled), 1 split", "", "", ""],
    "ncu_gemv_triton_lds_2026-12-01_h200.txt": [
        None, "reduce lds", "warp (prmt)", "warp lds, 8 splits",
        "warp lds, 4 splits"],
}


def kernels(path):
  """[(duration us, warp instructions)] in launch order."""
  out, cur = [], {}
  for line in open(path):
    if re.match(r"\s+jaxbnb_", line):
      if cur:
        out.append(cur)
      cur = {}
    m = re.match(r"\s+(gpu__time_duration\.sum|smsp__inst_executed\.sum)"
                 r"\s+\S+\s+([\d,.]+)", line)
    if m:
      cur[m.group(1)] = float(m.group(2).replace(",", ""))
  if cur:
    out.append(cur)
  return [(k["gpu__time_duration.sum"], k["smsp__inst_executed.sum"] / 1e6)
          for k in out]


def main():
  fig, ax = plt.subplots(figsize=(8, 5.5))
  for name, labels in REPORTS.items():
    for label, (us, minst) in zip(labels, kernels(BENCH + name)):
      if label is None:
        continue
      family = ("tab:red" if "tma" in label or not label else "tab:blue"
                if "lds" in label else "tab:green")
      ax.scatter(minst, us, color=family)
      ax.annotate(label, (minst, us), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
  ax.axhline(9.8, color="gray", ls="--", lw=1)
  ax.text(5.6, 10.3, "bytes-moved floor 9.8 us", fontsize=8, color="gray")
  ax.set_xlabel("warp instructions (millions)")
  ax.set_ylabel("kernel duration under ncu (us)")
  ax.set_title("NF4+DQ GEMV 14336x4096, M = 1, H200: the shared-memory pair "
               "table\n(green: today's kernels; blue: Triton + table; "
               "red: Mosaic GPU + table)", fontsize=9)
  ax.set_ylim(0, 50)
  fig.tight_layout()
  fig.savefig(sys.argv[1] if len(sys.argv) > 1 else "benchmark_gemv_lds.png",
              dpi=120)


if __name__ == "__main__":
  main()
