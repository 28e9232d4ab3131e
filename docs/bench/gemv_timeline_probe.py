"""Where a table GEMV launch's fixed cost goes (fifty-third session): each
program of `gemv_4bit_lut` at M = 1 (the package's default config: two
compute warpgroups beside an early-starting TMA warpgroup) writes the
GPU's global timer (`%globaltimer`, ns) and its SM's cycle counter
(`%clock64`) at its phases, and the profiler gives each launch's duration.

The decode profiles (docs/benchmarks.md, fifty-second session) fit a
launch as `t0 + bytes / B` with t0 about 5.7 us; this says which part of a
launch it is: the programs' starts (how the launch spreads them over the
SMs), the table build, the wait for the first tile, the stream, the ends'
spread, and what is outside every program (the launch's own start and
exit).

Stamps a program (thread 0 of the first compute warpgroup unless named):
  0 start, before the table build
  1 after the build's barrier
  2 the first pipeline step's start
  3 the end of thread 0's last step
  4 the end of the second compute warpgroup's last step (thread 128)
  5 the TMA warpgroup past its pipeline (thread 256: its last copy issued)
  6 thread 0 past the pipeline
and the SM's id.

The kernel is `gemv_4bit_lut`'s (`build_ptx`, `step_ptx`, the pipeline of
`pipelines`) with the stamps added; its partials are checked against the
package's kernel. Random NF4 + DQ weights, enough copies of each to pass
the 50 MB L2, called in turn in one jitted function. On the GPU machine:

    python docs/bench/gemv_timeline_probe.py [NxK ...]
    SKIP=0 python docs/bench/gemv_timeline_probe.py ...  # TMA runs build
    COPIES=1 python docs/bench/gemv_timeline_probe.py ...  # one weight,
        # called again and again: its pages mapped, part of it in L2
    ALLOC=1 SKIP=1 python docs/bench/gemv_timeline_probe.py ...  # the
        # pipeline's buffers allocated before the build (see ALLOC)

The kernel follows the package's default config. SKIP=0 or 1 sets the
TMA warpgroup's `tma_skips_build` instead: 0 runs the build's
instructions (stores off) before its first copy, the default before the
fifty-third session (its call 1 ran so), 1 branches past them.

Writes $OUT/gemv_timeline_probe.json (the summaries and one call's raw
stamps a shape) and prints a table.
"""
import glob
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit_lut as lut

from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
SLOTS = 8  # u64 stamps a program: 7 timer stamps and the SM id
STEPS = 64  # step stamps a program (the last holds any later steps)
NAME = "jaxbnb_gemv_lut_stamped"
# ALLOC=1: the pipeline's shared memory and barriers allocated before the
# table's build (`get_allocations`, passed back as `allocations=`), not
# by the pipeline itself: its own scoped allocation starts with a barrier
# of every thread (Mosaic GPU's `run_scoped` lowering, jax 0.11.2), so
# the TMA warpgroup cannot issue a copy until the build is done, whatever
# `early` says.
# Unset: the package's `gemv_4bit_lut.ALLOC_FIRST` (on since the
# fifty-fourth session).
ALLOC = os.environ.get("ALLOC", str(int(lut.ALLOC_FIRST))) == "1"
# STAGES=N: the pipeline's steps in flight instead of the config's.
# LOADSTAMP=1 (fifty-fourth session): thread 0 also stamps the global
# timer once the build's global loads are back (x, the nested code, the
# span's nested absmax), before the table is made: u64 stamp 15 (the
# clock slot of the SM id's); the loads' wait is then no longer hidden
# behind the table's making.
# LOADWAIT=1 (with LOADSTAMP): the TMA warpgroup waits (named barrier 14)
# until every compute thread has its build's global loads back before it
# enters the pipeline, so the first copies do not queue ahead of them.
LOADWAIT = os.environ.get("LOADWAIT") == "1"
LOADSTAMP = os.environ.get("LOADSTAMP") == "1" or LOADWAIT
# LOADS_FIRST=1 or 0: the package's `gemv_4bit_lut.LOADS_FIRST` (the
# compute threads take the build's loads back before storing the table;
# what LOADSTAMP's timer block did in the fifty-fourth session's call 3).
if os.environ.get("LOADS_FIRST") in ("0", "1"):
  lut.LOADS_FIRST = os.environ["LOADS_FIRST"] == "1"
