"""The GEMV's loops with Triton's software pipeliner on (docs/benchmarks.md, "GEMV: the read ceiling and pipelined loops", H200,
2026-12-02; run from the repository root on the GPU machine, outputs to $OUT):

    python docs/bench/gemv_pipelined_loops.py a 430

Pallas' Triton lowering emits `scf.for` without `tt.num_stages`, and Triton
pipelines loads that feed no `tl.dot` only with that attribute; this probe
patches the (private) lowering function to add it (triton_lowering_patch.py),
so the weight bytes stream through shared memory by cp.async, several steps
ahead. The rows
with stages 0 were meant as unpipelined controls and fail (a pallas_call
needs num_stages >= 1); gemv_pipelined_ctrl.py has the controls.
"""
import json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, "docs/bench")
from triton_lowering_patch import LOOP_STAGES as LOOP
from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit as gk
from gemv_sweep import make, median_us

OUT = os.environ.get("OUT", "/tmp")
LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
which = sys.argv[1]; budget = float(sys.argv[2])
t_end = time.time() + budget
out = open(os.path.join(OUT, f"s8_pipe_{which}.jsonl"), "w")

def R(bn, kb, sk, w, st): return (("reduce", bn, kb, sk, w, st, "prmt", 0), st)
def Wp(bn, sk, w, st): return (("warp", bn, 1, sk, w, st, "prmt", 0), st)
def Mm(bn, kb, sk, w, st): return (("mma", bn, kb, sk, w, st, "prmt", 0), st)

def cfgs(n, k, m):
  if which == "a":
    if m == 1:
      c = [R(16, 8, 1, 4, 2), R(16, 8, 1, 4, 3), R(16, 8, 1, 4, 4), R(32, 8, 1, 4, 3),
           R(32, 8, 1, 8, 3), R(16, 8, 2, 4, 3), R(8, 8, 1, 4, 3), R(8, 8, 1, 2, 3),
           R(16, 4, 1, 4, 3), R(16, 4, 1, 4, 5), R(32, 4, 1, 4, 4), R(64, 4, 1, 8, 4),
           Wp(64, 1, 4, 3), Wp(64, 2, 4, 3), Wp(64, 1, 4, 5), Wp(128, 2, 8, 3),
           Wp(32, 1, 2, 3), Wp(128, 1, 8, 4), R(16, 8, 1, 4, 0), Wp(64, 2, 4, 0)]
    elif m <= 8:
      c = [Wp(64, 1, 4, 3), Wp(64, 2, 4, 3), Wp(64, 1, 4, 5), Wp(128, 2, 8, 3),
           Wp(128, 1, 8, 4), Wp(32, 1, 2, 3), Wp(64, 2, 4, 0)]
    else:
      c = [Mm(64, 4, 1, 4, 3), Mm(64, 4, 2, 4, 3), Mm(64, 2, 1, 4, 4), Mm(128, 4, 1, 4, 3),
           Mm(128, 2, 2, 8, 4), Mm(32, 4, 1, 4, 3), Mm(64, 4, 2, 4, 0)]
    if n * k < 14336 * 4096:  # fewer rows: split K more
      c = [(cf[:3] + (cf[3] * 4,) + cf[4:], st) for cf, st in c]
    return c
  raise ValueError(which)

shapes = {"a": [((14336, 4096), (1, 8, 16, 64)), ((4096, 4096), (1, 8, 16)),
                ((4096, 14336), (1, 16))]}[which]
for (n, k), ms in shapes:
  base = make(n, k)
  for m in ms:
    if time.time() > t_end:
      break
    x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
    w_deq = F.dequantize_4bit(base[0][7], base[0][6]).astype(jnp.float32)
    ref = np.asarray(x.astype(jnp.float32) @ w_deq.T)
    scale = float(np.max(np.abs(ref)))
    rec = dict(n=n, k=k, m=m, xla_bf16=median_us(lambda x, w: x @ w.T, [(x, s[5]) for s in base]))
    args = [(x,) + s[:5] for s in base]
    res = []
    for c, st in [(None, 0)] + cfgs(n, k, m):
      if time.time() > t_end:
        break
      jax.clear_caches()
      LOOP[0] = st if st >= 2 else 0
      f = lambda *a, c=c: gk.gemv_4bit(a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64,
                                       nested=(a[3], a[4], a[5]), config=c, code=CODE)
      try:
        y = np.asarray(jax.jit(f)(*args[0]).astype(jnp.float32))
        err = float(np.max(np.abs(y - ref))) / scale
        res.append((str(c), LOOP[0], median_us(f, args), err))
      except Exception as e:
        res.append((str(c), LOOP[0], f"ERR {type(e).__name__}: {str(e)[:200]}", None))
      LOOP[0] = 0
    rec["all"] = res
    out.write(json.dumps(rec) + "\n"); out.flush()
    ok = sorted((r for r in res if isinstance(r[2], float)), key=lambda r: r[2])
    print(f"N={n} K={k} M={m}: bf16 {rec['xla_bf16']:.1f} default {res[0][2]}", flush=True)
    for r in ok[:6]:
      print("   ", r, flush=True)
    for r in res:
      if not isinstance(r[2], float) or (r[3] or 0) > 0.02:
        print("  BAD", r, flush=True)
