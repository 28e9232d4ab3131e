"""Dequantize + dot in row chunks: the bf16 weight through L2, and the
next chunk's dequantization on a second CUDA stream (docs/benchmarks.md,
twelfth session; run on the GPU).

    XLA_FLAGS=--xla_gpu_experimental_stream_annotation=true \
        python docs/bench/dequant_chunk_sweep.py 280    # budget, s
    python docs/bench/dequant_chunk_sweep.py 60 quick  # CPU smoke test

M above `GEMV_MAX_M` is served by the dequantize kernel writing the whole
bf16 weight (2 bytes an element to HBM) and XLA's dot reading it back.
Here the weight's rows are cut into `c` chunks, each dequantized into a
chunk-sized buffer (which fits in the H200's 50 MB L2) and multiplied at
once, the outputs put side by side:

* "map": `lax.map` over the chunks (one buffer, reused each step), then a
  transpose of the stacked outputs;
* "unroll": a Python loop and `jnp.concatenate`;
* "stream": as "unroll", each dequantization under
  `compute_on("gpu_stream:1")`, so that XLA may run chunk i + 1's
  dequantization beside chunk i's dot.

Each is timed with `measure.time_jax` over three rotating weights next to
`F.matmul_4bit` (today's path) and XLA's bf16 matmul, and compared with
`x @ dequantize(W).T`. NF4 + DQ, bf16. One JSON line per (shape, M) goes to
$OUT/dequant_chunk.jsonl.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import baseline, checked, each_case, record  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb._src.quant import codebooks  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import dequantize_4bit as dk  # pylint: disable=g-import-not-at-top,wrong-import-position

LUT = jnp.asarray(codebooks.code_for("nf4"))
INTERPRET = jax.default_backend() != "gpu"
CASES = [((14336, 4096), 256), ((4096, 14336), 256), ((4096, 4096), 256),
         ((14336, 4096), 4096), ((4096, 4096), 4096), ((14336, 4096), 128)]
CHUNKS = (2, 4, 8, 16)


def on_stream(f):
  """`f` under compute_on("gpu_stream:1") (jax 0.11.2 has no public name
  for the device memory space)."""
  from jax.experimental.compute_on import compute_on  # pylint: disable=g-import-not-at-top
  from jax._src import core  # pylint: disable=g-import-not-at-top
  return compute_on(f, compute_type="gpu_stream:1",
                    out_memory_spaces=core.MemorySpace.Device)


def dequant_rows(packed, codes, nested_absmax, code2, offset, k):
  """bf16 [rows, k] of a row chunk's flat packed bytes and absmax codes."""
  numel = packed.shape[0] * 2
  w = dk.dequantize_4bit(packed, codes, LUT, numel=numel, blocksize=64,
                         dtype=jnp.bfloat16,
                         nested=(nested_absmax, code2, offset),
                         nested_blocksize=256, interpret=INTERPRET)
  return w.reshape(numel // k, k)


def chunked(kind, c, n, k):
  """x @ W.T with W's rows in `c` chunks (see the module docstring)."""
  rows = n // c
  per_nested = rows * k // 64 // 256

  def f(x, packed, codes, nested_absmax, code2, offset):
    p = packed.reshape(c, rows * k // 2)
    a = codes.reshape(c, rows * k // 64)
    na = nested_absmax.reshape(c, per_nested)
    if kind == "map":
      ys = lax.map(lambda t: x @ dequant_rows(*t[:3], code2, offset, k).T,
                   (p, a, na))
      return ys.transpose(1, 0, 2).reshape(x.shape[0], n)
    deq = lambda *t: dequant_rows(*t, k)  # noqa: E731
    if kind == "stream":
      deq = on_stream(deq)
    ys = [x @ deq(p[i], a[i], na[i], code2, offset).T for i in range(c)]
    return jnp.concatenate(ys, axis=1)
  return f


def main(budget_s, quick=""):
  out = open(os.path.join(os.environ.get("OUT", "/tmp"),
                          "dequant_chunk.jsonl"), "w")
  t_end = time.time() + float(budget_s)
  for n, k, m, base, x in each_case([((1024, 256), 8)] if quick else CASES,
                                    t_end):
    rec, ref, scale = baseline(x, base, n=n, k=k, m=m)
    args = [(x,) + s[:5] for s in base]
    res = []
    for kind in ("map", "unroll", "stream"):
      for c in CHUNKS:
        if time.time() > t_end:
          break
        res.append((f"{kind}{c}",) + checked(chunked(kind, c, n, k), args,
                                              ref, scale))
    record(out, rec, res, f"N={n} K={k} M={m}: bf16 {rec['xla_bf16']:.1f} "
           f"package {rec['package']:.1f}", top=6)


if __name__ == "__main__":
  main(*sys.argv[1:])
