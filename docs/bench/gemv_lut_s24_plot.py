"""The table GEMV at M = 1 (docs/benchmarks.md, twenty-fourth session):
per shape, XLA's bf16 matmul, the "reduce" kernel (the default before)
and the table kernel's default config, in sweep runs b and c (the gate/up
pair in one launch in run c).

    python docs/bench/gemv_lut_s24_plot.py OUT.png RUN_B.jsonl RUN_C.jsonl
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT = [None, 4, 64, 2, True]  # gemv_4bit_lut.default_config's form


def main():
  out, run_b, run_c = sys.argv[1:4]
  rows = {}
  for line in open(run_b):
    r = json.loads(line)
    times = {tuple(c[0][1:]): c[1] for c in r["all"] if isinstance(c[1], float)}
    rows[f"{r['n']}x{r['k']}"] = {
        "XLA bf16": r["xla_bf16"], "run b: reduce": r["package"],
        "run b: table, default config": times.get(tuple(DEFAULT[1:]))}
  for line in open(run_c):
    r = json.loads(line)
    if "ns" in r:  # the gate/up pair in one launch
      rows["gate+up 2x14336x4096"] = {"run c: reduce": r.get("reduce"),
                                      "run c: table (default)":
                                          r.get("table")}
      continue
    key = f"{r['n']}x{r['k']}"
    old = [c[1] for c in r["all"] if c[0] == "reduce"]
    rows.setdefault(key, {"XLA bf16": r["xla_bf16"]})
    rows[key]["run c: table (default)"] = r["package"]
    rows[key]["run c: reduce"] = old[0] if old else None
  series = ["XLA bf16", "run b: reduce", "run b: table, default config",
            "run c: reduce", "run c: table (default)"]
  names = list(rows)
  fig, ax = plt.subplots(figsize=(12, 4.5))
  width = 0.8 / len(series)
  for j, s in enumerate(series):
    vals = [rows[nm].get(s) or np.nan for nm in names]
    ax.bar(np.arange(len(names)) + (j - len(series) / 2 + 0.5) * width, vals,
           width, label=s)
  ax.set_xticks(np.arange(len(names)), names, rotation=15)
  ax.set_ylabel("us per call (M = 1, NF4 + DQ, bf16)")
  ax.set_title("H200: the 4-bit GEMV at M = 1, table lookups against the "
               "earlier default")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


if __name__ == "__main__":
  main()
