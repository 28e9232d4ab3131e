"""The eleventh session's GEMV plot (docs/benchmark_gemv_s11.png).

    python docs/bench/gemv_s11_plot.py docs/benchmark_gemv_s11.png \
        docs/bench/gemv_smem_sweep_2026-12-02_h200.jsonl \
        docs/bench/gemv_large_m_a_2026-12-02_h200.jsonl \
        [docs/bench/gemv_large_m_b_2026-12-02_h200.jsonl]

Left: every "smem" configuration at M = 1 (and 2) per shape, against the
default and XLA's bf16 matmul. Right: the fused "mma" kernel's best tile at
M = 64-256 against the package's path and XLA's bf16 matmul.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def _lines(path):
  return [json.loads(line) for line in open(path)]


def main(png, smem, *large):
  fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
  recs = _lines(smem)
  for i, r in enumerate(recs):
    times = [x[1] for x in r["all"][1:] if isinstance(x[1], float)]
    a.scatter([i] * len(times), times, s=10, color="tab:blue", alpha=0.5,
              label="table 'smem', persistent grid" if i == 0 else None)
    a.scatter([i], [r["all"][0][1]], marker="_", s=500, color="tab:green",
              label="default ('reduce', permutes)" if i == 0 else None)
    a.scatter([i], [r["xla_bf16"]], marker="_", s=500, color="tab:red",
              label="XLA bf16" if i == 0 else None)
  a.set_xticks(range(len(recs)))
  a.set_xticklabels([f"{r['n']}x{r['k']}\nM={r['m']}" for r in recs],
                    fontsize=8)
  a.set_ylabel("us (sweep timer)")
  a.set_title("M = 1-2: the shared-memory table (H200)")
  a.legend(fontsize=8)
  recs = [r for p in large for r in _lines(p)]
  recs.sort(key=lambda r: (r["n"], r["k"], r["m"]))
  xs = range(len(recs))
  best = [min((x[1] for x in r["all"] if isinstance(x[1], float)),
              default=float("nan")) for r in recs]
  b.plot(xs, [r["xla_bf16"] for r in recs], "o", color="tab:red",
         label="XLA bf16")
  b.plot(xs, [r["package"] for r in recs], "s", color="tab:gray",
         label="package (M > 64: dequantize + dot)")
  b.plot(xs, best, "^", color="tab:blue", label="fused 'mma', best tile")
  b.set_xticks(list(xs))
  b.set_xticklabels([f"{r['n']}x{r['k']}\nM={r['m']}" for r in recs],
                    fontsize=7, rotation=60)
  b.set_ylabel("us (sweep timer)")
  b.set_title("M = 64-256: the fused kernel (H200)")
  b.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=110)


if __name__ == "__main__":
  main(*sys.argv[1:])
