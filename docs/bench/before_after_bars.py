"""A bar chart of speed against XLA's bf16 dot, before and after a routing
change, one pair of bars per weight and M: what the plot scripts of the
forty-ninth to fifty-first sessions draw, and the reader of the
`jaxbnb bench matmul` files they plot."""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def speeds(paths, keep=lambda r: True):
  """{(shape, m): jaxbnb's speed against XLA bf16} over the `jaxbnb bench
  matmul` JSON files `paths`, for the rows `keep` takes, the first file
  holding a case winning."""
  out = {}
  for path in paths:
    with open(path) as f:
      for r in json.load(f)["results"]:
        if keep(r):
          out.setdefault((r["shape"], r["m"]),
                         r["us"]["xla-bf16"] / r["us"]["jaxbnb"])
  return out


def k_of(case):
  """K of a `(shape, m)` case, from its "NxK" shape."""
  return int(case[0].split("x")[1])


def draw(cases, before, after, labels, title, out, width=13):
  """Saves the chart to `out`. `cases`: `(shape, ..., m)` tuples in plot
  order; `before`, `after`: {case: speed}; `labels`: the two bars' legend
  entries."""
  fig, ax = plt.subplots(figsize=(width, 4.8))
  xs = range(len(cases))
  ax.bar([x - 0.2 for x in xs], [before[c] for c in cases], 0.4,
         label=labels[0])
  ax.bar([x + 0.2 for x in xs], [after[c] for c in cases], 0.4,
         label=labels[1])
  ax.axhline(1.0, color="k", lw=1)
  ax.set_xticks(list(xs))
  ax.set_xticklabels([f"{c[0]}\nM={c[-1]}" for c in cases], fontsize=6.5,
                     rotation=90)
  ax.set_ylabel("speed against XLA's bf16 dot (> 1 is faster)")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print("wrote", os.path.normpath(out))
