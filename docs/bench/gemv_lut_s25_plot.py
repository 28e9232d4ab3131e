"""The table GEMV at M = 1, twenty-fifth session (docs/benchmarks.md): left,
where 14336x4096's time goes (the TMA stream alone, the kernel with parts
of its work cut, the default); right, `jaxbnb bench matmul` at M = 1 on
four shapes against XLA bf16, bitsandbytes and the floor.

    python docs/bench/gemv_lut_s25_plot.py OUT.png PROBE.jsonl PARTS.jsonl \
        MATMUL.json
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  out, probe, parts, matmul = sys.argv[1:5]
  stream = min(r["us"] for r in map(json.loads, open(probe))
               if r["n"] == 14336 and r["k"] == 4096 and r.get("us", 0) > 0
               and r["width"] == 128 and r["codes"] and r["step_rows"] == 64
               and r.get("per_sm", 1) == 1 and not r.get("contig"))
  cut = next(r for r in map(json.loads, open(parts)) if r["n"] == 14336)
  left = [("TMA stream alone\n(probe)", stream),
          ("kernel, both\nblocks empty", cut["stream"]),
          ("no lookups", cut["no step"]), ("no table", cut["no table"]),
          ("default", cut["default"])]
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  a.barh([n for n, _ in left][::-1], [v for _, v in left][::-1],
         color=["#dd8452"] + ["#4c72b0"] * 4)
  for i, (_, v) in enumerate(left[::-1]):
    a.text(v + 0.2, i, f"{v:.1f}", va="center")
  a.set_xlabel("us (sweep timer; the kernel cases include the offset's "
               "concatenate and XLA's chunk sum)", fontsize=8)
  a.set_title("14336x4096, M = 1: where the time goes")
  res = json.load(open(matmul))["results"]
  shapes = [r["shape"] for r in res]
  cols = [("jaxbnb", "jaxbnb"), ("xla-bf16", "XLA bf16"),
          ("bnb", "bitsandbytes 0.50.2")]
  x = np.arange(len(shapes))
  for j, (key, label) in enumerate(cols):
    b.bar(x + (j - 1) * 0.27, [r["us"][key] for r in res], 0.27, label=label)
  b.scatter(x, [r["floor_mem_us"] for r in res], color="k", marker="_",
            s=400, label="floor (bytes / copy bandwidth)", zorder=3)
  b.set_xticks(x, shapes)
  b.set_ylabel("us")
  b.set_title("jaxbnb bench matmul, M = 1, NF4 + DQ, bf16")
  b.set_ylim(0, 42)
  b.legend(fontsize=8, ncol=2, loc="upper right")
  fig.suptitle("H200, jax 0.11.2, 2026-12-04 (twenty-fifth session)")
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == "__main__":
  main()
