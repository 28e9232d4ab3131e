"""How fast a TMA pipeline streams a 4-bit weight in the table GEMV's
pattern, with no compute (docs/benchmarks.md, twenty-fifth session). On
the GPU:

    python docs/bench/tma_stream_probe.py [a|b]

A weight `[n, k / 2]` uint8 (and its `[n, k / 64]` absmax codes) is read
by a grid of (row groups, K chunks) programs, each bringing its chunk's
tiles of `step_rows` rows through `emit_pipeline_warp_specialized` (two
compute warpgroups that only wait, one TMA warpgroup), as the table GEMV
does with 128-byte rows (`CHUNK` 256 columns). The rows a program's tile
spans (the chunk's bytes a row) decide how the DRAM is read; the probe
times 64, 128, 256 and 512 bytes a row, with and without the codes tile,
on the Llama-3-8B decode shapes, rotating over weights that do not fit in
L2 together. Run b: the weight laid out chunk by chunk (each program's
tiles one run of memory) and two programs an SM. One JSON line per case
to $OUT/tma_stream_probe.jsonl.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

L2 = 60e6
RUN = sys.argv[1] if len(sys.argv) > 1 else "a"  # b: the layouts below


def stream(n, k, width, step_rows, stages, codes, sms=132, per_sm=1,
           contig=False):
  """A jitted f(w, c) -> [chunks, 128] f32 that streams w's tiles;
  `per_sm` times the programs of one wave; `contig`: w laid out chunk by
  chunk (`[chunks * n, width]`, each program's tiles one run of memory)."""
  kb = k // 2
  chunks = kb // width
  groups = max(1, per_sm * sms // chunks)
  tile = 2 * step_rows
  tiles = -(-n // tile)
  steps = -(-tiles // groups)

  def kernel(w_gmem, c_gmem, o_gmem):
    i = jax.lax.axis_index("n")
    s = jax.lax.axis_index("s")

    def body(_, *refs):
      del refs

    def at(t):
      return jnp.minimum(i * steps + t, tiles - 1)

    if contig:
      specs = [pl.BlockSpec((tile, width), lambda t: (s * tiles + at(t), 0))]
    else:
      specs = [pl.BlockSpec((tile, width), lambda t: (at(t), s))]
    ins = [w_gmem]
    if codes:
      specs.append(pl.BlockSpec((tile, 16), lambda t: (at(t), s * width
                                                       // 512)))
      ins.append(c_gmem)
    plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, in_specs=specs,
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages)(*ins)
    del o_gmem

  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((chunks, 128), jnp.float32),
      grid=(groups, chunks), grid_names=("n", "s"), num_threads=3,
      thread_name="wg")
  return jax.jit(call), groups * chunks


def main():
  path = os.path.join(os.environ.get("OUT", "."), "tma_stream_probe.jsonl")
  with open(path, "a") as out:
    for n, k in [(14336, 4096), (4096, 4096), (4096, 14336)]:
      nslots = max(2, int(-(-L2 // (n * k // 2))))
      keys = jax.random.split(jax.random.key(0), nslots)
      slots = [(jax.random.bits(kk, (n, k // 2), jnp.uint8),
                jax.random.bits(kk, (n, k // 64), jnp.uint8)) for kk in keys]
      for width, step_rows, stages, codes, per_sm, contig in [
          (128, 64, 4, True, 1, False), (128, 64, 4, False, 1, False),
          (64, 64, 4, True, 1, False), (256, 64, 4, True, 1, False),
          (256, 64, 2, True, 1, False), (256, 32, 4, True, 1, False),
          (128, 128, 2, True, 1, False), (128, 32, 8, True, 1, False),
          (128, 64, 4, False, 1, True), (256, 64, 4, False, 1, True),
          (128, 32, 2, False, 2, False), (128, 32, 2, False, 2, True),
          (128, 64, 4, False, 2, False)][:None if RUN == "b" else 8]:
        if RUN == "b" and not (contig or per_sm > 1):
          continue
        try:
          f, progs = stream(n, k, width, step_rows, stages, codes,
                            per_sm=per_sm, contig=contig)
          us = median_us(f, [(w.reshape(n, -1, width).transpose(1, 0, 2)
                              .reshape(-1, width), c) for w, c in slots]
                         if contig else slots)
          gbs = (n * k // 2 + (n * k // 64 if codes else 0)) / us / 1e3
          rec = dict(run=RUN, n=n, k=k, width=width, step_rows=step_rows,
                     stages=stages, codes=codes, per_sm=per_sm,
                     contig=contig, programs=progs, us=us, gb_s=gbs)
        except Exception as e:  # pylint: disable=broad-except
          rec = dict(n=n, k=k, width=width, step_rows=step_rows,
                     stages=stages, codes=codes,
                     error=f"{type(e).__name__}: {str(e)[:200]}")
        print(rec, flush=True)
        out.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
