"""The persistent-stream probe, thirty-eighth session (docs/benchmarks.md):
the weight stream of an 8B-shaped MLP (2 phases) and whole layer (4
phases) in one launch (with and without a grid barrier, as one pipeline or
a pipeline a phase) against a launch a phase, on the H100.

    python docs/bench/persistent_stream_s38_plot.py OUT.png PROBE.jsonl
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = ["launches", "one", "barrier", "seq", "pp"]
LABELS = {"launches": "a launch a phase", "one": "one launch, no barrier",
          "barrier": "one launch, grid barrier",
          "seq": "a pipeline a phase + barrier",
          "pp": "pipeline of pipelines + barrier"}
CHAINS = {"mlp": "MLP: gate/up, down (90.8 MB)",
          "layer": "layer: q/k/v, o, gate/up, down (112.5 MB)"}


def main():
  out, probe = sys.argv[1:3]
  recs = [json.loads(line) for line in open(probe)]
  recs = [r for r in recs if "us" in r]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  for ax, (chain, title) in zip(axes, CHAINS.items()):
    for j, mode in enumerate(MODES):
      us = [r["us"] for r in recs if r["chain"] == chain and r["mode"] == mode]
      ax.bar(j, np.median(us), 0.7, color=f"C{j}")
      ax.plot([j] * len(us), us, "k.", ms=4)
    base = np.median([r["us"] for r in recs
                      if r["chain"] == chain and r["mode"] == "launches"])
    ax.axhline(base, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(MODES)), [LABELS[m] for m in MODES],
                  rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("us a pass (weights past L2)")
    ax.set_title(title, fontsize=9)
  fig.suptitle("The weight stream alone in the table GEMV's pattern, one "
               "launch against a launch a phase (H100, 2026-12-05)\nbars: "
               "median of 2 runs (dots); dashed: a launch a phase",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == "__main__":
  main()
