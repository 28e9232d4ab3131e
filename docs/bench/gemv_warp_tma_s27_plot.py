"""Plot of the twenty-seventh session's M = 16 matmuls and batch-8 decodes
(docs/benchmarks.md):

    python docs/bench/gemv_warp_tma_s27_plot.py docs/benchmark_gemv_warp_tma_s27.png \
        docs/bench/matmul_2026-12-04_h200_s27_m16.json \
        docs/bench/decode_nf4dq_2026-12-04_h200_s27_b8_groups_warp.json \
        docs/bench/decode_nf4dq_2026-12-04_h200_s27_b8_warp_tma_all.json \
        docs/bench/decode_nf4dq_2026-12-04_h200_s27_b8_committed.json
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = [("jaxbnb", "jaxbnb (warp_tma)"), ("xla-bf16", "XLA bf16"),
           ("torch-bf16", "torch bf16"), ("bnb", "bitsandbytes")]


def _tokens(path):
  d = json.load(open(path))
  return d["rows"][0]["tokens_per_s"]


def main(png, matmul, groups_warp, all_tma, committed):
  rows = json.load(open(matmul))["results"]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5),
                               gridspec_kw=dict(width_ratios=[2.2, 1]))
  x = np.arange(len(rows))
  width = 0.17
  for i, (key, name) in enumerate(COLUMNS):
    ax.bar(x + (i - 2) * width, [r["us"][key] for r in rows], width,
           label=name)
  ax.bar(x + 2 * width, [r["floor_us"] for r in rows], width, label="floor",
         color="0.6")
  ax.set_xticks(x)
  ax.set_xticklabels([r["shape"] for r in rows])
  ax.set_ylabel("us per matmul (median)")
  ax.set_title("M = 16, NF4 + DQ, bf16 (jaxbnb bench matmul)", fontsize=10)
  ax.legend(fontsize=8)
  names = ["groups on \"warp\"\n(before)", "warp_tma on all\n(same call)",
           "new default\n(next call)"]
  toks = [_tokens(p) for p in (groups_warp, all_tma, committed)]
  bx.bar(np.arange(3), toks, 0.6, color=["C7", "C0", "C0"])
  bx.axhline(2500, color="k", ls="--", lw=1, label="target 2,500")
  for i, t in enumerate(toks):
    bx.text(i, t + 20, f"{t:,.1f}", ha="center", fontsize=8)
  bx.set_xticks(np.arange(3))
  bx.set_xticklabels(names, fontsize=8)
  bx.set_ylabel("tokens / s")
  bx.set_ylim(0, 2800)
  bx.set_title("8B-shaped decode, batch 8", fontsize=10)
  bx.legend(fontsize=8, loc="lower right")
  fig.suptitle("H200, 2026-12-04, jax 0.11.2, bitsandbytes 0.50.2: the TMA "
               "warp GEMV as the default at M = 8..16")
  fig.tight_layout()
  fig.savefig(png, dpi=120)


if __name__ == "__main__":
  main(*sys.argv[1:6])
