"""Where the table GEMV's time goes (docs/benchmarks.md, twenty-fifth
session): the default kernel against itself with parts of its work left
out, and against other pipeline depths. On the GPU:

    python docs/bench/gemv_lut_parts.py

Cases, NF4 + DQ, bf16, timed by `measure.time_jax` over three rotating
weights (88 MB or more, past L2):
* "default": `default_config`;
* "no step": each pipeline step's PTX empty (the table made, the weight
  streamed, nothing looked up);
* "no table": the table's PTX only meets the barrier (the steps look up
  whatever shared memory holds);
* "stream": both empty, the kernel's pipeline alone;
* "stages 5", "not early": the default with 5 steps in flight, and with
  the TMA warpgroup waiting for the table.
Outputs of the cut cases are garbage; only their times count. One JSON
line per shape to $OUT/gemv_lut_parts.jsonl.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import make, median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit_lut as lg  # pylint: disable=g-import-not-at-top,wrong-import-position

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
BUILD, STEP = lg.build_ptx, lg.step_ptx


def barrier_only(*args, wgs=1, early=False, **kwargs):
  del args, kwargs
  if not early:
    return "{\nbar.sync 0;\n}"
  return ("{\n.reg .b32 t;\n.reg .pred pw;\nmov.u32 t, %tid.x;\n"
          f"setp.lt.u32 pw, t, {128 * wgs};\n@pw bar.sync 15, {128 * wgs};\n}}")


def build_cut(code, dtype_name, n, k, rows_a_program, span, n_nested,
              wgs=1, early=False, group0=0):
  del code, dtype_name, n, k, rows_a_program, span, n_nested, group0
  return barrier_only(wgs=wgs, early=early)


def main():
  path = os.path.join(os.environ.get("OUT", "."), "gemv_lut_parts.jsonl")
  cases = {"default": (BUILD, STEP, {}),
           "no step": (BUILD, lambda *a: "{\n}", {}),
           "no table": (build_cut, STEP, {}),
           "stream": (build_cut, lambda *a: "{\n}", {}),
           "stages 5": (BUILD, STEP, {"stages": 5}),
           "not early": (BUILD, STEP, {"early": False})}
  with open(path, "a") as out:
    for n, k in [(14336, 4096), (4096, 14336), (4096, 4096)]:
      slots = make(n, k, nslots=3 if n * k > 2e7 else 8)
      x = jax.random.normal(jax.random.key(99), (1, k), jnp.bfloat16)
      args = [(x,) + tuple(s[:5]) for s in slots]
      rec = {"n": n, "k": k}
      for name, (build, step, over) in cases.items():
        lg.build_ptx, lg.step_ptx = build, step
        cfg = dict(lg.default_config(n, k), **over)
        try:
          rec[name] = median_us(
              lambda x, p, a, na, nc, off, cfg=cfg: lg.gemv(
                  x, p, a, na, nc, off, code=CODE, n=n, k=k, **cfg), args)
        except Exception as e:  # pylint: disable=broad-except
          rec[name] = f"ERR {type(e).__name__}: {str(e)[:200]}"
      lg.build_ptx, lg.step_ptx = BUILD, STEP
      print(rec, flush=True)
      out.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
