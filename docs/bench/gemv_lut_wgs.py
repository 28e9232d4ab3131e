"""The table GEMV with 2, 3 or 4 compute warpgroups (docs/benchmarks.md,
thirty-ninth session): each shape's default config (`default_config`) at
`LUT_WGS` = 2 against the counts named, alternating in one process, on
weights that do not fit in L2 together. It needs the kernel of commit
26237ef (`git checkout 26237ef -- pallas_kernels/`), which took 3 and 4
compute warpgroups and had `LUT_WGS`; the commit after it removed them
(three: no faster; four: the compiled kernel never returned). On the GPU:

    python docs/bench/gemv_lut_wgs.py 3,4 3      # counts, rounds

NF4 + DQ, bf16; single weights and the gate/up group (`gemv_group`),
timed by `measure.time_jax`, each output checked against the two
warpgroups'. Appends to $OUT/gemv_lut_wgs.jsonl.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import make, median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit_lut as lg  # pylint: disable=g-import-not-at-top,wrong-import-position

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
# (rows of each weight, k): one weight, or a group in one launch.
CASES = [((14336,), 4096), ((4096,), 14336), ((4096,), 4096),
         ((11008,), 4096), ((14336, 14336), 4096)]
L2 = 60e6  # bytes of weights that no longer fit in the H200's 50 MB L2


def fn(ns, k, wgs):
  lg.LUT_WGS = wgs
  cfg = (lg.default_config(ns[0], k) if len(ns) == 1
         else lg.group_config(ns, k))
  lg.LUT_WGS = 2

  def run(x, *flat):
    ws = [tuple(flat[5 * g:5 * g + 5]) for g in range(len(ns))]
    return jnp.concatenate(lg.gemv_group(x, ws, code=CODE, ns=ns, k=k, **cfg),
                           axis=1)
  return run, cfg


def main():
  counts = [int(c) for c in sys.argv[1].split(",")]
  rounds = int(sys.argv[2])
  path = os.path.join(os.environ.get("OUT", "."), "gemv_lut_wgs.jsonl")
  with open(path, "a") as out:
    for ns, k in CASES:
      nbytes = sum(ns) * k // 2
      nslots = max(2, int(-(-L2 // nbytes)))
      per = [make(n, k, nslots=nslots) for n in ns]
      x = jax.random.normal(jax.random.key(99), (1, k), jnp.bfloat16)
      args = [(x,) + sum((tuple(p[s][:5]) for p in per), ())
              for s in range(nslots)]
      fns = {w: fn(ns, k, w) for w in [2] + counts}
      ys = {w: np.asarray(jax.jit(f)(*args[0])) for w, (f, _) in fns.items()}
      rec = {"ns": ns, "k": k, "slots": nslots,
             "configs": {w: c for w, (_, c) in fns.items()},
             "diff": {w: float(np.max(np.abs(ys[w] - ys[2]))
                               / np.max(np.abs(ys[2]))) for w in counts},
             "us": {w: [] for w in fns}}
      for _ in range(rounds):
        for w, (f, _) in fns.items():
          rec["us"][w].append(median_us(f, args))
      print(f"{ns}x{k} ({nslots} slots): "
            + "  ".join(f"wgs {w}: {rec['us'][w]}" for w in fns)
            + f"  diff {rec['diff']}", flush=True)
      out.write(json.dumps(rec) + "\n")
      out.flush()


if __name__ == "__main__":
  main()
