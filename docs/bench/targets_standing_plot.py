"""docs/benchmark_targets_standing.png: each of issue 14's targets, the
latest figure as a fraction of the target (1 = met), read from the raw
files named in docs/benchmarks.md ("Issue 14's targets: where each
stands").

    python docs/bench/targets_standing_plot.py
"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = ("14336x4096", "4096x14336", "11008x4096", "4096x4096", "1024x4096")


def _load(name):
  with open(os.path.join(HERE, name)) as f:
    return json.load(f)


def _matmul(name):
  """{(shape, m): row} of a `jaxbnb bench matmul` file."""
  return {(r["shape"], r["m"]): r for r in _load(name)["results"]}


def _tokens(name, batch):
  return next(r["tokens_per_s"] for r in _load(name)["rows"]
              if r["batch"] == batch)


def _fractions():
  """[(label, H200 fraction, H100 fraction or None)]: higher is better."""
  s21 = _matmul("matmul_2026-12-03_h200_s21.json")
  latest = dict(s21)  # the twenty-third session re-ran three shapes at M <= 256
  for shape in ("11008x4096", "14336x4096", "4096x14336"):
    latest.update(_matmul(f"matmul_2026-12-04_h200_s23a_{shape}.json"))
  # M = 1 / 16 and the decode on the H200 (fifty-ninth session)
  h200 = _matmul("matmul_m1_m16_2026-12-07_h200_s59.json")
  # the package's defaults, re-run on an H100 (M = 1 / 16 and the decode
  # in the fifty-ninth session, the rest in the fifty-eighth)
  h100 = _matmul("matmul_m1_m16_2026-12-07_h100_s59.json")
  h100_large = _matmul("matmul_m64_4096_2026-12-07_h100_s58.json")
  big = "14336x4096"
  us = lambda rows, shape, m: rows[(shape, m)]["us"]["jaxbnb"]
  worst = lambda m, rows=latest: min(rows[(s, m)]["speedup_vs_bf16"]
                                     for s in SHAPES)
  quant = next(r for r in _load("quant_2026-12-03_h200_s21.json")["results"]
               if r["op"] == "quantize" and r["double_quant"]
               and r["numel"] == 2**28)
  adam = _load("optim_2026-12-01_h200_tables.json")["results"][0]["columns"]
  quant_h100 = next(
      r for r in _load("quant_2_28_2026-12-07_h100_s58.json")["results"]
      if r["op"] == "quantize" and r["double_quant"])
  adam_h100 = _load("optim_64m_2026-12-07_h100_s58.json")["results"][0][
      "columns"]
  decode_h100 = decode_h100_b8 = "decode_b1_b8_2026-12-07_h100_s59.json"
  decode_h200 = "decode_b1_b8_2026-12-07_h200_s59.json"
  return [
      ("1. M = 1, 14336x4096 <= 14 us",
       14 / us(h200, big, 1), 14 / us(h100, big, 1)),
      ("1. M = 1, 4096x4096 >= 60% of floor",
       h200[("4096x4096", 1)]["pct_of_floor"] / 60,
       h100[("4096x4096", 1)]["pct_of_floor"] / 60),
      ("1. M = 1, 1024x4096 >= 60% of floor",
       h200[("1024x4096", 1)]["pct_of_floor"] / 60,
       h100[("1024x4096", 1)]["pct_of_floor"] / 60),
      ("2. M = 16 >= 2x bf16 (14336x4096)",
       h200[(big, 16)]["speedup_vs_bf16"] / 2,
       h100[(big, 16)]["speedup_vs_bf16"] / 2),
      ("2. M = 16 <= 1.3x M = 1 (14336x4096)",
       1.3 * us(h200, big, 1) / us(h200, big, 16),
       1.3 * us(h100, big, 1) / us(h100, big, 16)),
      ("2. M = 64 >= 1.3x bf16 (worst shape)", worst(64) / 1.3,
       worst(64, h100_large) / 1.3),
      ("2. M = 256 >= 1x bf16 (worst shape)", worst(256),
       worst(256, h100_large)),
      ("2. M = 4096 >= 0.97x bf16 (worst shape)", worst(4096) / 0.97,
       worst(4096, h100_large) / 0.97),
      ("3. decode batch 1 >= 450 tokens/s",
       _tokens(decode_h200, 1) / 450,
       _tokens(decode_h100, 1) / 450),
      ("3. decode batch 8 >= 2,500 tokens/s",
       _tokens(decode_h200, 8) / 2500, _tokens(decode_h100_b8, 8) / 2500),
      ("4. quantize + DQ >= 80% of copy",
       quant["pct_copy_bw"]["jaxbnb"] / 80,
       quant_h100["pct_copy_bw"]["jaxbnb"] / 80),
      ("5. AdamW 8-bit, 64M, <= 0.45 ms",
       450 / adam["adamw8bit-fused"]["median_us"],
       450 / adam_h100["adamw8bit-fused"]["median_us"]),
  ]


def main():
  rows = _fractions()[::-1]
  fig, ax = plt.subplots(figsize=(9, 6))
  y = range(len(rows))
  ax.barh([i + 0.2 for i in y], [r[1] for r in rows], 0.4,
          label="H200 (the targets' device), latest run")
  ax.barh([i - 0.2 for i in y], [r[2] or 0 for r in rows], 0.4,
          label="H100, latest run (not a target figure)", color="0.65")
  ax.axvline(1.0, color="k", lw=1)
  ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
  ax.set_xlabel("figure / target (1 = met; higher is better)")
  ax.set_title("Issue 14's targets, the latest figure for each (2026-12-07)")
  ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.1), ncol=2,
            fontsize=8)
  fig.tight_layout()
  out = os.path.join(HERE, "..", "benchmark_targets_standing.png")
  fig.savefig(out, dpi=110)
  for label, h200, h100 in rows[::-1]:
    print(f"{label:45s} H200 {h200:.3f}  H100 "
          + (f"{h100:.3f}" if h100 else "-"))


if __name__ == "__main__":
  main()