# LOADS_FENCE=1 or 0: `gemv_4bit_lut.LOADS_FENCE` (a fence before the
# table's stores instead of the branch; fifty-fifth session).
if os.environ.get("LOADS_FENCE") in ("0", "1"):
  lut.LOADS_FENCE = os.environ["LOADS_FENCE"] == "1"


def stamp_ptx(slot: int, thread: int, first_step: bool = False) -> str:
  """PTX: thread `thread` writes the global timer to stamp `slot` of its
  program and its SM's clock to `slot + SLOTS` (with `slot == 0` also the
  SM id to stamp 7); with `first_step`, only while its step counter (in
  shared memory at `$0`) is 0. The stamps' global address is the last
  operand."""
  ops = "$1" if first_step else "$0"
  lines = ["{", ".reg .b32 t, p, q, r;", ".reg .b64 g, c, d;",
           ".reg .pred z, y;", "mov.u32 t, %tid.x;",
           f"setp.eq.u32 z, t, {thread};"]
  if first_step:
    lines += ["ld.shared.u32 q, [$0];", "setp.eq.u32 y, q, 0;",
              "and.pred z, z, y;"]
  lines += ["mov.u32 p, %ctaid.x;", "mov.u32 q, %ctaid.y;",
            "mov.u32 r, %nctaid.x;", "mad.lo.u32 p, q, r, p;",
            f"mul.wide.u32 d, p, {16 * SLOTS};",
            f"cvta.to.global.u64 c, {ops};", "add.u64 d, d, c;",
            "mov.u64 g, %globaltimer;", f"@z st.global.u64 [d+{8 * slot}], g;",
            "mov.u64 g, %clock64;",
            f"@z st.global.u64 [d+{8 * (slot + SLOTS)}], g;"]
  if slot == 0:
    lines += ["mov.u32 q, %smid;", "cvt.u64.u32 g, q;",
              f"@z st.global.u64 [d+{8 * 7}], g;"]
  return "\n".join(lines + ["}"])


def loads_stamped(bptx: str, loads: int, operand: int, wgs: int,
                  wait: bool) -> str:
  """`bptx` (`build_ptx`, with `skip`) with thread 0 waiting for the
  build's global loads and writing the global timer to u64 stamp 15 of
  its program before the table is made; the stamps' global address is
  operand `operand`. With `wait`, the compute threads arrive at named
  barrier 14 once their loads are back, and the TMA warpgroup waits
  there past the build."""
  use = " ".join(f"add.f32 e, e, g{3 + j};" for j in range(loads))
  block = "\n".join([
      "{", ".reg .b32 sp, sq, sr;", ".reg .b64 sg, sd, sc;", ".reg .pred sz;",
      "add.f32 e, x0, x1;", "add.f32 e, e, g0;", "add.f32 e, e, g1;", use,
      "setp.eq.u32 sz, t, 0;", "@sz add.f32 e, e, g2;",
      "mov.u32 sp, %ctaid.x;", "mov.u32 sq, %ctaid.y;",
      "mov.u32 sr, %nctaid.x;", "mad.lo.u32 sp, sq, sr, sp;",
      f"mul.wide.u32 sd, sp, {16 * SLOTS};",
      f"cvta.to.global.u64 sc, ${operand};", "add.u64 sd, sd, sc;",
      "setp.eq.f32 sz, e, 0f7F7FFFFF;",  # e used: the loads' wait first
      "setp.eq.or.u32 sz, t, 0, sz;", "@!sz bra LOADS_STAMPED;",
      "mov.u64 sg, %globaltimer;", f"st.global.u64 [sd+{8 * 15}], sg;",
      "LOADS_STAMPED:",
      *([f"bar.arrive 14, {128 * (wgs + 1)};"] if wait else []), "}"])
  at = bptx.index("shl.b32 a, i, 4;")
  bptx = bptx[:at] + block + "\n" + bptx[at:]
  if wait:
    bptx = bptx.replace("LUT_BUILT:", "LUT_BUILT:\n"
                        f"@!pw bar.sync 14, {128 * (wgs + 1)};")
  return bptx


