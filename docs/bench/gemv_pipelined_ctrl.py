"""Controls for gemv_pipelined_loops.py (docs/benchmarks.md, "GEMV: the read ceiling and pipelined loops", H200,
2026-12-02; run from the repository root on the GPU machine, outputs to $OUT):
(a) the sweep timer's floor per op (a one-value Pallas kernel, an XLA add);
(b) pipelined loops against the same loops without `tt.num_stages`;
(c) with NCU=1, each kernel launched once for ncu, in the printed order:

    python docs/bench/gemv_pipelined_ctrl.py
    NCU=1 ncu --clock-control none --metrics $M -k regex:"gemv|s8_read" \
        python docs/bench/gemv_pipelined_ctrl.py

($M: the metrics listed in ncu_gemv_pipelined_2026-12-02_h200.txt.)
"""
import json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, "docs/bench")
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from triton_lowering_patch import LOOP_STAGES as LOOP
from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit as gk
from gemv_sweep import make, median_us
NCU = os.environ.get("NCU") == "1"
OUT = os.environ.get("OUT", "/tmp")
LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
rec = []

def tiny():
  def k(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1
  return pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), grid=(1,),
                        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1), name="s8_tiny")

def read(bn=16, bw=128, steps=4, warps=4, N=14336, W=512):
  split = W // (bw * steps)
  def kern(w_ref, o_ref):
    i, s = pl.program_id(0), pl.program_id(1)
    acc = jnp.zeros((bn, bw), jnp.uint32)
    for t in range(steps):
      c0 = pl.multiple_of((s * steps + t) * bw, bw)
      acc = acc + pltriton.load(w_ref.at[pl.ds(i * bn, bn), pl.ds(c0, bw)], eviction_policy="evict_first")
    pltriton.store(o_ref.at[s, pl.ds(i * bn, bn)], jnp.sum(acc, axis=1))
  return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((split, N), jnp.uint32), grid=(N // bn, split),
                        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1), name="s8_read")

CASES = [  # (n, k, m, config, loop stages)
  (14336, 4096, 1, None, 0),
  (14336, 4096, 1, ("warp", 64, 1, 2, 4, 1, "prmt", 0), 0),
  (14336, 4096, 1, ("warp", 64, 1, 2, 4, 3, "prmt", 0), 3),
  (14336, 4096, 1, ("reduce", 32, 8, 1, 4, 1, "prmt", 0), 0),
  (14336, 4096, 1, ("reduce", 32, 8, 1, 4, 3, "prmt", 0), 3),
  (14336, 4096, 1, ("warp", 64, 1, 32, 4, 1, "prmt", 0), 0),
  (4096, 4096, 1, None, 0),
  (4096, 4096, 1, ("warp", 128, 1, 8, 8, 1, "prmt", 0), 0),
  (4096, 4096, 1, ("warp", 128, 1, 8, 8, 3, "prmt", 0), 3),
  (14336, 4096, 64, None, 0),
  (14336, 4096, 64, ("mma", 64, 2, 1, 4, 1, "prmt", 0), 0),
  (14336, 4096, 64, ("mma", 64, 2, 1, 4, 4, "prmt", 0), 4),
]
bases = {}
words = None
if not NCU:
  t1 = [(jnp.zeros((16,), jnp.float32) + i,) for i in range(3)]
  rec.append(dict(name="tiny_pallas", us=median_us(tiny(), t1)))
  rec.append(dict(name="tiny_xla_add", us=median_us(lambda x: x + 1, t1)))
  print(rec, flush=True)
for n, k, m, c, st in CASES:
  if (n, k) not in bases:
    bases[(n, k)] = make(n, k)
  base = bases[(n, k)]
  x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
  args = [(x,) + s[:5] for s in base]
  jax.clear_caches(); LOOP[0] = st
  f = lambda *a, c=c, n=n, k=k: gk.gemv_4bit(a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64,
                                             nested=(a[3], a[4], a[5]), config=c, code=CODE)
  fj = jax.jit(f)
  y = fj(*args[0])  # compile + one launch
  jax.block_until_ready(y)
  if NCU:
    print("NCU-CASE", n, k, m, c, st, flush=True)
  else:
    w_deq = F.dequantize_4bit(base[0][7], base[0][6]).astype(jnp.float32)
    ref = np.asarray(x.astype(jnp.float32) @ w_deq.T)
    err = float(np.max(np.abs(np.asarray(y.astype(jnp.float32)) - ref))) / float(np.max(np.abs(ref)))
    d = dict(name="gemv", n=n, k=k, m=m, config=str(c), loop_stages=st, us=median_us(f, args), err=err)
    rec.append(d); print(json.dumps(d), flush=True)
  LOOP[0] = 0
wd = [(jax.lax.bitcast_convert_type(s[0].reshape(14336, 512, 4), jnp.uint32),) for s in bases[(14336, 4096)]]
r = read()
jax.block_until_ready(jax.jit(r)(*wd[0]))
if NCU:
  print("NCU-CASE read", flush=True)
else:
  rec.append(dict(name="pallas_read_16x128x4", us=median_us(r, wd))); print(rec[-1], flush=True)
  json.dump(rec, open(os.path.join(OUT, "s8_ctrl.json"), "w"), indent=1)
