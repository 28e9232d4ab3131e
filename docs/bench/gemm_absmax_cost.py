"""What the wgmma GEMM's path pays outside its kernel (docs/benchmarks.md,
sixteenth session; run on the GPU).

    python docs/bench/gemm_absmax_cost.py time   # the sweep timer
    ncu --clock-control none --metrics gpu__time_duration.sum \\
        python docs/bench/gemm_absmax_cost.py ncu  # every kernel of one call

Until the sixteenth session `F.matmul_4bit` at M = 64-256 decoded the
nested absmax with XLA (`ops.float_absmax`), turned it into the kernel's
scale words (`gemm_4bit_wgmma.scale_words_t`, a transpose), and ran the
kernel ("float_path" below); now the kernel decodes the statistics itself
("package"). "time" times, over three rotating weights (NF4 + DQ, bf16),
both paths, the kernel alone on scale words made beforehand, the absmax
step alone and XLA's bf16 dot; one JSON line per (shape, M) goes to
$OUT/gemm_absmax_cost.jsonl (the first run, before the change, has no
"float_path": its "package" was that path). "ncu" runs the package path once per M after
a warm-up, so Nsight Compute lists each kernel of one call. "ncupf"
(seventeenth session) runs, once each after a warm-up, the kernel on the
statistics without and with `prefetch` (the next step's scale words made
a step ahead) for each case, in that order, so Nsight Compute times the
kernels themselves.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import make, median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb import functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxbnb._src.quant import codebooks, ops  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemm_4bit_wgmma as gw  # pylint: disable=g-import-not-at-top,wrong-import-position

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
CASES = [((14336, 4096), 64), ((14336, 4096), 128), ((14336, 4096), 256),
         ((11008, 4096), 64), ((11008, 4096), 256)]


def kernel_only(n, k, m):
  """The default config's kernel on scale words made beforehand."""
  cfg = gw.default_config(m, False, k)

  def f(x, p, s):
    tx = cfg["tile_x"]
    mp = -(-m // tx) * tx
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    return gw._compiled(xp, p, s, code=CODE, n=n, k=k, **cfg)[0, :m]  # pylint: disable=protected-access
  return f


def main():
  what = sys.argv[1] if len(sys.argv) > 1 else "time"
  out = open(os.path.join(os.environ.get("OUT", "."),
                          "gemm_absmax_cost.jsonl"), "a")
  made = {}
  for (n, k), m in CASES:
    if (n, k) not in made:
      made = {(n, k): make(n, k)}
    base = made[(n, k)]
    x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
    if what == "ncupf":
      stats = lambda q: (q.absmax, q.nested_absmax, q.nested_code, q.offset)
      cfgs = [dict(gw.default_config(m, False, k, nested=True))]
      cfgs[0].pop("prefetch", None)
      if m > 128:  # the sixteenth session's 256-row default, then this one
        cfgs = [dict(cfgs[0], tile_k=64, stages=4), cfgs[0]]
      for cfg in cfgs:
        for pf in (False, True):
          g = jax.jit(lambda x, p, q, cfg=cfg, pf=pf: gw.gemm(
              x, p.reshape(-1), stats(q), code=CODE, n=n, k=k, prefetch=pf,
              **cfg))
          jax.block_until_ready(g(x, base[0][7], base[0][6]))
          print(f"--- {n}x{k} M={m} {cfg} prefetch={pf}", flush=True)
          jax.block_until_ready(g(x, base[1][7], base[1][6]))
      continue
    if what == "ncu":
      f = jax.jit(lambda x, p, q: F.matmul_4bit(x, p, q))
      jax.block_until_ready(f(x, base[0][7], base[0][6]))
      print(f"--- {n}x{k} M={m}: one call of F.matmul_4bit", flush=True)
      jax.block_until_ready(f(x, base[1][7], base[1][6]))
      print(f"--- {n}x{k} M={m}: end", flush=True)
      continue
    words = [gw.scale_words_t(ops.float_absmax(s[6]), n, k) for s in base]
    ref = np.asarray(x.astype(jnp.float32) @ F.dequantize_4bit(
        base[0][7], base[0][6]).astype(jnp.float32).T)
    y = np.asarray(jax.jit(kernel_only(n, k, m))(x, base[0][0], words[0]),
                   np.float32)
    rec = {"n": n, "k": k, "m": m, "config": gw.default_config(m, False, k),
           "kernel_err": float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))}
    rec["xla_bf16"] = median_us(lambda x, w: x @ w.T, [(x, s[5]) for s in base])
    rec["package"] = median_us(lambda x, p, q: F.matmul_4bit(x, p, q),
                               [(x, s[7], s[6]) for s in base])
    rec["float_path"] = median_us(
        lambda x, p, q: gw.gemm(x, p.reshape(-1), ops.float_absmax(q),
                                code=CODE, n=n, k=k,
                                **gw.default_config(m, False, k)),
        [(x, s[7], s[6]) for s in base])
    rec["kernel_only"] = median_us(kernel_only(n, k, m),
                                   [(x, s[0], w) for s, w in zip(base, words)])
    rec["absmax_only"] = median_us(
        lambda q: gw.scale_words_t(ops.float_absmax(q), n, k),
        [(s[6],) for s in base])
    rec["floor_probe"] = median_us(lambda x: x[:16] + 1, [(x,)] * 3)
    out.write(json.dumps(rec) + "\n")
    out.flush()
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
