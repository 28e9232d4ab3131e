"""The GEMV's shared-memory pair table ("lds") against its defaults (GPU).

    python docs/bench/gemv_lds_sweep.py 250    # time budget in seconds

NF4 + double quantization, bf16, the decode shapes at M = 1..8: XLA's bf16
matmul, `gemv_4bit`'s default config, the same config with table "lds"
(each byte's pair one shared-memory load instead of the byte permutes),
"warp" with "lds" over a few K splits, and the "tma" variant's "lds"
decode; timed with `measure.time_jax` (the sweep timer) over three
rotating weights. One JSON line per (shape, M) to $OUT/gemv_lds.jsonl.
"""
import json
import os
import sys
import time

sys.path.insert(0, "docs/bench")
sys.path.insert(0, ".")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gemv_sweep import make, median_us  # noqa: E402
from jaxbnb._src.quant import codebooks  # noqa: E402
from pallas_kernels import gemv_4bit as gk  # noqa: E402
from pallas_kernels import gemv_4bit_tma as tg  # noqa: E402

LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
PLAN = (((14336, 4096), (1, 2, 4, 8)), ((4096, 14336), (1, 8)),
        ((4096, 4096), (1, 8)), ((6144, 4096), (1, 8)), ((1024, 4096), (1,)),
        ((28672, 4096), (1, 8)))


def configs(m, n, k):
  """The default, it with table "lds", "warp" + "lds" splits, "tma"."""
  base = gk.default_config(m, n, k, 64, "bfloat16", mma=True)
  out = [base]
  if base[0] in ("reduce", "warp"):
    out.append(base[:6] + ("lds",) + base[7:])
  total = k // 128
  for bn in (64, 128):
    tiles = -(-n // bn)
    for split in (2, 4, 8, 16, 32):
      if total % split == 0 and 132 <= tiles * split <= 16 * 132:
        out.append(("warp", bn, 1, split, bn // 16, 1, "lds", 0))
  out.append(tg.default_config(n, k, decode="lds")[:2] + (128,)
             + tg.default_config(n, k)[3:6] + ("lds", 0))
  return list(dict.fromkeys(out))


def main():
  budget = float(sys.argv[1]) if len(sys.argv) > 1 else 250
  t0 = time.time()
  out = open(os.path.join(os.environ.get("OUT", "/tmp"), "gemv_lds.jsonl"),
             "w")
  for (n, k), ms in PLAN:
    base = make(n, k)
    for m in ms:
      if time.time() - t0 > budget:
        return
      x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
      args = [(x,) + s[:5] for s in base]
      res = {"xla_bf16": median_us(lambda x, w: x @ w.T,
                                   [(x, s[5]) for s in base])}

      def f(*a, c=None):
        return gk.gemv_4bit(a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64,
                            nested=(a[3], a[4], a[5]), config=c, code=CODE)

      cfgs = configs(m, n, k)
      for c in cfgs:
        try:
          res[str(c)] = median_us(lambda *a, c=c: f(*a, c=c), args)
        except Exception as e:  # noqa: BLE001 - a config the shape refuses
          print("failed", c, repr(e)[:200], flush=True)
      out.write(json.dumps(dict(n=n, k=k, m=m, res=res)) + "\n")
      out.flush()
      best = min((v, kk) for kk, v in res.items() if "lds" in kk)
      print(n, k, m, "bf16", round(res["xla_bf16"], 2), "default",
            round(res[str(cfgs[0])], 2), "lds", round(res.get(str(cfgs[1]), -1), 2),
            "best lds", round(best[0], 2), best[1], flush=True)


if __name__ == "__main__":
  main()
