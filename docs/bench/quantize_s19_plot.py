"""Plots docs/benchmark_quantize_s19.png from the nineteenth session's
H200 runs (docs/benchmarks.md, "Quantize: three bucket tables measured,
the mean's factor in the nested kernel"): left, the 4-bit quantize
kernel's default against three variants of its NF4 code lookup, per size
(the sweep timer, 30 rounds a call, two calls each, from three A/B runs);
right, Nsight Compute's kernel times of quantize + double quantization
as the package runs it, the eighteenth session's (the mean's divide a
kernel of its own) against this session's (inside the nested kernel),
stacked, each size relative to the eighteenth session's sum.

    python docs/bench/quantize_s19_plot.py OUT.png
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(__file__))
from quantize_s18_plot import kernel_times  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
SIZES = [(1 << 28, "2^28"), (14336 * 4096, "14336x4096"), (1 << 24, "2^24")]
# (file, {"what" in the file: variant})
AB = [("quantize_words_ab_2026-12-03_h200.jsonl",
       {"old": "kept", "new": "one uint32 word"}),
      ("quantize_words_ab2_2026-12-03_h200.jsonl",
       {"new": "kept", "old": "one uint32 word"}),
      ("quantize_s21_ab_2026-12-03_h200.jsonl",
       {"qk_old.py": "kept", "qk_s21.py": "11-bit buckets",
        "qk_s21i.py": "11-bit, signs side by side"})]
VARIANTS = ["kept", "one uint32 word", "11-bit buckets",
            "11-bit, signs side by side"]


def ab_times():
  """{variant: {n: [us, ...]}} over the A/B runs (default tiles only)."""
  out = {v: {} for v in VARIANTS}
  for name, roles in AB:
    for line in open(os.path.join(HERE, name)):
      r = json.loads(line)
      if r.get("block_rows") is not None or r["what"] not in roles:
        continue
      out[roles[r["what"]]].setdefault(r["n"], []).append(r["us"])
  return out


def ncu_calls(name):
  """{kernel: us} per call of the package's quantize + DQ in `name`, in
  the order the file lists them (a call starts at its 4-bit kernel)."""
  calls = []
  for kname, us in kernel_times(name):
    if kname == "jaxbnb_quantize_nf4":
      calls.append({})
    calls[-1][kname] = calls[-1].get(kname, 0.0) + us
  return calls


def main(out_png):
  fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
  ab = ab_times()
  width = 0.2
  for i, v in enumerate(VARIANTS):
    means = [np.mean(ab[v].get(n, [np.nan])) / np.mean(ab["kept"][n])
             for n, _ in SIZES]
    a.plot(np.arange(3) + (i - 1.5) * width, means, "o", ms=9, label=v)
  a.axhline(1.0, color="k", lw=0.8)
  a.set_xticks(range(3), [s for _, s in SIZES])
  a.set_ylabel("time / the kept kernel's (same run)")
  a.set_title("4-bit quantize kernel: NF4 code lookups (H200, bf16)")
  a.set_ylim(0.9, 1.2)
  a.legend(fontsize=8)
  s18 = ncu_calls("ncu_quantize_final_2026-12-03_h200.txt")
  s19 = ncu_calls("ncu_quantize_s19_2026-12-03_h200.txt")
  # s18: per size four calls (16x4 warm-up, timed, 2x2 warm-up, timed):
  # the package's tile is 2x2, timed = the 4th; s19: warm-up, timed.
  rows = [("s18", [s18[4 * i + 3] for i in range(3)]),
          ("s19", [s19[2 * i + 1] for i in range(3)])]
  colors = {"jaxbnb_quantize_nf4": "C0", "input_reduce_fusion": "C1",
            "input_reduce_fusion_1": "C2", "loop_multiply_fusion": "C3",
            "jaxbnb_quantize_nested": "C4"}
  labels = {"jaxbnb_quantize_nf4": "4-bit kernel",
            "input_reduce_fusion": "sum, stage 1",
            "input_reduce_fusion_1": "sum, stage 2",
            "loop_multiply_fusion": "the mean's divide",
            "jaxbnb_quantize_nested": "nested kernel"}
  seen = set()
  for j, (tag, calls) in enumerate(rows):
    for i, call in enumerate(calls):
      ref = sum(rows[0][1][i].values())
      base = 0.0
      for k, us in call.items():
        b.bar(i + (j - 0.5) * 0.38, us / ref, 0.36, bottom=base,
              color=colors.get(k, "C7"),
              label=None if k in seen else labels.get(k, k))
        seen.add(k)
        base += us / ref
      b.text(i + (j - 0.5) * 0.38, base,
             f"{tag}\n{sum(call.values()):.1f} us", ha="center",
             va="bottom", fontsize=7)
  b.set_ylim(0, 1.12)
  b.set_xticks(range(3), [s for _, s in SIZES])
  b.set_ylabel("kernel time / the eighteenth session's sum")
  b.set_title("quantize + DQ kernels under Nsight Compute: s18, s19")
  b.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
