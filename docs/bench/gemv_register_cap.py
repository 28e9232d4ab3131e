"""The GEMV under a register cap (docs/benchmarks.md, "the read ceiling and
pipelined loops", H200, 2026-12-02): `ttg.maxnreg` on each kernel's Triton
module, patched into Pallas' (private) lowering, so that more warps fit on
an SM. On the GPU machine:

    python docs/bench/gemv_register_cap.py 300
    NCU=1 ncu --clock-control none --metrics $M -k regex:gemv \
        python docs/bench/gemv_register_cap.py 120

As run, the ncu pass reopened (emptied) the timer pass's output file, so
only the ncu report (ncu_gemv_register_cap_2026-12-02_h200.txt) was kept.
"""
import json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, "docs/bench")
from triton_lowering_patch import MAX_REGISTERS as NREG
from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit as gk
from gemv_sweep import make, median_us
NCU = os.environ.get("NCU") == "1"
OUT = os.environ.get("OUT", "/tmp")
LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
W = lambda bn, sk, w: ("warp", bn, 1, sk, w, 1, "prmt", 0)
Rd = ("reduce", 32, 8, 8, 4, 1, "prmt", 0)
CASES = {
  (14336, 4096, 1): [(None, 0), (None, 64), (None, 56), (None, 48), (None, 40),
                     (W(64, 8, 4), 0), (W(64, 8, 4), 56), (W(64, 8, 4), 48), (W(64, 8, 4), 40),
                     (W(64, 4, 4), 0), (W(64, 4, 4), 48), (W(128, 8, 8), 0), (W(128, 8, 8), 48),
                     (W(32, 8, 2), 0), (W(32, 8, 2), 48), (W(64, 16, 4), 0), (W(64, 16, 4), 48),
                     (W(64, 32, 4), 0), (W(64, 32, 4), 40), (W(64, 32, 4), 32)],
  (14336, 4096, 8): [(None, 0), (None, 56), (None, 48), (None, 40)],
  (14336, 4096, 16): [(None, 0), (None, 168), (None, 128), (None, 96)],
  (14336, 4096, 64): [(None, 0), (None, 168), (None, 128)],
  (4096, 14336, 1): [(None, 0), (None, 56), (None, 48), (W(64, 8, 4), 0), (W(64, 8, 4), 48), (W(64, 16, 4), 48)],
  (4096, 4096, 1): [(None, 0), (None, 48), (W(64, 8, 4), 0), (W(64, 8, 4), 48), (W(64, 16, 4), 48)],
  (28672, 4096, 1): [(None, 0), (None, 56), (None, 48), (W(64, 8, 4), 0), (W(64, 8, 4), 48)],
}
if NCU:
  CASES = {k: v for k, v in CASES.items() if k in ((14336, 4096, 1), (14336, 4096, 8))}
out = open(os.path.join(OUT, "s8_nreg.jsonl"), "w")
t_end = time.time() + float(sys.argv[1])
bases = {}
for (n, k, m), cs in CASES.items():
  if time.time() > t_end:
    break
  if (n, k) not in bases:
    bases.clear(); bases[(n, k)] = make(n, k)
  base = bases[(n, k)]
  x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
  args = [(x,) + s[:5] for s in base]
  if not NCU:
    w_deq = F.dequantize_4bit(base[0][7], base[0][6]).astype(jnp.float32)
    ref = np.asarray(x.astype(jnp.float32) @ w_deq.T)
    rec = dict(n=n, k=k, m=m, xla_bf16=median_us(lambda x, w: x @ w.T, [(x, s[5]) for s in base]), all=[])
  for c, r in cs:
    if time.time() > t_end:
      break
    jax.clear_caches(); NREG[0] = r
    f = lambda *a, c=c, n=n, k=k: gk.gemv_4bit(a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64,
                                               nested=(a[3], a[4], a[5]), config=c, code=CODE)
    try:
      y = jax.block_until_ready(jax.jit(f)(*args[0]))
      if NCU:
        print("NCU-CASE", n, k, m, c, r, flush=True)
      else:
        err = float(np.max(np.abs(np.asarray(y.astype(jnp.float32)) - ref))) / float(np.max(np.abs(ref)))
        rec["all"].append((str(c), r, median_us(f, args), err))
    except Exception as e:
      print("ERR", n, k, m, c, r, type(e).__name__, str(e)[:200], flush=True)
    NREG[0] = 0
  if not NCU:
    out.write(json.dumps(rec) + "\n"); out.flush()
    print(f"N={n} K={k} M={m} bf16 {rec['xla_bf16']:.1f}", flush=True)
    for row in rec["all"]:
      print("   ", row[0], row[1], round(row[2], 2), round(row[3], 4), flush=True)
