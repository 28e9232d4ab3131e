"""docs/benchmark_compile.png: the compile-time figures of the
forty-second and forty-third sessions from their raw files
(docs/benchmarks.md, the two "Compile time" sections).

    python docs/bench/compile_plot.py
"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl(name):
  with open(os.path.join(HERE, name)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _compile_s(name):
  with open(os.path.join(HERE, name)) as f:
    return {r["batch"]: r["compile_s"] for r in json.load(f)["rows"]}


def main():
  low = _jsonl("lowering_2026-12-05_cpu_s42_32layers.jsonl")
  comp = {d["tag"]: d for d in _jsonl(
      "compile_2026-12-05_h100_s42_4layers_b1.jsonl")}
  old = _compile_s(
      "decode_nf4dq_2026-12-05_h100_s43_b1_every_call_lowered.json")
  new = _compile_s("decode_nf4dq_2026-12-05_h100_s43_b1_b8_lowered_once.json")
  b8_s40 = _compile_s("decode_nf4dq_2026-12-05_h100_s40_b8_lds.json")
  fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))

  attn = {d["batch"]: d for d in _jsonl(
      "lowering_2026-12-05_cpu_s43_32layers.jsonl")}
  labels, before, after, one = [], [], [], []
  for batch in (1, 8):
    rows = {d["lower_once"]: d for d in low if d["batch"] == batch}
    for prog in ("decode", "prefill"):
      labels.append(f"{prog}\nbatch {batch}")
      before.append(rows[False][f"{prog}_s"])
      after.append(rows[True][f"{prog}_s"])
      one.append(attn[batch][f"{prog}_s"])
  x = range(len(labels))
  a.bar([i - 0.27 for i in x], before, 0.27, label="every call lowered")
  a.bar(list(x), after, 0.27, label="lowered_once")
  a.bar([i + 0.27 for i in x], one, 0.27,
        label="+ one attention kernel (s43)")
  a.set_xticks(list(x), labels)
  a.set_ylabel("seconds")
  a.set_title("Lowering for an H200, 32 layers of Llama-3-8B (CPU host)")
  a.legend()

  progs = ["bench prefill", "bench decode", "generate prefill",
           "generate chunk"]
  runs = [("l4b1", "kernels"), ("l4b1ref", "reference (XLA)"),
          ("l4b1c2", "kernels, cache hit")]
  for j, (tag, name) in enumerate(runs):
    vals = [p["compile_s"] for p in comp[tag]["programs"]]
    b.bar([i + (j - 1) * 0.27 for i in range(4)], vals, 0.27, label=name)
  b.set_xticks(range(4), [p.replace(" ", "\n") for p in progs])
  b.set_ylabel("XLA compile, seconds")
  b.set_ylim(0, 12.5)  # room for the legend
  b.set_title("XLA compile, 4 layers, batch 1 (H100)")
  b.legend()

  c.bar([-0.2], [old[1]], 0.4, label="every call lowered", color="C0")
  c.bar([0.2], [new[1]], 0.4, label="lowered_once", color="C1")
  c.bar([0.8], [b8_s40[8]], 0.4, color="C0")
  c.bar([1.2], [new[8]], 0.4, color="C1")
  for x, v in ((-0.2, old[1]), (0.2, new[1]), (0.8, b8_s40[8]),
               (1.2, new[8])):
    c.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom")
  c.set_xticks([0, 1], ["batch 1\n(one call)", "batch 8\n(before: session 40)"])
  c.set_ylabel("seconds")
  c.set_title("bench decode compile, Llama-3-8B, 32 layers (H100)")
  c.legend()
  fig.tight_layout()
  out = os.path.join(os.path.dirname(HERE), "benchmark_compile.png")
  fig.savefig(out, dpi=110)
  print("wrote", out)


if __name__ == "__main__":
  main()
