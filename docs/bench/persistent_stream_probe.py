"""What one launch over several GEMVs' weights could save against a launch
each (docs/benchmarks.md, thirty-eighth session). On the GPU:

    python docs/bench/persistent_stream_probe.py

The lever left for issue 14's decode target is a persistent kernel that
runs a layer's GEMVs in one launch, with a grid-wide barrier where one
GEMV needs the last one's output, so that the TMA warpgroup streams the
next weight's first tiles while the compute waits. This probe measures
the weight stream alone, in the table GEMV's pattern (the
`tma_stream_probe.py` pipeline: a `[rows, 2048]` uint8 weight and its
`[rows, 64]` codes, 128-byte rows of 2 x 64-row tiles, 4 stages, one
wave of 8 row groups x 16 K chunks, compute warpgroups that only wait),
over a chain of phases:

* "launches": one launch a phase;
* "one": one launch whose pipeline runs every phase's tiles in turn, no
  barrier (the upper bound of what one launch saves);
* "barrier": the same with a grid barrier before each later phase's first
  step: every compute warp adds 1 to a global counter
  (`atom.acq_rel.gpu`) and spins (`ld.acquire.gpu`, `nanosleep`) until
  all warps of the phase have arrived. The counter only grows: a warp's
  target is the next multiple of the arrivals above the count it found,
  so no call has to reset it;
* "seq": one launch that runs a pipeline a phase in turn, each over its
  own weight, with the grid barrier (the compute warps) between them:
  what the simpler build would get, which saves the launches but starts
  every phase's stream afresh;
* "pp": the same pipelines as a pipeline of pipelines (Mosaic GPU's
  `pipeline_state` START / STEADY / STOP over one shared allocation), so
  that the TMA warpgroup goes on into the next phase's tiles as the
  compute frees its slots; each phase's steps are rounded up to a
  multiple of the stages (the extra steps re-read the phase's last
  tile).

Phases, in rows of 2,048 bytes (a 4096-column NF4 weight's rows): the
MLP (gate/up 28,672 rows, then down's 29.4 MB as 14,336 rows) and a whole
layer (q/k/v 6,144, o 4,096, gate/up, down). Weights rotate past L2
(`measure.time_jax`, the difference of a long and a short call). One
JSON line per case to $OUT/persistent_stream_probe.jsonl.

Measured on an H100 (docs/benchmarks.md, thirty-eighth session): one
launch with no barrier saved nothing on the MLP and 2.5-2.9 us on a
layer; every mode with the barrier was 2-6 us slower than a launch a
phase. The persistent kernel was not built.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import median_us  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemv_4bit_lut as lg  # pylint: disable=g-import-not-at-top,wrong-import-position

L2 = 60e6
WIDTH = 128  # bytes a tile row (256 columns)
KB = 2048  # bytes a weight row
TILE = 128  # rows a tile (2 x 64)
CHUNKS = KB // WIDTH
GROUPS = 8
WARPS = 8  # compute warps a program (2 warpgroups)
CHAINS = {"mlp": (28672, 14336), "layer": (6144, 4096, 28672, 14336)}


SPINS = 1 << 20  # a warp gives up after this many polls (a hang guard)


def barrier_ptx(arrivals: int) -> str:
  """A grid barrier for `arrivals` warps on the u32 counter at `$0`; a
  warp that polls `SPINS` times in vain adds 1 to the word after it (so a
  barrier that never fills shows in the record instead of hanging)."""
  return "\n".join([
      "{", ".reg .b32 l, c, t, v, n;", ".reg .pred f, w;", ".reg .b64 g;",
      "cvta.to.global.u64 g, $0;", "mov.u32 l, %laneid;",
      "setp.eq.u32 f, l, 0;", "mov.u32 c, 0;", "mov.u32 n, 0;",
      "@f atom.acq_rel.gpu.global.add.u32 c, [g], 1;",
      "shfl.sync.idx.b32 c, c, 0, 31, -1;",
      f"div.u32 t, c, {arrivals};", "add.u32 t, t, 1;",
      f"mul.lo.u32 t, t, {arrivals};",
      "SPIN:", "ld.acquire.gpu.global.u32 v, [g];",
      "add.u32 n, n, 1;", "setp.lt.u32 w, v, t;",
      f"@w setp.lt.u32 w, n, {SPINS};",
      "@w nanosleep.u32 32;", "@w bra SPIN;",
      "setp.lt.u32 w, v, t;", "and.pred w, w, f;",
      "@w red.relaxed.gpu.global.add.u32 [g+4], 1;", "}"])


def stream(phases, barrier: bool, stages: int = 4):
  """The kernel f(w, c, counter) that streams the tiles of `phases` (rows a
  phase, laid one after another in `w`) in one launch."""
  tiles = [-(-r // TILE) for r in phases]
  steps = [-(-t // GROUPS) for t in tiles]
  first_tile = np.cumsum([0] + tiles[:-1]).tolist()
  first_step = np.cumsum([0] + steps[:-1]).tolist()
  total = sum(steps)
  ptx = barrier_ptx(GROUPS * CHUNKS * WARPS)

  def kernel(w_gmem, c_gmem, ctr_gmem, o_gmem):
    i = jax.lax.axis_index("n")
    s = jax.lax.axis_index("s")

    def at(t):
      tile = 0
      for p in range(len(phases)):  # the phase of step t
        here = (t >= first_step[p]) & (t < first_step[p] + steps[p])
        local = jnp.minimum(i * steps[p] + t - first_step[p], tiles[p] - 1)
        tile = jnp.where(here, first_tile[p] + local, tile)
      return tile

    def body(idx, *refs):
      del refs
      if barrier and len(phases) > 1:
        t = idx[0]
        starts = t == first_step[1]
        for p in range(2, len(phases)):
          starts = starts | (t == first_step[p])

        @pl.when(starts)
        def _():
          lg.inline_ptx(ptx, (ctr_gmem,), 0)

    specs = [pl.BlockSpec((TILE, WIDTH), lambda t: (at(t), s)),
             pl.BlockSpec((TILE, 16), lambda t: (at(t), s * WIDTH // 512))]
    plgpu.emit_pipeline_warp_specialized(
        body, grid=(total,), memory_registers=40, in_specs=specs,
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages)(
            w_gmem, c_gmem)
    del o_gmem

  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((CHUNKS, 128), jnp.float32),
      grid=(GROUPS, CHUNKS), grid_names=("n", "s"), num_threads=3,
      thread_name="wg")
  return call


def sequential(phases, stages: int = 4, chained: bool = False):
  """f(*ws, *cs, counter): one launch, a pipeline a phase in turn, the
  compute warps' grid barrier between them; `chained`: a pipeline of
  pipelines over one allocation."""
  n = len(phases)
  tiles = [-(-r // TILE) for r in phases]
  steps = [-(-t // GROUPS) for t in tiles]
  if chained:
    steps = [-(-st // stages) * stages for st in steps]
  state = plgpu.PipelinePipeline
  ptx = barrier_ptx(GROUPS * CHUNKS * WARPS)

  def kernel(*refs):
    ws, cs, ctr_gmem = refs[:n], refs[n:2 * n], refs[2 * n]
    i = jax.lax.axis_index("n")
    s = jax.lax.axis_index("s")

    def body(idx, *refs):
      del idx, refs

    def pipe(p):
      def at(t):
        return jnp.minimum(i * steps[p] + t, tiles[p] - 1)

      specs = [pl.BlockSpec((TILE, WIDTH), lambda t: (at(t), s)),
               pl.BlockSpec((TILE, 16), lambda t: (at(t), s * WIDTH // 512))]
      kw = {}
      if chained:
        kw["pipeline_state"] = (state.START if p == 0 else
                                state.STOP if p == n - 1 else state.STEADY)
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(steps[p],), memory_registers=40, in_specs=specs,
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages, **kw)

    def run(allocations=None):
      for p in range(n):
        if p:  # the compute warpgroups wait; the TMA one goes on loading

          @pl.when(jax.lax.axis_index("wg") < 2)
          def _():
            lg.inline_ptx(ptx, (ctr_gmem,), 0)

        if allocations is None:
          pipe(p)(ws[p], cs[p])
        else:
          pipe(p)(ws[p], cs[p], allocations=allocations)

    if chained:
      pl.run_scoped(lambda **allocs: run(allocs),
                    **pipe(0).get_allocations(ws[0], cs[0]),
                    collective_axes="wg")
    else:
      run()

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((CHUNKS, 128), jnp.float32),
      grid=(GROUPS, CHUNKS), grid_names=("n", "s"), num_threads=3,
      thread_name="wg")


def launches(phases):
  """f(*ws, *cs, counter): one `stream` launch a phase."""
  calls = [stream((r,), False) for r in phases]

  def f(*args):
    n = len(phases)
    ws, cs, ctr = args[:n], args[n:2 * n], args[-1]
    return [call(w, c, ctr) for call, w, c in zip(calls, ws, cs)]
  return f


def main():
  path = os.path.join(os.environ.get("OUT", "."),
                      "persistent_stream_probe.jsonl")
  ctr = jnp.zeros((2,), jnp.uint32)
  cases = []
  for name, phases in CHAINS.items():
    rows = sum(phases)
    nbytes = rows * (KB + KB // 32)
    nslots = max(2, int(-(-L2 // nbytes)) + 1)
    keys = jax.random.split(jax.random.key(len(cases)), nslots)
    whole = [(jax.random.bits(k, (rows, KB), jnp.uint8),
              jax.random.bits(k, (rows, KB // 32), jnp.uint8))
             for k in keys]
    cuts = np.cumsum([0] + list(phases)).tolist()
    parts = [tuple(w[a:b] for a, b in zip(cuts, cuts[1:]))
             + tuple(c[a:b] for a, b in zip(cuts, cuts[1:]))
             for w, c in whole]
    meta = dict(chain=name, phases=list(phases), mb=nbytes / 1e6)
    cases += [(meta, "launches", launches(phases),
               [p + (ctr,) for p in parts]),
              (meta, "one", stream(phases, False),
               [(w, c, ctr) for w, c in whole]),
              (meta, "barrier", stream(phases, True),
               [(w, c, ctr) for w, c in whole]),
              (meta, "seq", sequential(phases), [p + (ctr,) for p in parts]),
              (meta, "pp", sequential(phases, chained=True),
               [p + (ctr,) for p in parts])]
  # "seq" and "pp" last: several pipelines in one program are the cases
  # least tried.
  cases.sort(key=lambda c: c[1] in ("seq", "pp"))
  with open(path, "a") as out:
    for meta, mode, f, slots in cases:
      for rep in range(2):
        try:
          us = median_us(f, slots)
          rec = dict(meta, mode=mode, rep=rep, us=us,
                     gb_s=meta["mb"] / us * 1e3)
        except Exception as e:  # pylint: disable=broad-except
          rec = dict(meta, mode=mode, rep=rep,
                     error=f"{type(e).__name__}: {str(e)[:300]}")
        print(rec, flush=True)
        out.write(json.dumps(rec) + "\n")
      out.write(json.dumps(dict(after=mode, counter=int(ctr[0]),
                                gave_up=int(ctr[1]))) + "\n")
      out.flush()


if __name__ == "__main__":
  main()
