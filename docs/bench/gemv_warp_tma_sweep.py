"""The TMA warp GEMV (`pallas_kernels.gemv_4bit_warp_tma`, M = 2..16)
against the "warp" kernel it replaces as the default and XLA's bf16 matmul
(docs/benchmarks.md, twenty-sixth session; run on the GPU):

    python docs/bench/gemv_warp_tma_sweep.py 150 [a|b|...|i]   # budget (s), run

NF4 + DQ, bf16 x. Single weights and the decode's groups (gate/up, q/k/v)
in one `gemv_4bit_group` call, each timed with `measure.time_jax` over
three rotating weights and checked against `x @ dequantize(W).T` (max
error over max |y|). One JSON line a case to $OUT/gemv_warp_tma_sweep.jsonl.
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import make, median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb import functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit as gk  # pylint: disable=g-import-not-at-top,wrong-import-position

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
LUT = jnp.asarray(codebooks.code_for("nf4"))
K = 4096
CASES = [((14336,), K, 8), ((14336, 14336), K, 8), ((4096,), K, 8),
         ((4096,), 14336, 8), ((4096, 1024, 1024), K, 8),
         ((14336,), K, 2), ((14336, 14336), K, 2), ((14336,), K, 4)]
CONFIGS = [("warp", None), ("warp_tma", None), ("warp_tma", dict(stages=2)),
           ("warp_tma", dict(stages=6)), ("warp_tma", dict(rows=2))]
# Run "b" (written in the twenty-sixth session after its last GPU call):
# 12 and 16 compute warps, and M = 16 against the default there.
RUNS = {"a": (CASES, CONFIGS),
        "b": ([((14336,), K, 8), ((14336, 14336), K, 8), ((4096,), 14336, 8),
               ((4096, 1024, 1024), K, 8), ((14336, 14336), K, 2),
               ((14336,), K, 16), ((14336, 14336), K, 16), ((4096,), 14336, 16)],
              [("default", None), ("warp_tma", dict(warps=8)),
               ("warp_tma", dict(warps=12)), ("warp_tma", dict(warps=16)),
               ("warp_tma", dict(warps=12, stages=6))]),
        # Run "c" (twenty-seventh session; run "b" hung on the GPU at its
        # first 16-warp config, which the kernel now refuses): M = 16 and
        # 12 on 8 warps against the default.
        "c": ([((14336,), K, 16), ((4096,), 14336, 16), ((14336, 14336), K, 16),
               ((4096,), K, 16), ((4096, 1024, 1024), K, 16),
               ((14336,), K, 12), ((4096,), 14336, 12)],
              [("default", None), ("warp_tma", dict(warps=8)),
               ("warp_tma", dict(warps=8, stages=6))]),
        # Run "d" (twenty-seventh session): 12 compute warps (3 warpgroups)
        # against the default's 8.
        "d": ([((14336,), K, 8), ((14336, 14336), K, 8), ((4096,), 14336, 8),
               ((14336,), K, 16), ((14336, 14336), K, 16)],
              [("default", None), ("warp_tma", dict(warps=12)),
               ("warp_tma", dict(warps=12, stages=6))]),
        # Run "e" (twenty-eighth session): 2 and 4 K chunks a program
        # (fewer fp32 partials to write and sum) against the default's 1.
        "e": ([((14336, 14336), K, 8), ((4096,), 14336, 8),
               ((4096, 1024, 1024), K, 8), ((4096,), K, 8),
               ((14336, 14336), K, 16), ((4096,), 14336, 16),
               ((4096, 1024, 1024), K, 16)],
              [("default", None), ("warp_tma", dict(kchunks=2)),
               ("warp_tma", dict(kchunks=4))]),
        # Run "f" (twenty-eighth session): run "e" again where its q/k/v
        # rows had overshot one wave (136 programs on 132 SMs).
        "f": ([((4096, 1024, 1024), K, 8), ((4096, 1024, 1024), K, 16),
               ((4096,), K, 16), ((14336,), K, 8), ((14336,), K, 16)],
              [("default", None), ("warp_tma", dict(kchunks=2)),
               ("warp_tma", dict(kchunks=4))]),
        # Run "g" (fortieth session): the "lds" decode (a table of each
        # byte's pair of codes in shared memory) against the permutes.
        "g": ([((14336,), K, 16), ((4096,), 14336, 16),
               ((14336, 14336), K, 16), ((4096, 1024, 1024), K, 16),
               ((4096,), K, 16), ((14336,), K, 8), ((4096,), 14336, 8),
               ((14336, 14336), K, 8), ((4096, 1024, 1024), K, 8),
               ((14336,), K, 4), ((14336, 14336), K, 4), ((14336,), K, 2)],
              [("warp_tma", dict(decode="prmt")),
               ("warp_tma", dict(decode="lds")),
               ("warp_tma", dict(decode="lds", stages=6))]),
        # Run "h" (fortieth session): at M = 2..4 the groups and the
        # 4096-row weights, "warp" (their default there) against "lds".
        "h": ([((14336, 14336), K, 2), ((4096, 1024, 1024), K, 2),
               ((4096,), K, 2), ((4096,), 14336, 2), ((14336, 14336), K, 4),
               ((4096, 1024, 1024), K, 4), ((4096,), K, 4),
               ((4096,), 14336, 4), ((14336, 14336), K, 6)],
              [("default", None), ("warp_tma", dict(decode="lds"))]),
        # Run "i" (forty-first session): k not a multiple of 1024, the
        # codes' rows padded (`gemv_4bit_lut.codes_tiles`): Llama-2-7B's
        # down, Llama-2-13B's down, Qwen2.5-7B's gate/up, down and q/k/v;
        # "warp" (the Triton kernel, their default before), the package's
        # default and the TMA warp GEMV with the "lds" decode.
        "i": ([((4096,), 11008, 2), ((4096,), 11008, 8), ((4096,), 11008, 16),
               ((5120,), 13824, 8), ((18944, 18944), 3584, 8),
               ((18944, 18944), 3584, 16), ((3584,), 18944, 4),
               ((3584,), 18944, 8), ((3584,), 18944, 16),
               ((3584, 512, 512), 3584, 8)],
              [("warp", None), ("default", None),
               ("warp_tma", dict(decode="lds"))]),
        # Run "j" (written in the forty-first session, not yet run): where
        # k has more than 66 chunks (one row group, too few programs: run
        # "i"'s 3584x18944), two K chunks a program take 3 row groups (111
        # programs for 74 chunks) against "warp".
        "j": ([((3584,), 18944, 4), ((3584,), 18944, 8), ((3584,), 18944, 16),
               ((4096,), 18944, 8), ((3584,), 18944, 2)],
              [("warp", None), ("warp_tma", dict(decode="lds")),
               ("warp_tma", dict(decode="lds", kchunks=2))])}


def main():
  budget = float(sys.argv[1])
  cases, configs = RUNS[sys.argv[2] if len(sys.argv) > 2 else "a"]
  t_end = time.time() + budget
  path = os.path.join(os.environ.get("OUT", "."), "gemv_warp_tma_sweep.jsonl")
  made = {}
  with open(path, "a") as out:
    for ns, k, m in cases:
      if time.time() > t_end:
        break
      for n in ns:
        if (n, k) not in made:
          made[(n, k)] = make(n, k)
      x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
      slots = [tuple((made[(n, k)][i][0], made[(n, k)][i][1],
                      (made[(n, k)][i][2], made[(n, k)][i][3],
                       made[(n, k)][i][4])) for n in ns) for i in range(3)]
      ws = [jnp.concatenate([made[(n, k)][i][5] for n in ns]) for i in range(3)]
      rec = dict(ns=ns, k=k, m=m)
      rec["xla_bf16"] = median_us(lambda x, w: x @ w.T, [(x, w) for w in ws])
      ref = np.concatenate([np.asarray(
          x.astype(jnp.float32) @ F.dequantize_4bit(
              made[(n, k)][0][7], made[(n, k)][0][6]).astype(jnp.float32).T)
                            for n in ns], axis=1)
      scale = float(np.max(np.abs(ref)))
      for name, kw in configs:
        if time.time() > t_end:
          break
        if name == "warp":
          cfg = gk.default_config(m, sum(ns), k, 64, "bfloat16", mma=True)
        elif kw is None:  # the package's default at this M
          cfg = None
        else:
          base = gk.gemv_4bit_warp_tma.default_config(
              ns, k, kchunks=kw.get("kchunks", 1))
          rows = tuple(2 * r for r in base["rows"]) if "rows" in kw else (
              base["rows"])
          cfg = ("warp_tma", 64, 128, rows if len(ns) > 1 else rows[0],
                 kw.get("warps", 8), kw.get("stages", base["stages"]),
                 base["kchunks"], kw.get("decode", "prmt"))

        def f(x, w, cfg=cfg):
          return gk.gemv_4bit_group(x, w, LUT, ns=ns, k=k, blocksize=64,
                                    config=cfg, code=CODE)
        key = name + ("" if kw is None else " " + json.dumps(kw))
        try:
          y = np.concatenate([np.asarray(v, np.float32)
                              for v in jax.jit(f)(x, slots[0])], axis=1)
          err = float(np.max(np.abs(y - ref)) / scale)
          rec[key] = [median_us(f, [(x, s) for s in slots]), err]
        except Exception as e:  # pylint: disable=broad-except
          rec[key] = f"ERR {type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(rec), flush=True)
      out.write(json.dumps(rec) + "\n")
      out.flush()


if __name__ == "__main__":
  main()
