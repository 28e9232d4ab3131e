"""The fifty-fourth session's table GEMV variants at M = 1 side by side
(docs/benchmarks.md): each variant's median program phases (build, wait
for the first tile, steps) and launch duration, from
`gemv_timeline_probe.py`'s JSON files in docs/bench/.

    python docs/bench/gemv_timeline_s54_plot.py
"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = (  # (file suffix, label)
    ("alloc0", "allocated by the pipeline (the old default)"),
    ("alloc1_third", "allocated first (the new default)"),
    ("a1_lw", "allocated first, TMA waits for the build's loads"),
    ("a1_ls", "allocated first, loads back before the table\n(LOADSTAMP, as LOADS_FIRST now does)"),
)
SHAPES = ("14336x4096", "4096x4096")


def _median(suffix, shape):
  path = os.path.join(HERE, f"gemv_timeline_2026-12-06_h100_s54_{suffix}.json")
  with open(path) as f:
    return next(r["median"] for r in json.load(f)["results"]
                if r["shape"] == shape)


def main():
  fig, axes = plt.subplots(len(SHAPES), 1, figsize=(9, 5.2))
  for ax, shape in zip(axes, SHAPES):
    for row, (suffix, label) in enumerate(VARIANTS):
      m = _median(suffix, shape)
      build, first = m["build_us"], m["first_step_after_start_us"]
      ax.barh(row, build, color="tab:orange",
              label="table build" if row == 0 else None)
      ax.barh(row, first - build, left=build, color="tab:red",
              label="wait for the first tile" if row == 0 else None)
      ax.barh(row, m["steps_us"], left=first, color="tab:blue",
              label="steps (the weight stream)" if row == 0 else None)
      ax.plot([m["duration_us"]], [row], "k|", markersize=14,
              label="launch duration" if row == 0 else None)
      ax.text(m["duration_us"] + 0.2, row, f"{m['duration_us']:.2f} us",
              va="center", fontsize=8)
    ax.set_yticks(range(len(VARIANTS)), [v[1] for v in VARIANTS],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_title(f"{shape}, M = 1: a program's median phases (H100)",
                 fontsize=9)
    ax.set_xlim(0, max(ax.get_xlim()[1], 17))
  axes[-1].set_xlabel("us from the program's start (the launch: from its "
                      "start)")
  axes[1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  out = os.path.join(HERE, "..", "benchmark_gemv_timeline_s54.png")
  fig.savefig(out, dpi=110)
  print("wrote", out)


if __name__ == "__main__":
  main()
