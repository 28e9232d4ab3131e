"""Plots docs/benchmark_quantize_s18.png from the eighteenth session's H200
runs (docs/benchmarks.md, "Quantize with double quantization: the NaN test
dropped, the nested step's tile"): left, Nsight Compute's kernel times of
quantize + double quantization per size, stacked (the 4-bit kernel, the
mean's three XLA kernels, the nested kernel), with the nested step's
earlier tile and its present one, against the copy floor and issue 14's
80% line; right, what `measure.time_jax` reports per op for the same
work at 1, 4 and 20 rounds per timed call, against the kernels' sum.

    python docs/bench/quantize_s18_plot.py OUT.png
"""
import json
import os
import re
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
SIZES = [(1 << 28, "2^28"), (14336 * 4096, "14336x4096"), (1 << 24, "2^24")]
TILES = ["nested 16 blocks x 4 warps", "nested 2 x 2 (now)"]
PARTS = [("jaxbnb_quantize_nf4", "4-bit kernel"),
         ("mean", "mean (3 XLA kernels)"),
         ("jaxbnb_quantize_nested", "nested kernel")]


def kernel_times(name):
  """(kernel, us) per kernel Nsight Compute timed in `name` (a file in
  this folder), in order, leaving out the kernels that make the input."""
  kernels, kname = [], None
  for line in open(os.path.join(HERE, name)):
    m = re.match(r"  ([A-Za-z_0-9]+) \(", line)
    if m:
      kname = m.group(1)
      continue
    m = re.search(r"gpu__time_duration.sum\s+(\S+)\s+([\d.,]+)", line)
    if m and kname:
      us = float(m.group(2).replace(",", "")) * (
          1000 if m.group(1) == "ms" else 1)
      if not kname.startswith(("input_concatenate", "loop_xor",
                               "loop_convert")):
        kernels.append((kname, us))
      kname = None
  return kernels


def ncu_runs():
  """Per size, per tile: {part: us} of the timed (second) call."""
  kernels = kernel_times("ncu_quantize_final_2026-12-03_h200.txt")
  calls = [kernels[i:i + 5] for i in range(0, len(kernels), 5)]
  out = {}
  for s, (n, _) in enumerate(SIZES):
    for t, tile in enumerate(TILES):
      call = calls[s * 4 + t * 2 + 1]
      parts = {"mean": 0.0}
      for kname, us in call:
        if kname.startswith(("input_reduce", "loop_multiply")):
          parts["mean"] += us
        else:
          parts[kname] = us
      out[(n, tile)] = parts
  return out


def floors():
  meta_res = json.load(open(os.path.join(
      HERE, "quant_2026-12-03_h200_s18.json")))["results"]
  return {r["numel"]: r["floor_us"] for r in meta_res
          if r["op"] == "quantize" and r["double_quant"]}


def main():
  out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
      HERE, "..", "benchmark_quantize_s18.png")
  runs, fl = ncu_runs(), floors()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8),
                               gridspec_kw={"width_ratios": [3, 2]})
  colors = ["#4c72b0", "#dd8452", "#55a868"]
  x, labels = 0.0, []
  for n, label in SIZES:
    scale = fl[n]
    for t, tile in enumerate(TILES):
      bottom = 0.0
      for (key, part), c in zip(PARTS, colors):
        v = runs[(n, tile)][key] / scale
        ax.bar(x, v, 0.8, bottom=bottom, color=c, hatch="//" if t == 0 else
               None, edgecolor="white",
               label=part if (n, t) == (SIZES[0][0], 1) else None)
        bottom += v
      ax.text(x, bottom + 0.03, f"{bottom * scale:.0f} us", ha="center",
              fontsize=8)
      labels.append((x, f"{label}\n{'nested 16x4' if t == 0 else 'now, 2x2'}"))
      x += 1
    x += 0.6
  ax.axhline(1.0, color="k", lw=1, label="copy floor (bench quant)")
  ax.axhline(1 / 0.8, color="r", ls="--", lw=1,
             label="issue 14: 80% of copy bandwidth")
  ax.set_xticks([p for p, _ in labels], [s for _, s in labels], fontsize=8)
  ax.set_ylabel("kernel time / copy floor")
  ax.set_title("quantize_4bit NF4 + DQ, bf16, H200: Nsight Compute kernel "
               "times", fontsize=10)
  ax.legend(fontsize=8, loc="upper left")
  ax.set_ylim(0, 3.2)

  rec = [json.loads(l) for l in open(os.path.join(
      HERE, "harness_overhead_2026-12-03_h200.jsonl"))]
  q = [r for r in rec if r["what"] == "quantize_dq_2^28"]
  bx.plot([r["rounds"] for r in q], [r["us"] for r in q], "o-",
          label="measure.time_jax, one slot")
  ksum = sum(runs[(1 << 28, TILES[0])].values())
  bx.axhline(ksum, color="k", ls=":",
             label=f"kernels under ncu ({ksum:.0f} us, same tiles)")
  bx.set_xscale("log")
  bx.set_xticks([1, 4, 20], ["1", "4", "20"])
  bx.set_xlabel("rounds per timed call")
  bx.set_ylabel("us per op")
  bx.set_title("quantize + DQ at 2^28: the timer's fixed cost per call",
               fontsize=10)
  bx.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print("wrote", out)


if __name__ == "__main__":
  main()
