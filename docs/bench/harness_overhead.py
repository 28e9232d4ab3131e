"""What `measure.time_jax` adds to an op's device time (docs/benchmarks.md,
eighteenth session; run on the GPU).

    python docs/bench/harness_overhead.py time
    ncu --clock-control none --metrics gpu__time_duration.sum \\
        python docs/bench/harness_overhead.py ncu

"time" times a 4 KB `a + 1` (whose kernel takes about 2 us) with 1 and
8 rotating slots, and `F.quantize_4bit` at 2^28 bf16 values with one
slot, each at 1, 4 and 20 rounds per timed call; one JSON line each goes
to $OUT/harness_overhead.jsonl. "ncu" runs one timed call of two rounds
of the quantize op, so Nsight Compute lists every kernel the loop runs.
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


def main():
  what = sys.argv[1] if len(sys.argv) > 1 else "time"
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
