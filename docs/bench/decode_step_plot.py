"""Plot of the eighth session's measurements (docs/benchmark_decode_step.png).

    python docs/bench/decode_step_plot.py docs/benchmark_decode_step.png

Left: the 14336x4096 M = 1 kernels under ncu (H200, 2026-12-02), read from
the two ncu reports in docs/bench/ (the probes launched each kernel once,
in their case order): a kernel that only reads the weight, the default
GEMV, the GEMV loops with and without Triton's pipeliner, and register caps.
Right: a batch-1 and a batch-8 decode step of the Llama-3-8B shape split by
kernel kind (the `jax.profiler` figures of docs/benchmarks.md, "the decode
step, kernel by kernel"; the profile's output was printed, not saved, so
they are written out below), next to the step that GEMVs at the read
ceiling would give and the step the issue's targets need.
"""
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = "docs/bench/"


def durations(report):
  """(case, us) of each ncu-profiled kernel, in launch order."""
  txt = open(BENCH + report).read()
  cases = re.findall(r"NCU-CASE (.*)", txt)
  us = [float(v) for v in
        re.findall(r"gpu__time_duration\.sum\s+\S+\s+([\d.]+)", txt)]
  assert len(cases) == len(us), (report, len(cases), len(us))
  return list(zip(cases, us))


def kernels():
  pipe = durations("ncu_gemv_pipelined_2026-12-02_h200.txt")
  cap = durations("ncu_gemv_register_cap_2026-12-02_h200.txt")
  # Labels for the cases of 14336x4096 at M = 1 (the reports' order).
  want = [
      (pipe, "read", "read only (Pallas)"),
      (pipe, "14336 4096 1 None 0", "default GEMV (\"reduce\")"),
      (pipe, "14336 4096 1 ('warp', 64, 1, 2, 4, 1, 'prmt', 0) 0",
       "\"warp\" loop"),
      (pipe, "14336 4096 1 ('warp', 64, 1, 2, 4, 3, 'prmt', 0) 3",
       "\"warp\" loop, pipelined"),
      (pipe, "14336 4096 1 ('reduce', 32, 8, 1, 4, 1, 'prmt', 0) 0",
       "\"reduce\" loop"),
      (pipe, "14336 4096 1 ('reduce', 32, 8, 1, 4, 3, 'prmt', 0) 3",
       "\"reduce\" loop, pipelined"),
      (cap, "14336 4096 1 None 56", "default, 56 registers"),
      (cap, "14336 4096 1 None 48", "default, 48 registers"),
      (cap, "14336 4096 1 ('warp', 64, 1, 32, 4, 1, 'prmt', 0) 0",
       "\"warp\" one step"),
      (cap, "14336 4096 1 ('warp', 64, 1, 32, 4, 1, 'prmt', 0) 32",
       "\"warp\" one step, 32 registers"),
  ]
  out = []
  for rows, case, label in want:
    [us] = [u for c, u in rows if c.strip() == case]
    out.append((label, us))
  return out


# ms per decode step (docs/benchmarks.md, "the decode step, kernel by kernel").
STEP = {
    "batch 1": {"4-bit GEMVs": 2.509, "bf16 head": 0.242,
                "KV-cache copies": 0.104, "small XLA kernels": 0.73},
    "batch 8": {"4-bit GEMVs": 3.220, "bf16 head": 0.241,
                "KV-cache copies": 0.190, "small XLA kernels": 0.89},
    "batch 1,\nGEMVs at the\nread ceiling": {
        "4-bit GEMVs": 1.22, "bf16 head": 0.242, "KV-cache copies": 0.104,
        "small XLA kernels": 0.73},
}
TARGET_MS = {"batch 1": 1e3 / 450, "batch 8": 8e3 / 2500}
COLORS = {"4-bit GEMVs": "tab:blue", "bf16 head": "tab:orange",
          "KV-cache copies": "tab:green"}


def main(png):
  fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.2),
                             gridspec_kw={"width_ratios": [1.2, 1]})
  rows = kernels()
  labels = [r[0] for r in rows]
  vals = [r[1] for r in rows]
  colors = (["tab:gray", "tab:blue"] + ["tab:purple"] * 4
            + ["tab:red"] * 2 + ["tab:cyan", "tab:red"])
  a.barh(range(len(rows)), vals, color=colors)
  a.set_yticks(range(len(rows)), labels)
  a.invert_yaxis()
  for i, v in enumerate(vals):
    a.text(v + 0.3, i, f"{v:.1f}", va="center", fontsize=8)
  a.axvline(14, color="k", ls="--", lw=1)
  a.text(14.3, -0.6, "target 14 us", fontsize=8)
  a.set_xlabel("us under ncu (14336x4096, M = 1, NF4 + DQ, H200)")
  a.set_title("M = 1 GEMV: loops (purple), register caps (red)")
  names = list(STEP)
  bottoms = [0.0] * len(names)
  kinds = []
  for step in STEP.values():
    kinds += [k for k in step if k not in kinds]
  for kind in kinds:
    v = [STEP[n].get(kind, 0.0) for n in names]
    b.bar(range(len(names)), v, bottom=bottoms, label=kind,
          color=COLORS.get(kind, "tab:gray"))
    bottoms = [x + y for x, y in zip(bottoms, v)]
  for i, n in enumerate(names):
    key = "batch 8" if n == "batch 8" else "batch 1"
    b.hlines(TARGET_MS[key], i - 0.4, i + 0.4, colors="k", linestyles="--")
    b.text(i, bottoms[i] + 0.05, f"{bottoms[i]:.2f} ms", ha="center",
           fontsize=8)
  b.set_xticks(range(len(names)), names)
  b.set_ylabel("ms per decode step (dashed: the target's step)")
  b.set_title("Llama-3-8B-shaped decode, NF4 + DQ")
  b.set_ylim(0, 5.3)
  b.legend(fontsize=8, loc="upper right")
  fig.tight_layout()
  fig.savefig(png, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
