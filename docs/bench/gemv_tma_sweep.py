"""The "tma" GEMV (`pallas_kernels.gemv_4bit_tma`) against the Triton default (run on the GPU).

    python docs/bench/gemv_tma_sweep.py 100    # time budget in seconds

NF4 + double quantization, bf16, the decode shapes at M = 2..8: XLA's bf16
matmul, `gemv_4bit`'s default config, and "tma" configs around the split
rule, timed with `measure.time_jax` (the sweep timer) over three rotating
weights. One JSON line per (shape, M) to $OUT/ab_tma4.jsonl; the recorded
run is docs/bench/gemv_tma_2026-12-01_h200.jsonl. (In that run the "tma"
config came from a rule targeting four programs an SM; `default_config`
now targets eight, the best of the sweep at M = 8.)
"""
import json, os, sys, time
sys.path.insert(0, "docs/bench"); sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from gemv_sweep import make, median_us
from pallas_kernels import gemv_4bit as gk
from pallas_kernels import gemv_4bit_tma as tg
from jaxbnb._src.quant import codebooks
LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
out = open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_tma4.jsonl"), "w")
T0 = time.time(); BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 120
plan = (((14336, 4096), (8, 4, 2, 1)), ((4096, 14336), (8, 4, 2)), ((4096, 4096), (8, 4)), ((28672, 4096), (8, 4)), ((6144, 4096), (8,)), ((1024, 4096), (8,)))
for (n, k), ms in plan:
  base = make(n, k)
  for m in ms:
    if time.time() - T0 > BUDGET: break
    x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
    args = [(x,) + s[:5] for s in base]
    res = {"xla_bf16": median_us(lambda x, w: x @ w.T, [(x, s[5]) for s in base])}
    f = lambda *a, c=None: gk.gemv_4bit(a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64, nested=(a[3], a[4], a[5]), config=c, code=CODE)
    tri = gk.default_config(m, n, k, 64, "bfloat16", mma=True)
    tma = tg.default_config(n, k) if 4 <= m <= 8 else tri
    cfgs = {"triton " + str(tri): tri, "tma " + str(tma): tma}
    if tma[0] == "tma":
      _, bn, bk, sp, w, st = tma[:6]
      total = k // 2 // bk
      for alt in ((bk, sp, 3), (bk, sp * 2, 2), (bk, max(1, sp // 2), 2), (256, max(1, sp // 2), 2)):
        a_bk, a_sp, a_st = alt
        if (k // 2) % (a_bk * a_sp) == 0 and (k // 2) // (a_bk * a_sp) >= 2:
          c = ("tma", 64, a_bk, a_sp, 4, a_st, "prmt", 0)
          cfgs.setdefault("tma " + str(c), c)
    for key, c in cfgs.items():
      res[key] = median_us(lambda *a, c=c: f(*a, c=c), args)
    out.write(json.dumps(dict(n=n, k=k, m=m, res=res)) + "\n"); out.flush()
    print(n, k, m, {kk: round(v, 2) for kk, v in res.items()}, flush=True)
