"""Plot of the decode-attention measurements (docs/benchmark_decode_attention.png).

    python docs/bench/decode_attention_plot.py docs/benchmark_decode_attention.png

Left: microseconds per attention call (Llama-3-8B heads, H200, 2026-12-02;
docs/bench/decode_attention_sweep.py) for the model's einsum path, the
kernel with one program per row and key/value head (blocks of 128 slots,
the first version), the best configuration of the sweep and the default.
Right: the 8B-shaped decode in tokens/s (`jaxbnb bench decode`, one call),
NF4 + DQ with the einsum path and with the kernel, and bf16 with the
kernel.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BENCH = "docs/bench/"
SHAPES = [(1, 256), (8, 256), (1, 2048), (8, 2048), (1, 8192)]


def main(out):
  sweep = json.load(open(BENCH + "decode_attention_sweep_2026-12-02_h200.json"))
  dflt = json.load(open(
      BENCH + "decode_attention_defaults_2026-12-02_h200.json"))
  series = {"XLA einsum path": [], "kernel, one program (first version)": [],
            "kernel, best of the sweep": [], "kernel, default": []}
  for b, s in SHAPES:
    here = [r for r in sweep if (r["b"], r["s"]) == (b, s)]
    series["XLA einsum path"].append(
        [r["us"] for r in here if r["impl"] == "xla"][0])
    series["kernel, one program (first version)"].append(
        [r["us"] for r in here if r["impl"] == "pallas" and r["split"] == 1
         and r["block_s"] == 128 and r["warps"] == 4][0])
    series["kernel, best of the sweep"].append(
        min(r["us"] for r in here if r["impl"] == "pallas"))
    series["kernel, default"].append(
        [r["us"] for r in dflt if (r["b"], r["s"]) == (b, s)
         and r["impl"] == "pallas"][0])
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8),
                               gridspec_kw={"width_ratios": [1.6, 1]})
  x = np.arange(len(SHAPES))
  w = 0.2
  for i, (name, vals) in enumerate(series.items()):
    ax.bar(x + (i - 1.5) * w, vals, w, label=name)
  ax.set_xticks(x, [f"{b} row{'s' if b > 1 else ''}\n{s} slots"
                    for b, s in SHAPES])
  ax.set_ylabel("us per call (200 dependent calls in a loop)")
  ax.set_yscale("log")
  ax.set_title("Decode attention, Llama-3-8B heads, H200")
  ax.legend(fontsize=8)

  runs = [("NF4+DQ, einsum", "decode_nf4dq_2026-12-02_h200_attention_einsum"),
          ("NF4+DQ, kernel", "decode_nf4dq_2026-12-02_h200_attention_kernel"),
          ("bf16, kernel", "decode_bf16_2026-12-02_h200_attention_kernel")]
  for j, batch in enumerate((1, 8)):
    vals = []
    for _, f in runs:
      d = json.load(open(BENCH + f + ".json"))
      vals.append([r["tokens_per_s"] for r in d["rows"]
                   if r["batch"] == batch][0])
    pos = np.arange(len(runs)) + j * (len(runs) + 1)
    bars = bx.bar(pos, vals, color=["C0", "C3", "C7"])
    bx.bar_label(bars, [f"{v:,.0f}" for v in vals], fontsize=8)
    bx.axhline(450 if batch == 1 else 2500, xmin=(j * 0.5) + 0.02,
               xmax=(j * 0.5) + 0.48, ls="--", c="k", lw=1)
  bx.set_xticks([1, 5], ["batch 1", "batch 8"])
  bx.set_yscale("log")
  bx.set_ylabel("tokens/s (dashed: issue 14's targets)")
  bx.set_title("8B decode (jaxbnb bench decode, one call)")
  handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("C0", "C3", "C7")]
  bx.legend(handles, [n for n, _ in runs], fontsize=8, loc="upper left")
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
