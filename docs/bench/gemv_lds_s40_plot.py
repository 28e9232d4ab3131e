"""Plot of the fortieth session's "lds" decode in the TMA warp GEMV
(docs/benchmarks.md): the sweep's times by decode, and the 8B decode's
tokens/s before and after.

    python docs/bench/gemv_lds_s40_plot.py docs/benchmark_gemv_lds_s40.png
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
TAG = "2026-12-05_h100_s40"


def _name(ns, k):
  if len(ns) == 2:
    return "gate/up"
  if len(ns) == 3:
    return "q/k/v"
  return f"{ns[0]}x{k}"


def main():
  rows = [json.loads(line) for line in open(
      os.path.join(HERE, f"gemv_warp_tma_sweep_{TAG}_g.jsonl"))]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8),
                               gridspec_kw=dict(width_ratios=[2.2, 1]))
  labels = [f"{_name(r['ns'], r['k'])}\nM={r['m']}" for r in rows]
  xs = range(len(rows))
  for off, key, name in ((-0.27, None, "XLA bf16"),
                         (0.0, '{"decode": "prmt"}', "permutes (before)"),
                         (0.27, '{"decode": "lds"}', "lds table (now)")):
    vals = [r["xla_bf16"] if key is None else r["warp_tma " + key][0]
            for r in rows]
    ax.bar([x + off for x in xs], vals, 0.27, label=name)
  ax.set_xticks(list(xs), labels, fontsize=6.5)
  ax.set_ylabel("us a call (H100)")
  ax.set_title("TMA warp GEMV, NF4 + DQ, by decode")
  ax.legend(fontsize=8)
  runs = []
  for batch, old in ((4, "b4_prmt_s39routing"), (8, "b8_prmt"),
                     (16, "b16_prmt_s39routing")):
    new = json.load(open(os.path.join(
        HERE, f"decode_nf4dq_{TAG}_b{batch}_lds.json")))
    before = json.load(open(os.path.join(HERE, f"decode_nf4dq_{TAG}_{old}.json")))
    runs.append((batch, before["rows"][0]["tokens_per_s"],
                 new["rows"][0]["tokens_per_s"]))
  bx.bar([i - 0.2 for i in range(3)], [r[1] for r in runs], 0.4,
         label="before")
  bx.bar([i + 0.2 for i in range(3)], [r[2] for r in runs], 0.4, label="now")
  bx.set_xticks(range(3), [f"batch {r[0]}" for r in runs])
  bx.set_ylabel("tokens/s (H100)")
  bx.set_title("8B decode, NF4 + DQ")
  bx.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(sys.argv[1], dpi=110)


if __name__ == "__main__":
  main()
