"""The L2 prefetch experiment, thirty-seventh session (docs/benchmarks.md):
one 8B-shaped decode layer's four table GEMV launches (q/k/v, o, gate/up,
down) in each mode of `l2_prefetch_probe.py`, from its profile, on the
H100.

    python docs/bench/l2_prefetch_s37_plot.py OUT.png PROFILE.txt
"""
import re
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

LABELS = {"none": "no prefetch", "o": "q/k/v prefetches o",
          "chain256": "chain, 256 rows", "o_twice": "o twice (2nd from L2)"}


def main():
  out, profile = sys.argv[1:3]
  modes, mode = {}, None
  for line in open(profile):
    head = re.match(r"\s+(\w+): one layer", line)
    if head:
      mode = head.group(1)
      modes[mode] = []
    elif mode and "gemv_4bit_lut" in line:
      modes[mode].append(float(line.split()[2]))
  names = ["q/k/v", "o", "gate/up", "down"]
  fig, ax = plt.subplots(figsize=(9, 4.2))
  width = 0.8 / len(modes)
  for j, (mode, times) in enumerate(modes.items()):
    if mode == "o_twice":  # o's second launch, from L2
      times = [times[0], times[2], times[3], times[4]]
      ax.bar(1 + (j - 1.5) * width, modes[mode][1], width * 0.9,
             fill=False, edgecolor="gray", linestyle="--")
    ax.bar(np.arange(4) + (j - 1.5) * width, times, width * 0.9,
           label=LABELS.get(mode, mode))
  ax.set_xticks(range(4), names)
  ax.set_ylabel("us a launch")
  ax.set_title("8B-shaped decode layer, batch 1, NF4 + DQ: table GEMV "
               "launches (H100, 2026-12-05)\ndashed: o's first launch in "
               "the o-twice run (from HBM)", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == "__main__":
  main()
