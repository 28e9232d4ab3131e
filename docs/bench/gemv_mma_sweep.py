"""The "mma" 4-bit GEMV sweep of docs/benchmarks.md (run on the GPU).

    python docs/bench/gemv_mma_sweep.py a 240   # coarse, 14336x4096
    python docs/bench/gemv_mma_sweep.py b 240   # the best tiles, all shapes
    python docs/bench/gemv_mma_sweep.py c 240   # prefetch depth
    python docs/bench/gemv_mma_sweep.py e 240   # one or two steps a program
    python docs/bench/gemv_mma_sweep.py f 240   # "reduce" at M <= 2, less split-K
    python docs/bench/gemv_mma_sweep.py g 240   # "warp" at M <= 8
    python docs/bench/gemv_mma_sweep.py plot OUT.png BEFORE.json AFTER.json \
        [NEW_LABEL OLD_LABEL]

NF4 + double quantization, bf16. Each configuration of
`pallas_kernels.gemv_4bit`'s "mma" variant (the byte-permute decode,
`pallas_kernels/lut_decode.py`) is checked against `x @ dequantize(W).T`
and timed with `measure.time_jax` over three rotating weights, next to the
current default configuration and XLA's bf16 matmul; one JSON line per
(shape, M) goes to $OUT/gemv_mma_<set>.jsonl. The second argument is a
time budget in seconds.
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
from pallas_kernels import gemv_4bit as gk

from gemv_sweep import make, median_us, split_for  # docs/bench, run as a script

LUT = jnp.asarray(codebooks.code_for("nf4"))
CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096),
          (6144, 4096)]


def configs(which, n, k, m):
  out = []
  if which == "a":
    for bn, kb, pf, waves in itertools.product(
        (32, 64, 128), (2, 4, 8), (False, True), (1, 2)):
      out.append(("mma", bn, kb, split_for(n, k, bn, kb, waves), 4, 3,
                  "prmt", pf))
    for bn, w_, st in ((64, 8, 3), (64, 4, 4), (128, 8, 3), (128, 4, 4)):
      out.append(("mma", bn, 4, split_for(n, k, bn, 4, 1), w_, st, "prmt",
                  False))
    return list(dict.fromkeys(out))
  if which == "e":  # short programs: one or two steps each, many programs
    nkb = k // 64
    for bn, kb, w_, per in itertools.product(
        (32, 64, 128), (2, 4, 8), (4, 8), (1, 2)):
      if bn * kb * 32 > 32768 or (w_ == 8 and bn == 32):
        continue
      out.append(("mma", bn, kb, max(1, -(-nkb // kb) // per), w_, 1,
                  "prmt", False))
    return list(dict.fromkeys(out))
  if which == "f":  # "reduce" at M = 1, 2: fewer K splits, smaller tiles
    nkb = k // 64
    out.append(gk.default_config(m, n, k, 64, "bfloat16", mma=True))
    for bn, kb, w_, split in itertools.product(
        (8, 16, 32), (4, 8), (1, 2, 4), (1, 2, 0)):
      if bn * kb * 32 < 1024 * w_:
        continue
      split = split or -(-nkb // kb)
      out.append(("reduce", bn, kb, split, w_, 1, "prmt", False))
    return list(dict.fromkeys(out))
  if which == "g":  # "warp": tensor-core products from registers, M <= 8
    total = k // 128
    out.append(gk.default_config(m, n, k, 64, "bfloat16", mma=True))
    for bn, per in itertools.product((32, 64, 128), (1, 2, 4, 8)):
      out.append(("warp", bn, 1, max(1, total // per), bn // 16, 1, "prmt",
                  0))
    return list(dict.fromkeys(out))
  if which == "c":  # prefetch depth
    for bn, kb, pf, waves in itertools.product(
        (64, 128), (1, 2, 4), (2, 4), (1, 2)):
      out.append(("mma", bn, kb, split_for(n, k, bn, kb, waves), 4, 3,
                  "prmt", pf))
    for pf in (2, 4):
      out.append(("mma", 32, 2, split_for(n, k, 32, 2, 1), 4, 3, "prmt", pf))
    return list(dict.fromkeys(out))
  for bn, kb, pf, waves in itertools.product(
      (64, 128), (4, 8), (False, True), (1, 2)):
    out.append(("mma", bn, kb, split_for(n, k, bn, kb, waves), 4, 3,
                "prmt", pf))
  return list(dict.fromkeys(out))


def main(which, budget_s):
  out = open(os.path.join(os.environ.get("OUT", "/tmp"),
                          f"gemv_mma_{which}.jsonl"), "w")
  t_end = time.time() + budget_s
  shapes = {"a": SHAPES[:1], "c": [SHAPES[0], SHAPES[2]],
            "e": [SHAPES[0], SHAPES[2], SHAPES[3]],
            "f": [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[1]],
            "g": [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[1]]}.get(which,
                                                                 SHAPES)
  for n, k in shapes:
    base = make(n, k)
    ms = {"c": (1, 16), "e": (1, 16, 64, 4), "f": (1, 2),
          "g": (1, 2, 8) if n == 14336 else (1, 8)}.get(
        which, (1, 16, 4, 64))
    for m in ms:
      if time.time() > t_end:
        break
      x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
      w_deq = F.dequantize_4bit(base[0][7], base[0][6]).astype(jnp.float32)
      ref = np.asarray(x.astype(jnp.float32) @ w_deq.T)
      scale = float(np.max(np.abs(ref)))
      rec = dict(n=n, k=k, m=m,
                 xla_bf16=median_us(lambda x, w: x @ w.T,
                                    [(x, s[5]) for s in base]),
                 floor=(n * k / 2 + n * k / 256 + m * k * 2) / 3.1e12 * 1e6)
      args = [(x,) + s[:5] for s in base]
      res = []
      for c in [None] + configs(which, n, k, m):
        if time.time() > t_end:
          break
        f = lambda *a, c=c: gk.gemv_4bit(  # noqa: E731
            a[0], a[1], a[2], LUT, n=n, k=k, blocksize=64,
            nested=(a[3], a[4], a[5]), config=c,
            code=CODE if c is not None else None)
        try:
          y = np.asarray(jax.jit(f)(*args[0]).astype(jnp.float32))
          err = float(np.max(np.abs(y - ref))) / scale
          res.append((str(c), median_us(f, args), err))
        except Exception as e:  # pylint: disable=broad-except
          res.append((str(c), f"ERR {type(e).__name__}: {str(e)[:300]}",
                      None))
      rec["all"] = res
      out.write(json.dumps(rec) + "\n")
      out.flush()
      ok = sorted((r for r in res if isinstance(r[1], float)),
                  key=lambda r: r[1])
      errs = [r for r in res if not isinstance(r[1], float)]
      print(f"N={n} K={k} M={m}: bf16 {rec['xla_bf16']:.1f} floor "
            f"{rec['floor']:.1f} default {res[0][1]} best {ok[:3]} "
            f"errors {len(errs)} {errs[:1]}", flush=True)


def plot(png, before, after, new_label="jaxbnb (mma at M >= 2)",
         old_label="jaxbnb, 2026-11-30"):
  """`jaxbnb bench matmul` results before and after, per shape and M."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  # BEFORE may name several files, comma-separated; later ones win.
  olds = [json.load(open(p))["results"] for p in before.split(",")]
  runs = [[r for rs in olds for r in rs], json.load(open(after))["results"]]
  shapes = [s for s in dict.fromkeys(r["shape"] for r in runs[1])]
  fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.8))
  for ax, shape in zip(np.atleast_1d(axes), shapes):
    new = [r for r in runs[1] if r["shape"] == shape]
    old = {r["m"]: r for r in runs[0] if r["shape"] == shape}
    ms = [r["m"] for r in new]
    ax.plot(ms, [r["us"]["jaxbnb"] for r in new], "o-", c="tab:blue",
            label=new_label)
    mo = [m for m in ms if m in old]
    if mo:
      ax.plot(mo, [old[m]["us"]["jaxbnb"] for m in mo], "o--", c="0.6",
              label=old_label)
    ax.plot(ms, [r["us"]["xla-bf16"] for r in new], "s-", c="tab:red",
            label="XLA bf16")
    ax.plot(ms, [r["us"]["bnb"] for r in new], "^-", c="tab:green",
            label="bitsandbytes")
    ax.plot(ms, [r["floor_mem_us"] for r in new], "k:", label="floor")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{shape} (NF4 + DQ, bf16)", fontsize=9)
    ax.set_xlabel("M")
    ax.set_ylabel("us")
    ax.set_ylim(bottom=0)
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png, dpi=110)


if __name__ == "__main__":
  if sys.argv[1] == "plot":
    plot(*sys.argv[2:])
  else:
    main(sys.argv[1], float(sys.argv[2]))
