"""A bar chart of speed against XLA's bf16 dot, before and after a routing
change, one pair of bars per weight and M: what the plot scripts of the
forty-ninth to fifty-first sessions draw."""
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


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
