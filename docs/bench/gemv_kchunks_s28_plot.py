"""Plot of the twenty-eighth session's K chunks a program for the TMA warp
GEMV (docs/benchmarks.md): the sweep's runs "e" and "f" (isolated calls,
three rotating weights) and the batch-8 decodes.

    python docs/bench/gemv_kchunks_s28_plot.py docs/benchmark_gemv_kchunks_s28.png
"""
import glob
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

BENCH = "docs/bench/"
KEYS = [("default", "1 chunk (default)"),
        ('warp_tma {"kchunks": 2}', "2 chunks"),
        ('warp_tma {"kchunks": 4}', "4 chunks")]


def _cases():
  """Run "f" where it has the case (q/k/v after the wave fix), else "e"."""
  cases = {}
  for run in ("e", "f"):
    path = BENCH + f"gemv_warp_tma_sweep_2026-12-04_h200_s28_{run}.jsonl"
    for line in open(path):
      r = json.loads(line)
      cases[(tuple(r["ns"]), r["k"], r["m"])] = r
  return cases


def _name(ns, k, m):
  shape = ("q/k/v" if len(ns) == 3 else "gate/up" if len(ns) == 2
           else f"{ns[0]}x{k}")
  return f"{shape}\nM = {m}"


def main(png):
  cases = _cases()
  order = sorted(cases, key=lambda c: (c[2], -sum(c[0]) * c[1]))
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5),
                               gridspec_kw=dict(width_ratios=[2.6, 1]))
  x = np.arange(len(order))
  width = 0.2
  for i, (key, label) in enumerate(KEYS):
    ax.bar(x + (i - 1.5) * width, [cases[c][key][0] for c in order], width,
           label=label)
  ax.bar(x + 1.5 * width, [cases[c]["xla_bf16"] for c in order], width,
         label="XLA bf16", color="0.6")
  ax.set_xticks(x)
  ax.set_xticklabels([_name(*c) for c in order], fontsize=8)
  ax.set_ylabel("us a call (median)")
  ax.set_title("TMA warp GEMV, NF4 + DQ: K chunks a program (H200)")
  ax.legend(fontsize=8)
  runs = []
  for path in sorted(glob.glob(BENCH + "decode_nf4dq_2026-12-04_h200_s28_b8_"
                               "kchunks*_call*.json")):
    tag = path.split("kchunks")[1][:-5]
    kc, call = tag.split("_call")
    tps = json.load(open(path))["rows"][0]["tokens_per_s"]
    runs.append((int(call), {"A": "rule A", "B": "rule B"}.get(kc, kc), tps))
  runs.sort()
  bx.bar(np.arange(len(runs)), [t for _, _, t in runs],
         color=["C0" if k == "1" else "C1" for _, k, _ in runs])
  bx.set_xticks(np.arange(len(runs)))
  bx.set_xticklabels([f"{k}\ncall {c}" for c, k, _ in runs], fontsize=8)
  bx.set_ylim(1900, 2350)
  bx.set_ylabel("tokens/s")
  bx.set_title("8B decode, batch 8, by K chunks")
  fig.tight_layout()
  fig.savefig(png, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
