"""What `measure.time_jax` adds to an op's device time (docs/benchmarks.md,
eighteenth session; run on the GPU).

    python docs/bench/harness_overhead.py time
    ncu --clock-control none --metrics gpu__time_duration.sum \\
        python docs/bench/harness_overhead.py ncu

"time" times a 4 KB `a + 1` (whose kernel takes about 2 us) with 1 and
8 rotating slots, and `F.quantize_4bit` at 2^28 bf16 values with one
slot, each at 1, 4 and 20 rounds per timed call; one JSON line each goes
to $OUT/harness_overhead.jsonl. "ncu" runs one timed call of two rounds
of the quantize op, so Nsight Compute lists every kernel the loop runs
(Nsight Systems, `nsys profile -t cuda --stats=true`, lists the copies
too).

"outputs" (nineteenth session) times `F.quantize_4bit` with and without
double quantization at 2^28 and 14336x4096 values, 20 rounds a call,
returning its whole state or only the arrays it computes (not the code
tables, which are constants), and an op that returns only the 16-value
code table, to $OUT/harness_outputs.jsonl: what returning constants from
the timed op costs per op.

The nineteenth session also timed, 16 rounds a call, 1, 4 and 8 rounds
per loop iteration (`fori_loop(..., unroll=k)` inside `time_jax`, since
removed): quantize with and without double quantization at 2^28 (one
slot), the copy-bandwidth op, a 4 KB `a + 1` over 8 slots and
`matmul_4bit` at M = 1 on 14336x4096 over 6 weights
(`harness_unroll_2026-12-03_h200.jsonl`). Unrolled, each op read 4-6x
faster than its kernel alone (quantize 50 us against 211), which cannot
be if every round ran it: unrolled, the barrier does not keep the
rounds apart (not looked into further), so unrolling cannot shorten the
timer's loop.

"trace" (nineteenth session) runs one timed call of 4 rounds of quantize
with double quantization at 2^28 under `jax.profiler.trace` and writes
every GPU event in time order, with the gap before it, to
$OUT/harness_trace.txt.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb import functional as F
from jaxbnb._src.tools import measure


def quant(x):
  return F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)


def outputs():
  out = open(os.path.join(os.environ.get("OUT", "."),
                          "harness_outputs.jsonl"), "a")
  code = np.asarray(F.get_4bit_type("nf4"), np.float32)
  fns = {
      "state_dq": quant,
      "arrays_dq": lambda x: (lambda p, s: (p, s.absmax, s.nested_absmax,
                                            s.offset))(*quant(x)),
      "state": lambda x: F.quantize_4bit(x, quant_type="nf4"),
      "arrays": lambda x: (lambda p, s: (p, s.absmax))(
          *F.quantize_4bit(x, quant_type="nf4")),
      "code_only": lambda x: jnp.asarray(code),
  }
  for n in (1 << 28, 14336 * 4096):
    x = measure.random_bf16(jax.random.key(0), (n,))
    for name, fn in fns.items():
      us = np.median(measure.time_jax(fn, ((x,),), rounds=20, reps=5,
                                      warmup=1)) * 1e6
      rec = {"n": n, "fn": name, "us": float(us)}
      out.write(json.dumps(rec) + "\n")
      print(rec, flush=True)


def trace():
  """One timed call of 4 rounds of quantize with double quantization at
  2^28 under `jax.profiler.trace`; prints each GPU event in time order
  with the gap before it, to $OUT/harness_trace.txt."""
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  d = os.path.join(os.environ.get("OUT", "."), "trace")
  x = measure.random_bf16(jax.random.key(0), (1 << 28,))
  measure.time_jax(quant, ((x,),), rounds=4, reps=1, warmup=1)
  with jax.profiler.trace(d, create_perfetto_trace=True):
    measure.time_jax(quant, ((x,),), rounds=4, reps=1, warmup=0)
  path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
  doc = json.load(gzip.open(path[0]))
  events = doc["traceEvents"] if isinstance(doc, dict) else doc
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  with open(os.path.join(os.environ.get("OUT", "."),
                         "harness_trace.txt"), "w") as out:
    for pid, pname in sorted(names.items()):
      xs = sorted((e for e in events if e.get("ph") == "X"
                   and e["pid"] == pid), key=lambda e: e["ts"])
      out.write(f"# pid {pid} {pname}: {len(xs)} events\n")
      if "GPU" not in pname and "gpu" not in pname:
        continue
      end = None
      for e in xs:
        gap = "" if end is None else f"{e['ts'] - end:9.2f}"
        out.write(f"{e['ts']:16.2f} {e['dur']:9.2f} gap {gap:>9} "
                  f"tid {e['tid']} {e['name'][:60]}\n")
        end = e["ts"] + e["dur"]


def main():
  what = sys.argv[1] if len(sys.argv) > 1 else "time"
  if what == "trace":
    return trace()
  if what == "outputs":
    return outputs()
  if what == "ncu":
    x = measure.random_bf16(jax.random.key(0), (1 << 28,))
    jax.block_until_ready(x)
    print("timed call", flush=True)
    measure.time_jax(quant, ((x,),), rounds=2, reps=1, warmup=0)
    return
  out = open(os.path.join(os.environ.get("OUT", "."),
                          "harness_overhead.jsonl"), "a")
  small = [(jnp.arange(1024, dtype=jnp.uint32) + i,) for i in range(8)]
  big = [(measure.random_bf16(jax.random.key(0), (1 << 28,)),)]
  for name, fn, slots in (("add_4kb_1slot", lambda a: a + 1, small[:1]),
                          ("add_4kb_8slots", lambda a: a + 1, small),
                          ("quantize_dq_2^28", quant, big)):
    for rounds in (1, 4, 20):
      us = 1e6 * float(np.median(measure.time_jax(fn, slots, rounds=rounds,
                                                  reps=5, warmup=1)))
      rec = dict(what=name, rounds=rounds, slots=len(slots), us=us)
      out.write(json.dumps(rec) + "\n")
      print(rec, flush=True)


if __name__ == "__main__":
  sys.exit(main())
