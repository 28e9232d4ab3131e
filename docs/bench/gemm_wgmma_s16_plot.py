"""Plots docs/benchmark_gemm_wgmma_s16.png from the sixteenth session's
H200 runs (docs/benchmarks.md, "wgmma GEMM: the double quantization
decoded in the kernel"): left, `jaxbnb bench matmul`'s speed against XLA's
bf16 dot of the same run, per shape and M, before (run a: XLA decodes the
absmax first) and after (run b: the first in-kernel version; c: the kept
one; d: the shuffle-shared scales, not kept; e: c with M = 65-128 in
steps of 256 columns, kept, M = 64 and 128 only); right, Nsight Compute's
kernel times of one `F.matmul_4bit` call on 14336x4096 (runs a and c),
the XLA passes before the kernel stacked on it.

    python docs/bench/gemm_wgmma_s16_plot.py OUT.png
"""
import json
import os
import re
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
RUNS = [("a: XLA decodes the absmax", "s16a"),
        ("b: decoded in the kernel, first version", "s16b"),
        ("c: decoded in the kernel (kept)", "s16c"),
        ("d: scales shared by shuffles (not kept)", "s16d_shfl"),
        ("e: c, and M = 128 in steps of 256 columns (kept)", "s16e")]
CASES = [(n, m) for n in (14336, 11008) for m in (64, 128, 256)]


def speedups(tag):
  """{(n, m): XLA bf16 time / jaxbnb time} of a run's K = 4096 cases."""
  res = json.load(open(os.path.join(
      HERE, f"matmul_2026-12-03_h200_{tag}.json")))["results"]
  return {(r["n"], r["m"]): r["us"]["xla-bf16"] / r["us"]["jaxbnb"]
          for r in res if r["k"] == 4096}


def ncu_calls(tag):
  """[(M, kernel us, XLA passes' us)] of the 14336x4096 calls. ncu prints
  its results after the program ends, so a call is found by its kernels:
  the GEMM (224 programs of one warpgroup at M = 64, 112 of three above)
  and the absmax passes launched just before it (`loop_multiply_fusion`
  and `input_transpose_fusion` over 1792 and 896 blocks); of each pair
  of calls the second (the first is the warm-up)."""
  entries, name = [], None
  for line in open(os.path.join(HERE,
                                f"ncu_timeline_2026-12-03_h200_{tag}.txt")):
    if re.match(r"^  \w", line):
      name = line.strip()
    elif "gpu__time_duration" in line:
      entries.append((name, float(line.split()[-1])))
  calls, pre = [], 0.0
  for name, us in entries:
    if name.startswith("jaxbnb_gemm_4bit_wgmma"):
      if "(1, 1, 224)" in name or "(1, 1, 112)" in name:
        calls.append((us, pre))
      pre = 0.0
    elif re.match(r"(loop_multiply_fusion|input_transpose_fusion) "
                  r"\((1792|896), ", name):
      pre += us
    else:
      pre = 0.0
  return [(m, *calls[2 * i + 1]) for i, m in enumerate((64, 128, 256))]


def bars(ax, runs, cases, speedup_of):
  """One group of bars a case, one bar a run: `speedup_of(tag)[case]`,
  and the line at 1 (as fast as bf16)."""
  width = 0.8 / len(runs)
  for j, (label, tag) in enumerate(runs):
    sp = speedup_of(tag)
    xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(cases))]
    ax.bar(xs, [sp.get(c, 0.0) for c in cases], width, label=label)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks(range(len(cases)))


def main():
  fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8),
                                    gridspec_kw={"width_ratios": [3, 2]})
  bars(left, RUNS, CASES, speedups)
  left.axhline(1.3, color="r", lw=0.8, ls="--", label="issue 14: M = 64 target")
  left.set_xticklabels([f"{n}x4096\nM={m}" for n, m in CASES], fontsize=8)
  left.set_ylabel("speed vs XLA bf16 (same run)")
  left.set_title("jaxbnb bench matmul, NF4 + DQ, bf16 (H200)")
  left.set_ylim(0, 1.6)
  left.legend(fontsize=7, loc="upper center", ncol=2)
  # The kernel, and the XLA passes before it, of one call (14336x4096).
  labels, kern, pre = [], [], []
  for tag, name in (("a", "before"), ("c", "after")):
    for m, k_us, pre_us in ncu_calls(tag):
      labels.append(f"M={m}\n{name}")
      kern.append(k_us)
      pre.append(pre_us)
  order = sorted(range(len(labels)),
                 key=lambda i: (int(labels[i][2:5]), labels[i][-5:] != "efore"))
  xs = range(len(order))
  right.bar(xs, [kern[i] for i in order], 0.6, label="wgmma kernel")
  right.bar(xs, [pre[i] for i in order], 0.6,
            bottom=[kern[i] for i in order], label="XLA passes before it")
  right.set_xticks(list(xs))
  right.set_xticklabels([labels[i] for i in order], fontsize=7)
  right.set_ylabel("us (Nsight Compute, one call)")
  right.set_title("14336x4096: one call's GPU time (before: a, after: c)")
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(sys.argv[1] if len(sys.argv) > 1 else "out.png", dpi=110)


if __name__ == "__main__":
  main()
