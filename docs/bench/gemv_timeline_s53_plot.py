"""Plot one launch a shape from `gemv_timeline_probe.py`'s JSON: each
program's phases against the global timer, programs sorted by their
start (docs/benchmarks.md, fifty-third session).

    python docs/bench/gemv_timeline_s53_plot.py RESULT.json OUT.png
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

SLOTS = 8
PHASES = (  # (from stamp, to stamp, label, colour)
    (0, 1, "table build", "tab:orange"),
    (1, 2, "wait for the first tile", "tab:red"),
    (2, 3, "steps (the weight stream)", "tab:blue"),
)


def main(path, out):
  data = json.load(open(path))
  results = data["results"]
  fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.6 * len(results)),
                           squeeze=False)
  for ax, res in zip(axes[:, 0], results):
    raw = np.asarray(res["raw_stamps_one_call"], np.float64)
    gt = raw[:, :7] / 1e3
    t0 = gt[:, 0].min()
    gt -= t0
    order = np.argsort(gt[:, 0], kind="stable")
    end = gt[:, [3, 4, 6]].max(1)
    for row, p in enumerate(order):
      for a, b, label, colour in PHASES:
        ax.barh(row, gt[p, b] - gt[p, a], left=gt[p, a], height=1.0,
                color=colour, label=label if row == 0 else None,
                linewidth=0)
      ax.barh(row, end[p] - gt[p, 3], left=gt[p, 3], height=1.0,
              color="tab:gray", linewidth=0,
              label="last step to the program's end" if row == 0 else None)
    ax.set_title(f"{res['shape']} at M = 1: programs' phases, one launch "
                 f"(launch {res['median']['duration_us']:.1f} us median)",
                 fontsize=9)
    ax.set_xlabel("us from the first program's start")
    ax.set_ylabel("program (by start)")
  axes[0, 0].legend(fontsize=7, loc="lower right")
  fig.suptitle(f"Table GEMV launch timeline ({data['device']}, jax "
               f"{data['jax']})", fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == "__main__":
  main(*sys.argv[1:3])
