"""A/B of two versions of the table GEMV in one process (docs/benchmarks.md,
twenty-fifth session): the module as committed against an earlier copy of
`pallas_kernels/gemv_4bit_lut.py` (`git show REV:pallas_kernels/...`),
alternating, on weights that do not fit in L2 together. On the GPU:

    python docs/bench/gemv_lut_ab.py OLD.py 3            # rounds
    python docs/bench/gemv_lut_ab.py OLD.py ncu new      # for a profiler

NF4 + DQ, bf16, each kernel's default config (`default_config`), timed by
`measure.time_jax` and checked against the other version.
"""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import make, median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit_lut as new  # pylint: disable=g-import-not-at-top,wrong-import-position

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
SHAPES = [(14336, 4096), (4096, 4096), (4096, 14336), (11008, 4096)]
L2 = 60e6  # bytes of weights that no longer fit in the H200's 50 MB L2


def load(path):
  spec = importlib.util.spec_from_file_location("lut_old", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def fn(mod, n, k):
  cfg = mod.default_config(n, k)
  return lambda x, p, a, na, nc, off: mod.gemv(
      x, p, a, na, nc, off, code=CODE, n=n, k=k, **cfg)


def main():
  old = load(sys.argv[1])
  mods = {"old": old, "new": new}
  if sys.argv[2] == "ncu":
    n, k = SHAPES[0]
    [s] = make(n, k, nslots=1)
    x = jax.random.normal(jax.random.key(99), (1, k), jnp.bfloat16)
    f = jax.jit(fn(mods[sys.argv[3]], n, k))
    for _ in range(2):
      f(x, *s[:5]).block_until_ready()
    return
  rounds = int(sys.argv[2])
  path = os.path.join(os.environ.get("OUT", "."), "gemv_lut_ab.jsonl")
  with open(path, "a") as out:
    for n, k in SHAPES:
      slots = make(n, k, nslots=max(2, int(-(-L2 // (n * k // 2)))))
      x = jax.random.normal(jax.random.key(99), (1, k), jnp.bfloat16)
      args = [(x,) + tuple(s[:5]) for s in slots]
      ys = {m: np.asarray(jax.jit(fn(mods[m], n, k))(*args[0]))
            for m in mods}
      diff = float(np.max(np.abs(ys["new"] - ys["old"]))
                   / np.max(np.abs(ys["old"])))
      rec = {"n": n, "k": k, "slots": len(slots), "diff": diff,
             "old": [], "new": []}
      for _ in range(rounds):
        for m in ("old", "new"):
          rec[m].append(median_us(fn(mods[m], n, k), args))
      print(f"{n}x{k} ({len(slots)} weights): old {rec['old']} new "
            f"{rec['new']} diff {diff:.2e}", flush=True)
      out.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