def step_stamp_ptx() -> str:
  """PTX: thread 0 writes the global timer to entry `min(c, STEPS - 1)` of
  its program's step stamps, `c` its step counter (shared memory at
  `$0`) before the step; the step stamps' global address is `$1`."""
  return "\n".join([
      "{", ".reg .b32 t, p, q, r;", ".reg .b64 g, c, d;", ".reg .pred z;",
      "mov.u32 t, %tid.x;", "setp.eq.u32 z, t, 0;",
      "ld.shared.u32 q, [$0];", f"min.u32 q, q, {STEPS - 1};",
      "mov.u32 p, %ctaid.x;", "mov.u32 r, %ctaid.y;",
      "mov.u32 t, %nctaid.x;", "mad.lo.u32 p, r, t, p;",
      f"mad.lo.u32 p, p, {STEPS}, q;", "mul.wide.u32 d, p, 8;",
      "cvta.to.global.u64 c, $1;", "add.u64 d, d, c;",
      "mov.u64 g, %globaltimer;", "@z st.global.u64 [d], g;", "}"])


def stamped(x, weight, n, k):
  """The table GEMV of one weight with stamps: (partials `[chunks,
  n_pad]`, stamps `[programs, 2 SLOTS]` and step stamps `[programs,
  STEPS]`, uint64 as uint32 pairs)."""
  cfg = lut.default_config(n, k)
  rows, step_rows, stages, wgs = ((cfg["rows"],), cfg["step_rows"],
                                  int(os.environ.get("STAGES",
                                                     cfg["stages"])),
                                  cfg["wgs"])
  tile_rows = step_rows * wgs
  chunks = k // lut.CHUNK
  plan, n_pad = lut.row_plan((n,), k, rows, tile_rows)
  (r, steps, _, span, group0, row0), = plan
  packed, codes, nested_absmax, nested_code, offset = weight
  bptx = lut.build_ptx(CODE, x.dtype.name, n, k, steps * tile_rows, span,
                       nested_absmax.shape[0], wgs, cfg["early"], group0,
                       os.environ.get("SKIP", str(int(cfg["tma_skips_build"])))
                       == "1", loads_first=lut.LOADS_FIRST,
                       loads_fence=lut.LOADS_FENCE)
  if LOADSTAMP:
    bptx = loads_stamped(bptx, span // 128, 8, wgs, LOADWAIT)
  sptx = lut.step_ptx(n, k, steps, n_pad, step_rows, wgs, group0, row0)
  last = -(-n // tile_rows) - 1

  def kernel(x_gmem, w_gmem, c_gmem, ns_gmem, nc_gmem, off_gmem, o_gmem,
             st_gmem, ss_gmem, own_smem, c2_smem, sp_smem, cnt_smem):
    i = lax.axis_index("n")
    s = lax.axis_index("s")
    lut.inline_ptx(stamp_ptx(0, 0), (st_gmem,), 0)

    def body(_, w_smem, c_smem):
      lut.inline_ptx(stamp_ptx(2, 0, first_step=True), (cnt_smem, st_gmem),
                     1)
      lut.inline_ptx(step_stamp_ptx(), (cnt_smem, ss_gmem), 1)
      lut.inline_ptx(sptx, (w_smem, c_smem, own_smem, c2_smem, sp_smem,
                            cnt_smem, o_gmem), 6)
      lut.inline_ptx(stamp_ptx(3, 0), (st_gmem,), 0)
      lut.inline_ptx(stamp_ptx(4, 128), (st_gmem,), 0)

    def tile(t):
      return jnp.minimum((i - group0) * steps + t, last)

    specs = [pl.BlockSpec((tile_rows, lut.CHUNK // 2),
                          lambda t: (tile(t), s)),
             pl.BlockSpec((tile_rows, 16), lambda t: (tile(t), s // 4))]
    pipe = plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, in_specs=specs,
        wg_axis="wg", num_compute_wgs=wgs, max_concurrent_steps=stages)

    def build():
      lut.inline_ptx(bptx, (own_smem, c2_smem, sp_smem, cnt_smem, x_gmem,
                            nc_gmem, ns_gmem, off_gmem,
                            *((st_gmem,) if LOADSTAMP else ())), 4,
                     written=4)
      lut.inline_ptx(stamp_ptx(1, 0), (st_gmem,), 0)

    lut.built_then_pipelined(build, pipe, w_gmem, c_gmem, alloc_first=ALLOC)
    lut.inline_ptx(stamp_ptx(5, 128 * wgs), (st_gmem,), 0)
    lut.inline_ptx(stamp_ptx(6, 0), (st_gmem,), 0)

  kernel.__name__ = kernel.__qualname__ = NAME
  programs = r * chunks
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((chunks, n_pad), jnp.float32),
                jax.ShapeDtypeStruct((programs, 4 * SLOTS), jnp.uint32),
                jax.ShapeDtypeStruct((programs, 2 * STEPS), jnp.uint32)),
      grid=(r, chunks), grid_names=("n", "s"), num_threads=wgs + 1,
      thread_name="wg",
      scratch_types=[plgpu.SMEM((256, lut.CHUNK // 2), jnp.float32),
                     plgpu.SMEM((4, 128), jnp.float32),
                     plgpu.SMEM((span // 128, 128), jnp.float32),
                     plgpu.SMEM((wgs, 128), jnp.uint32)])
  return call(x.reshape(-1), packed.reshape(n, k // 2),
              lut.codes_tiles(codes, n, k), nested_absmax, nested_code,
              offset)


# One lowering of the kernel a shape, however many copies call it.
stamped_jit = jax.jit(stamped, static_argnames=("n", "k"))


def weight(key, n, k):
  k1, k2, k3 = jax.random.split(key, 3)
  blocks = n * k // 64
  return (jax.random.bits(k1, (n * k // 2,), jnp.uint8),
          jax.random.bits(k2, (blocks,), jnp.uint8),
          jax.random.uniform(k3, (-(-blocks // 256),), jnp.float32, 0.01,
                             0.02),
          jnp.linspace(-1, 1, 256, dtype=jnp.float32),
          jnp.full((1,), 0.01, jnp.float32))


def u64(st):
  """`[..., 2 SLOTS]` int64 from the uint32 pairs (little-endian)."""
  st = np.asarray(st).astype(np.uint64)
  return (st[..., 0::2] | (st[..., 1::2] << np.uint64(32))).astype(np.int64)


def durations(fn, args):
  """Each launch's duration (us) of the stamped kernel, from a trace of
  `fn(*args)`, and its outputs."""
  out = tempfile.mkdtemp()
  jax.profiler.start_trace(out)
  outs = jax.block_until_ready(fn(*args))
  jax.profiler.stop_trace()
  f = sorted(glob.glob(f"{out}/**/*.xplane.pb", recursive=True))[-1]
  pd = jax.profiler.ProfileData.from_file(f)
  evs = []
  for plane in pd.planes:
    if plane.name.startswith("/device:GPU"):
      evs += [(ev.start_ns, ev.duration_ns) for line in plane.lines
              if "Kernel" in line.name or "tream" in line.name
              for ev in line.events if NAME in ev.name]
  evs.sort()
  return [d / 1e3 for _, d in evs], outs


def summary(stamps, dur_us, n, k):
  """One launch's phases (us) from its programs' stamps `[P, 2 SLOTS]`."""
  gt = stamps[:, :7].astype(np.float64) / 1e3
  ck = stamps[:, SLOTS:SLOTS + 7].astype(np.float64)
  t0 = gt[:, 0].min()
  end = gt[:, [3, 4, 6]].max(1)
  nbytes = n * k // 2 + n * k // 64
  med = lambda v: float(np.median(v))
  return dict(
      duration_us=dur_us,
      span_us=float(end.max() - t0),
      outside_programs_us=dur_us - float(end.max() - t0),
      starts_spread_us=float(gt[:, 0].max() - t0),
      build_us=med(gt[:, 1] - gt[:, 0]),
      build_cycles=med(ck[:, 1] - ck[:, 0]),
      loads_back_us=(med(stamps[:, 15].astype(np.float64) / 1e3 - gt[:, 0])
                     if LOADSTAMP else None),
      first_step_after_build_us=med(gt[:, 2] - gt[:, 1]),
      first_step_after_start_us=med(gt[:, 2] - gt[:, 0]),
      steps_us=med(gt[:, 3] - gt[:, 2]),
      steps_us_min_max=[float((gt[:, 3] - gt[:, 2]).min()),
                        float((gt[:, 3] - gt[:, 2]).max())],
      program_us=med(end - gt[:, 0]),
      program_us_min_max=[float((end - gt[:, 0]).min()),
                          float((end - gt[:, 0]).max())],
      ends_spread_us=float(end.max() - end.min()),
      tma_done_before_end_us=med(end - gt[:, 5]),
      stream_tb_s=nbytes / 1e6 / med(gt[:, 3] - gt[:, 2]),
      whole_tb_s=nbytes / 1e6 / dur_us,
      sms=int(len(set(stamps[:, 7].tolist()))),
      programs=int(len(gt)))


def run(n, k, key):
  size = n * k // 2 + n * k // 64
  copies = max(8, -(-256 * 2 ** 20 // size))
  copies = int(os.environ.get("COPIES", min(copies, 32)))
  ws = [weight(jax.random.fold_in(key, c), n, k) for c in range(copies)]
  x = (jax.random.normal(jax.random.key(7), (1, k), jnp.float32) * 0.5
       ).astype(jnp.bfloat16)

  def calls(x, ws):
    return [stamped_jit(x, w, n=n, k=k) for w in ws]
  fn = jax.jit(calls)
  outs = jax.block_until_ready(fn(x, ws))
  # The stamped kernel's partials against the package's kernel.
  ref = lut.gemv(x, *ws[0], code=CODE, n=n, k=k, **{
      kk: v for kk, v in lut.default_config(n, k).items()})
  got = lut.sum_splits(outs[0][0])[:n]
  err = float(jnp.max(jnp.abs(got - ref[0])))
  durations(fn, (x, ws))  # a first trace: the profiler warmed up
  durs, outs = durations(fn, (x, ws))
  if len(durs) != len(outs):  # the trace named no launch of the kernel
    print(f"  {n}x{k}: {len(durs)} traced launches for {len(outs)} calls")
    durs = [float("nan")] * len(outs)
  stamps = [u64(o[1]) for o in outs]
  sums = [summary(st, d, n, k) for st, d in zip(stamps, durs)]
  keys = sums[0].keys()
  agg = {kk: (float(np.median([s[kk] for s in sums]))
              if not isinstance(sums[0][kk], (list, type(None))) else None)
         for kk in keys}
  # Step starts against the first step's, each program; the median over
  # programs and calls by step (how the stream ramps).
  steps = lut.row_plan((n,), k, (lut.default_config(n, k)["rows"],),
                       128)[0][0][1]
  used = min(steps, STEPS)
  step_t = np.stack([u64(o[2])[:, :used] for o in outs]).astype(np.float64)
  rel = (step_t - step_t[..., :1]) / 1e3
  raw = len(stamps) // 2
  return dict(shape=f"{n}x{k}", copies=copies, max_abs_err=err,
              steps_a_program=steps, durations_us=durs, median=agg,
              per_call=sums,
              step_starts_us_median=np.median(rel.reshape(-1, used),
                                              axis=0).tolist(),
              raw_stamps_one_call=stamps[raw].tolist(),
              raw_step_stamps_one_call=u64(outs[raw][2])[:, :used].tolist())


def main():
  shapes = sys.argv[1:] or ["14336x4096", "4096x4096", "1024x4096",
                            "4096x14336"]
  print(jax.devices()[0].device_kind, jax.__version__)
  results = []
  for i, s in enumerate(shapes):
    n, k = (int(v) for v in s.split("x"))
    res = run(n, k, jax.random.key(i))
    results.append(res)
    m = res["median"]
    print(f"{s}: copies {res['copies']}, err {res['max_abs_err']:.3g}; "
          f"median of calls: duration {m['duration_us']:.2f} us, span "
          f"{m['span_us']:.2f}, outside programs "
          f"{m['outside_programs_us']:.2f}, starts spread "
          f"{m['starts_spread_us']:.2f}, build {m['build_us']:.2f} "
          f"({m['build_cycles']:.0f} cycles"
          + (f", loads back {m['loads_back_us']:.2f}" if LOADSTAMP else "")
          + "), first step after start "
          f"{m['first_step_after_start_us']:.2f}, steps "
          f"{m['steps_us']:.2f}, program {m['program_us']:.2f}, ends "
          f"spread {m['ends_spread_us']:.2f}, TMA done before end "
          f"{m['tma_done_before_end_us']:.2f}, SMs {m['sms']:.0f} of "
          f"{m['programs']:.0f} programs, whole {m['whole_tb_s']:.2f} TB/s")
    print("  step starts after the first (us, median): " + " ".join(
        f"{v:.2f}" for v in res["step_starts_us_median"]))
  path = os.path.join(os.environ.get("OUT", "."), "gemv_timeline_probe.json")
  with open(path, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind,
                   jax=jax.__version__, results=results), f)
  print("wrote", path)


if __name__ == "__main__":
  main()
