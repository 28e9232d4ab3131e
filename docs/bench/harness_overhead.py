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

"unroll" (nineteenth session) times, 16 rounds a call, with 1, 4 and 8
rounds per loop iteration (`time_jax`'s `unroll`): quantize with and
without double quantization at 2^28 (one slot), the copy-bandwidth op
(`a + 1` over 1 GiB of uint32), a 4 KB `a + 1` over 8 slots, and
`matmul_4bit` at M = 1 on 14336x4096 NF4 + DQ over 6 weights, to
$OUT/harness_unroll.jsonl.
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


def unroll():
  out = open(os.path.join(os.environ.get("OUT", "."),
                          "harness_unroll.jsonl"), "a")
  x = measure.random_bf16(jax.random.key(0), (1 << 28,))
  words = jax.random.bits(jax.random.key(1), (1 << 28,), jnp.uint32)
  small = [(jnp.arange(1024, dtype=jnp.uint32) + i,) for i in range(8)]
  w = [F.quantize_4bit(measure.random_bf16(jax.random.key(10 + i),
                                           (14336, 4096), 1 / 64),
                       quant_type="nf4", compress_statistics=True)
       for i in range(6)]
  v = measure.random_bf16(jax.random.key(2), (1, 4096))
  cases = {
      "quantize_dq_2^28": (quant, ((x,),)),
      "quantize_2^28": (lambda a: F.quantize_4bit(a, quant_type="nf4"),
                        ((x,),)),
      "copy_1GiB": (lambda a: a + jnp.uint32(1), ((words,),)),
      "add_4KB_x8": (lambda a: a + jnp.uint32(1), small),
      "matmul_m1_14336x4096_x6": (lambda a, p, s: F.matmul_4bit(a, p, s),
                                  tuple((v, p, s) for p, s in w)),
  }
  for name, (fn, slots) in cases.items():
    for k in (1, 4, 8):
      us = np.median(measure.time_jax(fn, slots, rounds=16, reps=5,
                                      warmup=1, unroll=k)) * 1e6
      rec = {"case": name, "unroll": k, "us": float(us)}
      out.write(json.dumps(rec) + "\n")
      print(rec, flush=True)


def main():
  what = sys.argv[1] if len(sys.argv) > 1 else "time"
  if what == "outputs":
    return outputs()
  if what == "unroll":
    return unroll()
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
