"""The 4-bit quantize kernel with its tables in shared memory (`smem=True`)
against the package's global-memory lookups (docs/benchmarks.md,
twentieth session; run on the GPU).

    python docs/bench/quantize_smem.py ab    # tiles, both ways, 2 rounds
    ncu --clock-control none -k regex:jaxbnb_quantize \\
        --metrics gpu__time_duration.sum,smsp__inst_executed.sum \\
        python docs/bench/quantize_smem.py ncu

"ab" times, at each size (bf16, NF4, blocksize 64), the kernel without
and with `smem` in several tiles (blocks a program, warps), 30 rounds a
call over two rotating inputs, each output checked byte for byte against
the default's, then `F.quantize_4bit` with double quantization, its
kernel without and with `smem` (the same bytes), to
$OUT/quantize_smem.jsonl. "ncu" runs the `NCU` variants once per size
after a warm-up, so Nsight Compute times each and counts its
instructions.

Runs a and b (`quantize_smem_2026-12-03_h200_{a,b}.jsonl`) came from
this script at commit 4ef622e, where `smem` was an option with a 64 x 8
default tile and a `swizzle` variant (each negative value's bucket entry
at `i ^ 64`, so that a value and its negation read different banks: two
more instructions a value; measured slower and removed). Run c
(`quantize_smem_2026-12-03_h200_c_x4.jsonl`) is `quantize_sweep.py ab`
with `QK_OLD` naming a copy of `quantize_4bit.py` whose bucket entries
hold the count times 4 (the threshold's shared address without a LEA;
"old" in the file): 0.7-2.5% slower than the package ("new"), not kept.
"""
import functools
import os
import sys

import jax

from jaxbnb import functional as F
from jaxbnb._src.quant import kernels
from jaxbnb._src.tools import measure
from pallas_kernels import quantize_4bit as qk

sys.path.insert(0, os.path.dirname(__file__))
from quantize_sweep import SIZES, _emit, _inputs, _out, _quantize, _same, median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

# (name, smem, blocks a program, warps); None: the default tile (64 x 8
# from global memory; 128 x 16 with smem since run c).
VARIANTS = [("global", False, None, None), ("global128x16", False, 128, 16),
            ("smem", True, None, None), ("smem64x8", True, 64, 8),
            ("smem128x32", True, 128, 32), ("smem64x16", True, 64, 16)]
NCU = ("global", "smem")


def ab():
  out = _out("quantize_smem.jsonl")
  print("device", jax.devices()[0].device_kind, flush=True)
  for n in SIZES:
    xs = _inputs(n)
    want = jax.device_get(_quantize(smem=False)(*xs[0]))
    floor_bytes = 2 * n + n // 2 + 4 * (n // 64)
    for rnd in range(2):
      for name, smem, br, w in VARIANTS:
        f = _quantize(br, w, smem)
        _emit(out, what="kernel", how=name, n=n, round=rnd, smem=smem,
              block_rows=br, warps=w,
              same=_same(jax.device_get(f(*xs[0])), want),
              us=median_us(f, xs, rounds=30), floor_bytes=floor_bytes)
    pkg = {}
    for smem in (False, True):
      orig = qk.quantize_4bit
      kernels.qk.quantize_4bit = functools.partial(orig, smem=smem)
      try:
        f = jax.jit(lambda x: F.quantize_4bit(x, quant_type="nf4",
                                              compress_statistics=True))
        pkg[smem] = jax.device_get(f(*xs[0]))
        for rnd in range(2):
          _emit(out, what="package_dq", n=n, round=rnd, smem=smem,
                same=_same(pkg[smem], pkg[False]), us=median_us(f, xs))
      finally:
        kernels.qk.quantize_4bit = orig
    del xs


def ncu():
  for n in SIZES:
    x = measure.random_bf16(jax.random.key(1), (n,))
    for name, smem, br, w in VARIANTS:
      if name in NCU:
        f = _quantize(br, w, smem)
        print("ncu", n, name, flush=True)  # then its two launches
        jax.block_until_ready(f(x))
        jax.block_until_ready(f(x))


if __name__ == "__main__":
  sys.exit({"ab": ab, "ncu": ncu}[sys.argv[1] if len(sys.argv) > 1
                                   else "ab"]())
