"""Plot of the forty-first session's Mosaic GPU GEMVs on k not a multiple
of 1024 (docs/benchmarks.md): the table GEMV against "reduce" at M = 1,
the TMA warp GEMV against "warp" at M = 2..16, and the decodes before and
after.

    python docs/bench/oddk_s41_plot.py docs/benchmark_oddk_s41.png
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

HERE = os.path.dirname(__file__)
TAG = "2026-12-05_h100_s41"


def _load(name):
  return [json.loads(line) for line in open(os.path.join(HERE, name))]


def _tokens(name):
  return json.load(open(os.path.join(
      HERE, f"decode_nf4dq_{TAG}_{name}.json")))["rows"][0]["tokens_per_s"]


def _logged_tokens(name):
  """tokens/s of batch 1 from a decode's log (the call's time limit ended
  the process before it wrote its JSON)."""
  text = open(os.path.join(HERE, f"decode_nf4dq_{TAG}_{name}.txt")).read()
  return float(text.split("'tokens_per_s': ")[1].split(",")[0])


def main():
  fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(16, 4.8),
                                   gridspec_kw=dict(width_ratios=[1.4, 2, 1]))
  m1 = [r for r in _load(f"gemv_lut_sweep_{TAG}_f.jsonl") if "all" in r]
  table = [next(a[1] for a in r["all"] if isinstance(a[0], list))
           for r in m1]
  reduce = [next(a[1] for a in r["all"] if a[0] == "reduce") for r in m1]
  xs = range(len(m1))
  for off, vals, name in ((-0.27, [r["xla_bf16"] for r in m1], "XLA bf16"),
                          (0.0, reduce, '"reduce" (Triton)'),
                          (0.27, table, "table GEMV, codes padded")):
    ax.bar([x + off for x in xs], vals, 0.27, label=name)
  ax.set_xticks(list(xs), [f"{r['n']}x{r['k']}" for r in m1], fontsize=7,
                rotation=30)
  ax.set_ylabel("us a call (H100)")
  ax.set_title("M = 1, NF4 + DQ, k not a multiple of 1024")
  ax.legend(fontsize=7)
  many = _load(f"gemv_warp_tma_sweep_{TAG}_i.jsonl")
  xs = range(len(many))

  def name(r):
    if len(r["ns"]) == 2:
      return f"gate/up\n{r['ns'][0]}x{r['k']}"
    if len(r["ns"]) == 3:
      return f"q/k/v x{r['k']}"
    return f"{r['ns'][0]}x{r['k']}"
  for off, key, label in ((-0.27, "xla_bf16", "XLA bf16"),
                          (0.0, "warp", '"warp" (Triton)'),
                          (0.27, 'warp_tma {"decode": "lds"}',
                           "TMA warp GEMV, codes padded")):
    vals = [r[key] if key == "xla_bf16" else r[key][0] for r in many]
    bx.bar([x + off for x in xs], vals, 0.27, label=label)
  bx.set_xticks(list(xs), [f"{name(r)} M={r['m']}" for r in many],
                fontsize=6.5, rotation=30)
  bx.set_title("M = 2..16")
  bx.legend(fontsize=7)
  runs = [("Qwen2.5-7B\n28 layers, b1", _tokens("qwen2.5-7b_b1_b8_k1024"),
           _logged_tokens("qwen2.5-7b_b1_k256_log")),
          ("Qwen2.5-7B\n8 layers, b8", _tokens("qwen2.5-7b_l8_b8_k1024"),
           _tokens("qwen2.5-7b_l8_b8_k256")),
          ("Llama-2-7B\n8 layers, b1", _tokens("llama-2-7b_l8_b1_k1024"),
           _tokens("llama-2-7b_l8_b1_k256"))]
  for i, (_, before, after) in enumerate(runs):
    cx.bar(i - 0.2, 1.0, 0.4, color="C1", label="before" if not i else None)
    cx.bar(i + 0.2, after / before, 0.4, color="C2",
           label="now" if not i else None)
    cx.text(i + 0.2, after / before + 0.005,
            f"+{100 * (after / before - 1):.1f}%", ha="center", fontsize=7)
  cx.set_ylim(0.9, 1.1)
  cx.set_xticks(range(len(runs)), [r[0] for r in runs], fontsize=7)
  cx.set_ylabel("tokens/s, before = 1 (H100)")
  cx.set_title("decode, NF4 + DQ")
  cx.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(sys.argv[1], dpi=110)


if __name__ == "__main__":
  main()
