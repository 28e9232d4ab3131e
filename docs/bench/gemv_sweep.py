"""The 4-bit GEMV tuning sweeps of docs/benchmarks.md (run on the GPU).

    python docs/bench/gemv_sweep.py a 270   # tiles, tables, "dot" tiles
    python docs/bench/gemv_sweep.py b 165   # prefetch; XLA's own fusions
    python docs/bench/gemv_sweep.py plot OUT.png A.jsonl B.jsonl

NF4 + double quantization, bf16; each configuration of
`pallas_kernels.gemv_4bit` is timed with `measure.time_jax` over three
rotating weights, next to XLA's bf16 matmul; one JSON line per (shape, M)
goes to $OUT/gemv_sweep_<set>.jsonl. The second argument is a time budget
in seconds. The recorded run of set a also timed a "dotk" variant (a
whole dequantized tile per tensor-core product); it never won and was
removed from the kernel.
"""
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from jaxbnb._src.tools import measure
from pallas_kernels import gemv_4bit as gk

LUT = jnp.asarray(codebooks.code_for("nf4"))
SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]


def split_for(n, k, block_n, block_kb, waves=2, sms=132):
  """Split-K that fills `waves` waves of SMs (at most one block a step)."""
  nkb, s = k // 64, 1
  tiles, steps = -(-n // block_n), -(-nkb // block_kb)
  while tiles * s < waves * sms and s * 2 <= steps:
    s *= 2
  return s


def make(n, k, nslots=3):
  slots = []
  for i in range(nslots):
    w = jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    slots.append((packed.reshape(-1), qs.absmax, qs.nested_absmax,
                  qs.nested_code, qs.offset, w, qs, packed))
  return slots


def median_us(fn, slots):
  return float(np.median(measure.time_jax(fn, slots, rounds=20, reps=5,
                                          warmup=1))) * 1e6


def each_case(cases, t_end):
  """(n, k, m, weights from `make`, bf16 x [m, k]) of each ((n, k), m) in
  `cases` until the time `t_end`, each shape's weights made once in a row."""
  made = {}
  for (n, k), m in cases:
    if time.time() > t_end:
      return
    if (n, k) not in made:
      made = {(n, k): make(n, k)}
    x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
    yield n, k, m, made[(n, k)], x


def baseline(x, base, **rec):
  """`rec` with XLA's bf16 matmul and `F.matmul_4bit` timed over the weights
  `base` (from `make`) for this x, and the reference `x @ dequantize(W).T`
  of the first weight with its max |y|: (rec, ref, scale)."""
  rec["xla_bf16"] = median_us(lambda x, w: x @ w.T, [(x, s[5]) for s in base])
  packed, qs = base[0][7], base[0][6]
  ref = np.asarray(x.astype(jnp.float32)
                   @ F.dequantize_4bit(packed, qs).astype(jnp.float32).T)
  rec["package"] = median_us(lambda x, p, q: F.matmul_4bit(x, p, q),
                             [(x, s[7], s[6]) for s in base])
  return rec, ref, float(np.max(np.abs(ref)))


def checked(f, args, ref, scale):
  """`f` on `args[0]` against `ref` (max error over `scale`) and timed over
  `args`: (median us, error), or the exception as a string."""
  try:
    y = np.asarray(jax.jit(f)(*args[0]), np.float32)
    err = float(np.max(np.abs(y - ref)) / scale)
    return median_us(f, args), err
  except Exception as e:  # pylint: disable=broad-except
    return (f"ERR {type(e).__name__}: {str(e)[:300]}",)


def record(out, rec, res, head, top=3):
  """Writes `rec` with its results `res` ((config, us, error) rows) as a
  JSON line and prints the best `top` and any failure (error over 2%)."""
  rec["all"] = res
  out.write(json.dumps(rec) + "\n")
  out.flush()
  ok = sorted((r for r in res if isinstance(r[1], float)), key=lambda r: r[1])
  print(f"{head} best {ok[:top]}", flush=True)
  bad = [r for r in res if not isinstance(r[1], float) or r[2] > 2e-2]
  if bad:
    print("  FAILED", bad[:top], flush=True)


def xla_fused(n, k, m):
  """Dequantize-and-reduce written in jnp, left to XLA's fusion."""
  def f(x, p, a, na, nc, off, w):
    del w
    am = ((nc[a.astype(jnp.int32)].reshape(-1, 256) * na[:, None])
          .reshape(-1)[: n * k // 64] + off).reshape(n, k // 64)
    wb = p.reshape(n, k // 64, 32)
    hi = LUT[(wb >> 4).astype(jnp.int32)]
    lo = LUT[(wb & 15).astype(jnp.int32)]
    x3 = x.reshape(m, k // 64, 32, 2).astype(jnp.float32)
    part = (jnp.einsum("nbj,mbj->mnb", hi, x3[..., 0])
            + jnp.einsum("nbj,mbj->mnb", lo, x3[..., 1]))
    return jnp.sum(part * am[None], axis=-1).astype(x.dtype)
  return f


def configs(which, n, k, m):
  out = [None]
  if which == "a":
    if m <= 4:
      for tb, bn, w_, st, kbm in itertools.product(
          ("pair", "nibble"), (8, 16, 32), (4, 8), (2, 4), (1, 2)):
        out.append(("reduce", bn, 4 * kbm, split_for(n, k, bn, 4 * kbm), w_,
                    st, tb))
    else:
      for var, bn, kb, w_, tb in itertools.product(
          ("dot",), (32, 64, 128), (1, 2, 4), (4, 8),
          ("pair", "nibble")):
        if not (tb == "pair" and w_ == 8):
          out.append((var, bn, kb, split_for(n, k, bn, kb), w_, 3, tb))
  else:
    for bn, kb, pf, tb in itertools.product((8, 16, 32), (4, 8, 16),
                                            (True, False),
                                            ("pair", "nibble")):
      if pf or tb == "pair":
        out.append(("reduce", bn, kb, split_for(n, k, bn, kb), 4, 3, tb, pf))
  return out


def main(which, budget_s):
  out = open(os.path.join(os.environ.get("OUT", "/tmp"),
                          f"gemv_sweep_{which}.jsonl"), "w")
  t_end = time.time() + budget_s
  for n, k in SHAPES:
    base = make(n, k)
    first = (n, k) == SHAPES[0]
    ms = ((1, 4, 16, 64) if which == "a" else (1, 4)) if first else (
        (1, 16) if which == "a" else (1,))
    for m in ms:
      if time.time() > t_end:
        break
      x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
      rec = dict(n=n, k=k, m=m,
                 xla_bf16=median_us(lambda x, w: x @ w.T,
                                    [(x, s[5]) for s in base]),
                 floor=(n * k / 2 + n * k / 64 + m * k * 2) / 3.1e12 * 1e6)
      args = [(x,) + s[:5] + (s[5][:1, :1],) for s in base]
      res = []
      fns = [("xla-fused", xla_fused(n, k, m))] if which == "b" else []
      fns += [(str(c), lambda *a, c=c: gk.gemv_4bit(
          a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64,
          nested=(a[3], a[4], a[5]), config=c))
              for c in configs(which, n, k, m)]
      for name, f in fns:
        if time.time() > t_end:
          break
        try:
          res.append((name, median_us(f, args)))
        except Exception as e:  # pylint: disable=broad-except
          res.append((name, f"ERR {type(e).__name__}: {str(e)[:150]}"))
      rec["all"] = res
      out.write(json.dumps(rec) + "\n")
      out.flush()
      ok = sorted((r for r in res if isinstance(r[1], float)),
                  key=lambda r: r[1])
      print(f"N={n} K={k} M={m}: bf16 {rec['xla_bf16']:.1f} best {ok[:3]}",
            flush=True)


def plot(png, *paths):
  """Every configuration's time per (shape, M), against bf16 and the floor."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  recs = {}
  for path in paths:
    for line in open(path):
      r = json.loads(line)
      key = (r["n"], r["k"], r["m"])
      old = recs.setdefault(key, dict(r, all=[]))
      old["all"] += [(name, v) for name, v in r["all"]
                     if isinstance(v, float)]
  keys = sorted(recs, key=lambda t: (t[2], -t[0] * t[1], t[0]))
  fig, ax = plt.subplots(figsize=(10, 4.8))
  for i, key in enumerate(keys):
    r = recs[key]
    times = [v for name, v in r["all"] if name != "None"]
    ax.scatter(np.full(len(times), i) + np.random.default_rng(i).uniform(
        -0.2, 0.2, len(times)), times, s=6, c="0.6",
               label="a kernel configuration" if i == 0 else None)
    dflt = [v for name, v in r["all"] if name == "None"]
    ax.scatter([i] * len(dflt), dflt, s=30, c="tab:blue", marker="D",
               label="default then" if i == 0 else None)
    ax.hlines(r["xla_bf16"], i - 0.35, i + 0.35, colors="tab:red",
              label="XLA bf16" if i == 0 else None)
    ax.hlines(r["floor"], i - 0.35, i + 0.35, colors="k",
              linestyles="dashed", label="floor" if i == 0 else None)
  ax.set_xticks(range(len(keys)))
  ax.set_xticklabels([f"{n}x{k}\nM={m}" for n, k, m in keys], fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("us per call (log)")
  ax.set_title("4-bit GEMV (NF4 + DQ, bf16), H200: every Triton-lowered "
               "configuration tried")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=110)


if __name__ == "__main__":
  if sys.argv[1] == "plot":
    plot(*sys.argv[2:])
  else:
    main(sys.argv[1], float(sys.argv[2]))
