"""docs/benchmark_cliff_scan_s47.png: NF4 + DQ matmul on Llama-3-70B's and
Qwen2.5-7B's weights (H100, forty-seventh session), speed against XLA's
bf16 dot and against bitsandbytes by M, from the raw `jaxbnb bench matmul`
files named in docs/benchmarks.md.

    python docs/bench/cliff_scan_s47_plot.py
"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"Llama-3-70B": "matmul_2026-12-06_h100_s47_70b.json",
         "Qwen2.5-7B": "matmul_2026-12-06_h100_s47_qwen7b.json"}


def main():
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
  for model, name in FILES.items():
    with open(os.path.join(HERE, name)) as f:
      rows = json.load(f)["results"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
      mine = sorted((r for r in rows if r["shape"] == shape),
                    key=lambda r: r["m"])
      ms = [r["m"] for r in mine]
      style = "-o" if model.startswith("Llama") else "--s"
      for ax, key in zip(axes, ("speedup_vs_bf16", "speedup_vs_bnb")):
        ax.plot(ms, [r[key] for r in mine], style, ms=4,
                label=f"{model} {shape}")
  for ax, title in zip(axes, ("against XLA's bf16 dot",
                              "against bitsandbytes 0.50.2")):
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel("speed (time ratio; > 1 is faster)")
    ax.set_title(title, fontsize=10)
  axes[1].legend(fontsize=7)
  fig.suptitle("NF4 + double quant matmul, H100 80GB HBM3, 2026-12-06",
               fontsize=11)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "..", "benchmark_cliff_scan_s47.png"),
              dpi=110)


if __name__ == "__main__":
  main()
