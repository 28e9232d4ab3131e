"""The table GEMV (`pallas_kernels.gemv_4bit_lut`) at M = 1 against the
package's path and XLA's bf16 matmul (docs/benchmarks.md, twenty-fourth
session; run on the GPU).

    python docs/bench/gemv_lut_sweep.py 250 a   # time budget (s), run
    python docs/bench/gemv_lut_sweep.py ncu 64 4 2   # for a profiler

NF4 + DQ, bf16. Each configuration (row groups, stages, rows a warpgroup
a step, compute warpgroups) is timed with
`measure.time_jax` over three rotating weights and checked against
`x @ dequantize(W).T`; one JSON line per shape goes to
$OUT/gemv_lut_sweep.jsonl. Row groups None: `default_rows`; "half": half
of it. Run a was the first version (the nested absmax read from global
memory in each step, 64 rows a step); run b the nested span in shared
memory, steps of 128 rows, two compute warpgroups beside a TMA one, and
("early") the TMA warpgroup not waiting for the table. Run c times the
defaults against the "reduce" kernel that was the default before
(`python docs/bench/gemv_lut_sweep.py 150 c`), and the gate/up pair of
the 8B shape in one launch (`gemv_4bit_group`) both ways. Run d
(twenty-fifth session) has the byte offsets by `prmt`; run e (written
then, run in the twenty-sixth session) times `tma_skips_build` against
the default. Run f (forty-first session) has shapes whose k is not a
multiple of 1024 (`python docs/bench/gemv_lut_sweep.py 200 f`).
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import baseline, checked, each_case, make, median_us, record  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit as gk  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit_lut as lg  # pylint: disable=g-import-not-at-top,wrong-import-position

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
LUT = jnp.asarray(codebooks.code_for("nf4"))
RUNS = {
    # a: the first measurement, the Llama-3-8B decode shapes (q/o, k/v,
    # gate/up, down; q/k/v and gate/up as one weight).
    "a": ([(14336, 4096), (4096, 14336), (4096, 4096), (28672, 4096),
           (6144, 4096), (1024, 4096), (11008, 4096)],
          [(None, 4), (None, 2), (None, 8), ("half", 4)]),
    "b": ([(14336, 4096), (4096, 14336), (28672, 4096), (4096, 4096),
           (11008, 4096), (6144, 4096)],
          [(None, 4, 64, 1), (None, 4, 128, 1), (None, 2, 128, 1),
           (None, 4, 64, 2), (None, 3, 64, 2), (None, 2, 128, 2),
           (None, 4, 64, 2, True)]),
    "c": ([(14336, 4096), (4096, 14336), (4096, 4096), (11008, 4096),
           (1024, 4096)], ["reduce"]),
    # d (twenty-fifth session): the byte's table offset made by one prmt
    # (the table's base added in the load); steps of 64 and 128 rows.
    "d": ([(14336, 4096), (4096, 14336), (4096, 4096), (11008, 4096),
           (1024, 4096), (6144, 4096)],
          [(None, 4, 64, 2, True), (None, 2, 128, 2, True),
           (None, 4, 64, 1), ("double", 4, 64, 2, True), "reduce"]),
    # e (not run yet): the TMA warpgroup branching past the table's block
    # (`tma_skips_build`) against the default, alternating.
    "e": ([(4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096),
           (6144, 4096)],
          [(None, 4, 64, 2, True), (None, 4, 64, 2, True, True)] * 2),
    # f (forty-first session): k not a multiple of 1024, the codes' rows
    # padded (`gemv_4bit_lut.codes_tiles`): Llama-2-7B's and 13B's down,
    # Qwen2.5-7B's gate/up, down and q/o, Qwen2.5-1.5B's gate/up and down;
    # the table against "reduce", their default before.
    "f": ([(4096, 11008), (5120, 13824), (18944, 3584), (3584, 18944),
           (3584, 3584), (8960, 1536), (1536, 8960)],
          [(None, 4, 64, 2, True), ("double", 4, 64, 2, True), "reduce"]),
}
GROUPS = {"c": [(14336, 14336)],
          "d": [(14336, 14336), (4096, 1024, 1024)],
          "e": [(14336, 14336)],
          "f": [(18944, 18944), (3584, 512, 512)]}
GROUP_K = {"f": 3584}  # k of a run's groups (4096 where not named)


def group(run, ns, t_end, out):
  """A layer's weights that read one x, in one `gemv_4bit_group` call (run
  c: gate and up of 14336x4096; run d also q/k/v): the table kernel
  (`group_config`) against "reduce" (the default for such groups before)."""
  k = GROUP_K.get(run, 4096)
  made = [make(n, k, nslots=2) for n in ns]
  x = jax.random.normal(jax.random.key(99), (1, k), jnp.bfloat16)
  slots = [tuple((made[g][i][0], made[g][i][1],
                  (made[g][i][2], made[g][i][3], made[g][i][4]))
                 for g in range(len(ns))) for i in range(2)]
  rec = {"run": run, "ns": ns, "k": k, "m": 1}
  for name, skip in (("table", False), ("table, tma_skips_build", True)):
    if time.time() > t_end or (skip and run != "e"):
      continue

    def table(x, ws, skip=skip):
      return lg.gemv_group(x, [(p, a, *nested) for p, a, nested in ws],
                           code=CODE, ns=ns, k=k,
                           **dict(lg.group_config(ns, k),
                                  tma_skips_build=skip))
    rec[name] = median_us(table, [(x, w) for w in slots])
  if time.time() < t_end:
    cfg = gk.default_config(1, sum(ns), k, 64, "bfloat16", mma=True)

    def f(x, ws, cfg=cfg):
      return gk.gemv_4bit_group(x, ws, LUT, ns=ns, k=k, blocksize=64,
                                config=cfg, code=CODE)
    rec["reduce"] = median_us(f, [(x, w) for w in slots])
  print(f"group {ns}x{k} M=1: {rec}", flush=True)
  out.write(json.dumps(rec) + "\n")


def profile(step_rows, stages, wgs):
  """Two calls on 14336x4096 for a profiler (`ncu --launch-skip 1`)."""
  n, k = 14336, 4096
  [(_, _, _, base, x)] = list(each_case([((n, k), 1)], time.time() + 600))
  f = jax.jit(lambda *a: lg.gemv(*a, code=CODE, n=n, k=k,
                                 step_rows=step_rows, stages=stages,
                                 wgs=wgs))
  for _ in range(2):
    f(x, *base[0][:5]).block_until_ready()


def main():
  if sys.argv[1] == "ncu":
    profile(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    return
  budget, run = float(sys.argv[1]), sys.argv[2]
  shapes, cfgs = RUNS[run]
  t_end = time.time() + budget
  path = os.path.join(os.environ.get("OUT", "."), "gemv_lut_sweep.jsonl")
  with open(path, "a") as out:
    for n, k, m, base, x in each_case([(s, 1) for s in shapes], t_end):
      rec, ref, scale = baseline(x, base, run=run, n=n, k=k, m=m)
      res = []
      for cfg in cfgs:
        if time.time() > t_end:
          break
        if cfg == "reduce":  # the earlier default, through gemv_4bit
          old = gk.default_config(1, n, k, 64, "bfloat16", mma=True)

          def f(x, p, a, na, nc, off, old=old):
            return gk.gemv_4bit(x, p, a, LUT, n=n, k=k, blocksize=64,
                                nested=(na, nc, off), config=old, code=CODE)
          res.append(["reduce", *checked(
              f, [(x,) + tuple(s[:5]) for s in base], ref, scale)])
          continue
        rows, stages, *more = cfg
        step_rows, wgs, early, skip = (more + [64, 1, False, False][
            len(more):])[:4]
        r = lg.default_rows(n, k)
        r = {"half": max(1, r // 2), "double": 2 * r}.get(rows, rows or r)

        def f(x, p, a, na, nc, off, r=r, stages=stages, sr=step_rows,
              wgs=wgs, early=early, skip=skip):
          return lg.gemv(x, p, a, na, nc, off, code=CODE, n=n, k=k, rows=r,
                         step_rows=sr, stages=stages, wgs=wgs, early=early,
                         tma_skips_build=skip)
        args = [(x,) + tuple(s[:5]) for s in base]
        res.append([[r, stages, step_rows, wgs, early, skip],
                    *checked(f, args, ref, scale)])
      print(f"{n}x{k} M={m}: xla {rec['xla_bf16']:.1f} package "
            f"{rec['package']:.1f}", flush=True)
      record(out, rec, res, f"  {n}x{k}", top=4)
    for ns in GROUPS.get(run, ()):
      group(run, ns, t_end + 60, out)


if __name__ == "__main__":
  main()
