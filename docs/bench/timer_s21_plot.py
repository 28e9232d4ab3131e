"""Plots docs/benchmark_timer_s21.png from the twenty-first session's H200
runs (docs/benchmarks.md, "The timer subtracts a short call"): left, the
time per op that `measure.time_jax` read for quantize + DQ at 2^28 and the
1 GiB copy, the whole call divided by its ops (the timer before, run a) at
a quarter and all of a 5 ms and a 20 ms call's rounds, against the
difference of the two calls (run a: two executables by hand; run c: the
package's timer at 8, 22 and 64 rounds); right, quantize + DQ with and
without the 4-bit kernel's L2 hints (run c; two calls each).

    python docs/bench/timer_s21_plot.py OUT.png
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(__file__)
RUN_A = "quantize_tail_timer_2026-12-03_h200_a.jsonl"
RUN_C = "quantize_tail_timer_2026-12-03_h200_c.jsonl"
EVICT_C = "quantize_tail_evict_2026-12-03_h200_c.jsonl"
OPS = [("quant_dq_2^28", "quantize + DQ, 2^28"), ("copy_1GiB", "copy, 1 GiB")]


def rows(name):
  return [json.loads(line) for line in open(os.path.join(HERE, name))]


def main(path):
  a, c, ev = rows(RUN_A), rows(RUN_C), rows(EVICT_C)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  for ax, (op, title) in zip(axes[:2], OPS):
    one = [r for r in a if r["what"] == op and r["slots"] == 1]
    ax.scatter([r["short_rounds"] for r in one], [r["short_us"] for r in one],
               marker="v", color="tab:red", label="call / ops (before)")
    ax.scatter([r["rounds"] for r in one], [r["us"] for r in one],
               marker="^", color="tab:red")
    ax.scatter([r["rounds"] for r in one], [r["diff_us"] for r in one],
               marker="o", color="tab:blue",
               label="difference of two calls (run a)")
    new = [r for r in c if r["what"] == op]
    ax.scatter([r["rounds"] for r in new], [r["us"] for r in new],
               marker="s", color="tab:green",
               label="time_jax now (run c)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rounds a call")
    ax.set_ylabel("us per op")
    ax.set_title(title)
    ax.legend(fontsize=8)
  ax = axes[2]
  sizes = [(1 << 28, "2^28"), (14336 * 4096, "14336x4096"), (1 << 24, "2^24")]
  for i, (n, label) in enumerate(sizes):
    for on, color in ((False, "tab:gray"), (True, "tab:orange")):
      v = [r["us"] / next(q["us"] for q in ev if q["n"] == n
                          and q["what"] == "package_dq" and not q["evict"]
                          and q["round"] == 0)
           for r in ev if r["n"] == n and r["what"] == "package_dq"
           and r["evict"] == on]
      ax.scatter([i + (0.1 if on else -0.1)] * len(v), v, color=color,
                 label=("hints on" if on else "hints off") if i == 0 else None)
  ax.axhline(1.0, color="k", lw=0.5)
  ax.set_xticks(range(len(sizes)), [s for _, s in sizes])
  ax.set_ylabel("time / first call without hints")
  ax.set_title("quantize + DQ, the 4-bit kernel's L2 hints")
  ax.legend(fontsize=8)
  fig.suptitle("H200, jax 0.11.2, 2026-12-03 (twenty-first session)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "benchmark_timer_s21.png")
