"""The dequantize kernel's tiles against what the H200 can write
(docs/benchmarks.md, twelfth session; run on the GPU).

    python docs/bench/dequant_sweep.py 200     # budget, s

Above M = 128 a 4-bit matmul is the dequantize kernel and cuBLAS; on
14336x4096 the dequantization moves 29 MB of codes in and 117 MB of bf16
out. This times `pallas_kernels.dequantize_4bit` (NF4 + DQ, bf16) with
`block_rows` quantization blocks a program and `num_warps` warps, next to
three yardsticks: XLA's `a + 1` on 1 GiB of bf16 (the benches' copy
bandwidth until this session), the same on uint32 words (the device's copy
rate), and `broadcast + 1` writing 117 MB of bf16 (on the H200 this came
out at 1.5 TB/s, a trait of XLA's 16-bit broadcast kernel, not a bound).
Each with `measure.time_jax` over three rotating inputs; every kernel
configuration is checked bit for bit against the default's output. One
JSON line goes to $OUT/dequant_sweep.jsonl.
"""
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import make, median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import dequantize_4bit as dk  # pylint: disable=g-import-not-at-top,wrong-import-position

LUT = jnp.asarray(codebooks.code_for("nf4"))
INTERPRET = jax.default_backend() != "gpu"


def main(budget_s, quick=""):
  t_end = time.time() + float(budget_s)
  n, k = (256, 256) if quick else (14336, 4096)
  numel = n * k
  base = make(n, k)
  moved = numel // 2 + numel // 64 + numel * 2
  rec = dict(n=n, k=k, bytes=moved)
  big = 2**20 if quick else 2**29
  bf = [(jnp.full((big,), i, jnp.bfloat16),) for i in range(3)]
  rec["copy_bf16_gbs"] = 4 * big / median_us(lambda a: a + 1, bf) / 1e3
  u32 = [(jnp.full((big // 2,), i, jnp.uint32),) for i in range(3)]
  rec["copy_u32_gbs"] = 4 * big / median_us(lambda a: a + 1, u32) / 1e3
  z = [(jnp.zeros((), jnp.bfloat16) + i,) for i in range(3)]
  rec["write_zeros_gbs"] = 2 * numel / median_us(
      lambda s: jnp.broadcast_to(s, (numel,)) + 1, z) / 1e3

  def deq(p, a, na, nc, off, br, warps):
    return dk.dequantize_4bit(p, a, LUT, numel=numel, blocksize=64,
                              dtype=jnp.bfloat16, nested=(na, nc, off),
                              nested_blocksize=256, block_rows=br,
                              num_warps=warps, interpret=INTERPRET)

  args = [s[:5] for s in base]
  want = np.asarray(jax.jit(lambda *a: deq(*a, None, 4))(*args[0]))
  res = []
  for br, warps in itertools.product((32, 64, 128, 256, 512), (4, 8, 16)):
    if time.time() > t_end:
      break
    f = lambda *a, br=br, w=warps: deq(*a, br, w)  # noqa: E731
    try:
      got = np.asarray(jax.jit(f)(*args[0]))
      same = bool(np.array_equal(got.view(np.uint16), want.view(np.uint16)))
      us = median_us(f, args)
      res.append((br, warps, us, moved / us / 1e3, same))
    except Exception as e:  # pylint: disable=broad-except
      res.append((br, warps, f"ERR {type(e).__name__}: {str(e)[:200]}"))
    print(res[-1], flush=True)
  rec["all"] = res
  with open(os.path.join(os.environ.get("OUT", "/tmp"),
                         "dequant_sweep.jsonl"), "w") as out:
    out.write(json.dumps(rec) + "\n")
  print({k_: v for k_, v in rec.items() if k_ != "all"}, flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
