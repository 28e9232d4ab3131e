"""How fast can each lowering only READ the 14336x4096 NF4 weight (29.4 MB)?
Pallas Triton read kernels over tile shapes, raw Triton (torch's triton,
timed from CUDA graphs), XLA and torch reductions, next to the default M = 1
GEMV and XLA's bf16 matmul, in one run (docs/benchmarks.md, "GEMV: the read ceiling and pipelined loops", H200,
2026-12-02; run from the repository root on the GPU machine, outputs to $OUT):

    python docs/bench/gemv_read_ceiling.py
"""
import itertools, json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
sys.path.insert(0, "docs/bench")
from jaxbnb._src.tools import measure
from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit as gk
from gemv_sweep import make, median_us

OUT = os.environ.get("OUT", "/tmp")
N, K = 14336, 4096
W = K // 8  # uint32 words per row
rec = []
def log(name, us, **kw):
  d = dict(name=name, us=us, gbs=(N * K / 2) / (us * 1e-6) / 1e9 if us else None, **kw)
  rec.append(d); print(json.dumps(d), flush=True)

LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
base = make(N, K)
x = jax.random.normal(jax.random.key(9), (1, K), jnp.bfloat16)
log("xla_bf16_gemv", median_us(lambda x, w: x @ w.T, [(x, s[5]) for s in base]))
args = [(x,) + s[:5] for s in base]
f = lambda *a: gk.gemv_4bit(a[0], a[1], a[2], LUT, n=N, k=K, blocksize=64,
                            nested=(a[3], a[4], a[5]), code=CODE)
log("jaxbnb_default_m1", median_us(f, args))
words = [(jax.lax.bitcast_convert_type(s[0].reshape(N, W, 4), jnp.uint32),) for s in base]
del base
log("xla_rowsum_u32", median_us(lambda w: jnp.sum(w, axis=1, dtype=jnp.uint32), words))
log("xla_sum_u32", median_us(lambda w: jnp.sum(w, dtype=jnp.uint32), words))

def pallas_read(bn, bw, steps, warps, unroll, evict):
  split = W // (bw * steps)
  def kern(w_ref, o_ref):
    i, s = pl.program_id(0), pl.program_id(1)
    def ld(t):
      c0 = pl.multiple_of((s * steps + t) * bw, bw)
      kw = dict(eviction_policy="evict_first") if evict else {}
      return pltriton.load(w_ref.at[pl.ds(i * bn, bn), pl.ds(c0, bw)], **kw)
    acc = jnp.zeros((bn, bw), jnp.uint32)
    if unroll:
      for t in range(steps):
        acc = acc + ld(t)
    else:
      acc = lax.fori_loop(0, steps, lambda t, a: a + ld(t), acc)
    pltriton.store(o_ref.at[s, pl.ds(i * bn, bn)], jnp.sum(acc, axis=1))
  return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((split, N), jnp.uint32),
                        grid=(N // bn, split),
                        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1))

CFG = [  # (bn, bw words, steps, warps, unroll, evict)
  (8, 64, 1, 4, 1, 1), (16, 64, 1, 4, 1, 1), (32, 64, 1, 4, 1, 1),
  (16, 128, 1, 4, 1, 1), (32, 128, 1, 4, 1, 1), (64, 128, 1, 4, 1, 1),
  (32, 128, 1, 8, 1, 1), (64, 128, 1, 8, 1, 1), (128, 128, 1, 8, 1, 1),
  (16, 512, 1, 4, 1, 1), (32, 512, 1, 8, 1, 1), (64, 512, 1, 8, 1, 1),
  (16, 64, 8, 4, 0, 1), (32, 128, 4, 4, 0, 1), (32, 128, 4, 4, 1, 1),
  (16, 128, 4, 4, 1, 1), (32, 64, 8, 4, 1, 1), (64, 64, 8, 8, 1, 1),
  (64, 128, 4, 8, 1, 1), (128, 128, 4, 8, 0, 1), (8, 512, 1, 1, 1, 1),
  (4, 512, 1, 1, 1, 1), (8, 256, 2, 2, 1, 1), (32, 128, 1, 4, 1, 0),
  (16, 128, 4, 4, 1, 0), (64, 512, 1, 16, 1, 1), (128, 512, 1, 16, 1, 1),
]
for c in CFG:
  try:
    fn = pallas_read(*c)
    y = np.asarray(jax.jit(fn)(*words[0])).sum(0, dtype=np.uint32)
    ok = bool(np.array_equal(y, np.asarray(jnp.sum(words[0][0], axis=1, dtype=jnp.uint32))))
    log("pallas_read", median_us(fn, words), cfg=c, ok=ok)
  except Exception as e:
    print("ERR", c, type(e).__name__, str(e)[:300], flush=True)

# Raw Triton through torch
try:
  import torch, triton, triton.language as tl
  print("torch", torch.__version__, "triton", triton.__version__, flush=True)
  @triton.jit
  def rd(w_ptr, o_ptr, N: tl.constexpr, KW: tl.constexpr, BN: tl.constexpr,
         BW: tl.constexpr, STEPS: tl.constexpr, CM: tl.constexpr, EV: tl.constexpr):
    i = tl.program_id(0); s = tl.program_id(1)
    rows = i * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, BW), tl.int32)
    for t in tl.static_range(STEPS):
      cols = (s * STEPS + t) * BW + tl.arange(0, BW)
      acc += tl.load(w_ptr + rows[:, None] * KW + cols[None, :], cache_modifier=CM,
                     eviction_policy=EV)
    tl.store(o_ptr + s * N + rows, tl.sum(acc, 1))
  tw = [torch.from_numpy(np.asarray(w[0]).view(np.int32)).cuda() for w in words]
  for (bn, bw, steps, warps, cm, ev) in [
      (32, 128, 1, 4, "", ""), (32, 128, 1, 4, ".cg", "evict_first"),
      (64, 128, 1, 8, "", "evict_first"), (16, 128, 4, 4, "", "evict_first"),
      (32, 128, 4, 4, ".cg", ""), (64, 128, 4, 8, "", ""), (16, 64, 1, 4, "", ""),
      (128, 128, 1, 8, "", ""), (64, 512, 1, 8, "", ""), (32, 64, 8, 4, "", "")]:
    split = W // (bw * steps)
    outs = [torch.empty((split, N), dtype=torch.int32, device="cuda") for _ in tw]
    calls = [lambda w=w, o=o: rd[(N // bn, split)](w, o, N, W, bn, bw, steps, cm, ev,
                                                   num_warps=warps, num_stages=1)
             for w, o in zip(tw, outs)]
    try:
      t, meth, _ = measure.time_torch(torch, calls, reps=5, warmup=2, target_s=0.005)
      log("triton_read", float(np.median(t)) * 1e6, cfg=[bn, bw, steps, warps, cm, ev], method=meth[:20])
    except Exception as e:
      print("ERR triton", bn, bw, type(e).__name__, str(e)[:300], flush=True)
  for nm, fn in [("torch_rowsum", lambda w: w.sum(dim=1)), ("torch_sum", lambda w: w.sum())]:
    t, meth, _ = measure.time_torch(torch, [lambda w=w: fn(w) for w in tw], reps=5, warmup=2, target_s=0.005)
    log(nm, float(np.median(t)) * 1e6, method=meth[:20])
except Exception as e:
  print("ERR torch/triton", type(e).__name__, str(e)[:400], flush=True)
json.dump(rec, open(os.path.join(OUT, "s8_stream.json"), "w"), indent=1)
