"""Profile the 8B-shaped decode (random weights): GPU time per step by kernel,
launches per step and how busy the GPU is (docs/benchmarks.md, "the decode
step, kernel by kernel", H200, 2026-12-02). On the GPU machine:

    python docs/bench/decode_profile.py jax-nf4-dq 1 64
    LAYERS=4 python docs/bench/decode_profile.py jax-nf4-dq 1 16
    SPLIT_SUM=reduce LAYERS=4 python docs/bench/decode_profile.py jax-nf4-dq 1 16

The traced `benchmark_decode(reps=1)` runs the decode loop twice (its
warm-up run and the timed one), so the trace holds 2 x STEPS decode steps
and two prefills. As run on 2026-12-02 the script divided by STEPS, so its
printed "per step" times and counts are twice the real ones; `n` below is
now 2 x STEPS. The prefill's kernels (dequantize, cuBLAS) are in the sums.
SPLIT_SUM=reduce (twenty-sixth session) sums the kernels' K-split partials
with `jnp.sum` (an XLA reduction, as before `split_sum.sum_splits`) for an
A/B in one call. SEQUENCE=1 (twenty-eighth session) also prints one decode
step's kernels in launch order, from the middle of the trace: the step
starts after a launch of the kernel that runs once a step and longest
(the lm_head's matmul). NORM=xla (twenty-eighth session) keeps XLA's
RMSNorm at one row instead of the Pallas kernel (`models/norm_kernel.py`).
QKV_LUT=4,2,2 (twenty-ninth session) sends batch 1's q/k/v group to the
table GEMV (`gemv_4bit_lut.gemv_group`) with that many row groups for q, k
and v, whatever `gemv_4bit.lut_serves` says; QKV_LUT=reduce keeps q/k/v
groups with a weight under `LUT_MIN_N` rows on "reduce" (the routing
before that session). SHAPE picks another of `jaxbnb bench decode`'s
shapes (e.g. llama-3.2-3b, llama-3-70b). FUSE=swiglu,norm (thirty-first
session) turns on the table GEMV's build fusions at batch 1, as
`docs/bench/decode_fusions.py` does (`gemv_4bit.SWIGLU_FUSED`,
`NORM_FUSED`; off by default until measured).
"""
import collections, glob, os, sys
import jax
from flax import nnx
from jaxbnb import models
from jaxbnb._src.tools import bench_decode

if os.environ.get("SPLIT_SUM") == "reduce":
  import jax.numpy as jnp
  from pallas_kernels import gemm_4bit_wgmma, gemv_4bit, gemv_4bit_lut, gemv_4bit_tma
  for _mod in (gemm_4bit_wgmma, gemv_4bit, gemv_4bit_lut, gemv_4bit_tma):
    _mod.sum_splits = lambda part: jnp.sum(part, axis=0)

if os.environ.get("NORM") == "xla":  # twenty-eighth session: XLA's RMSNorm
  from jaxbnb._src.models import norm_kernel
  norm_kernel.MAX_ROWS = 0

if os.environ.get("FUSE"):  # thirty-first session
  from pallas_kernels import gemv_4bit
  _fuse = set(os.environ["FUSE"].split(","))
  gemv_4bit.SWIGLU_FUSED = "swiglu" in _fuse
  gemv_4bit.NORM_FUSED = "norm" in _fuse

if os.environ.get("QKV_LUT") == "reduce":  # the routing before s29
  from pallas_kernels import gemv_4bit
  gemv_4bit.LUT_GROUP_MIN_N = gemv_4bit.LUT_MIN_N
elif os.environ.get("QKV_LUT"):  # twenty-ninth session: q/k/v on the table GEMV
  from pallas_kernels import gemv_4bit, gemv_4bit_lut
  _rows = tuple(int(r) for r in os.environ["QKV_LUT"].split(","))
  _group_config = gemv_4bit_lut.group_config
  _lut_serves = gemv_4bit.lut_serves

  def _serves(m, ns, k, *args, **kw):  # every q/k/v group it can take
    three = len(ns) == 3 and min(ns) >= gemv_4bit.LUT_GROUP_MIN_N
    return _lut_serves(m, (gemv_4bit.LUT_MIN_N,) if three else ns, k,
                       *args, **kw)
  gemv_4bit.lut_serves = _serves

  def _qkv_config(ns, k, num_sms=132):
    cfg = _group_config(ns, k, num_sms)
    if len(ns) == 3:
      cfg["rows"] = _rows
    return cfg
  gemv_4bit_lut.group_config = _qkv_config

impl, batch = sys.argv[1], int(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 32
out = f"/tmp/prof_dec_{impl}_{batch}"
shape = dict(bench_decode.SHAPES[os.environ.get("SHAPE", "llama-3-8b")])
if os.environ.get("LAYERS"):  # fewer layers: a shorter compile, same kernels
  shape["num_hidden_layers"] = int(os.environ["LAYERS"])
model = bench_decode.random_model(shape, impl)
jax.block_until_ready(nnx.state(model))
gen = models.Generator(model)
r = gen.benchmark_decode(batch=batch, prompt_len=128, steps=steps, reps=2)
print(f"{impl} batch {batch}: {r['tokens_per_s']:.1f} tok/s, {r['ms_per_step']:.3f} ms/step")
jax.profiler.start_trace(out)
gen.benchmark_decode(batch=batch, prompt_len=128, steps=steps, reps=1)
jax.profiler.stop_trace()
f = sorted(glob.glob(f"{out}/**/*.xplane.pb", recursive=True))[-1]
pd = jax.profiler.ProfileData.from_file(f)
for plane in pd.planes:
  if not plane.name.startswith("/device:GPU"):
    continue
  tot, cnt = collections.Counter(), collections.Counter()
  ivs = []
  for line in plane.lines:
    if "Kernel" not in line.name and "Stream" not in line.name and "stream" not in line.name:
      continue
    for ev in line.events:
      tot[ev.name[:90]] += ev.duration_ns; cnt[ev.name[:90]] += 1
      ivs.append((ev.start_ns, ev.start_ns + ev.duration_ns))
  print(plane.name, [l.name for l in plane.lines][:8])
  # per step: the run has 2 prefills and 2 x `steps` decode steps
  n = 2 * steps
  allsum = sum(tot.values())
  print(f"  sum of kernel time {allsum/1e6:.2f} ms total; per decode step ~{allsum/n/1e3:.1f} us (includes prefills)")
  for name, v in tot.most_common(30):
    print(f"  {v/n/1e3:9.1f} us/step  x{cnt[name]/n:6.1f}/step  {v/cnt[name]/1e3:8.2f} us each  {name}")
  ivs.sort()
  busy, cur_s, cur_e = 0, None, None
  for s, e in ivs:
    if cur_e is None or s > cur_e:
      if cur_e is not None:
        busy += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  if cur_e is not None:
    busy += cur_e - cur_s
  # Gaps between consecutive kernels in the middle of the trace (tenth
  # session): negative when the next launch starts before the previous
  # kernel's recorded end.
  mid = len(ivs) // 2
  gaps = sorted(ivs[i + 1][0] - ivs[i][1] for i in range(max(0, mid - 400),
                                                          min(len(ivs) - 1, mid + 400)))
  if gaps:
    print(f"  gaps between kernels: median {gaps[len(gaps) // 2] / 1e3:.2f} us, "
          f"90th percentile {gaps[9 * len(gaps) // 10] / 1e3:.2f} us")
  if os.environ.get("SEQUENCE"):
    evs = sorted((ev.start_ns, ev.duration_ns, ev.name[:60])
                 for line in plane.lines
                 if "Kernel" in line.name or "tream" in line.name
                 for ev in line.events)
    once = [k for k in tot if cnt[k] == n]
    head = max(once, key=lambda k: tot[k]) if once else None
    marks = [i for i, e in enumerate(evs) if e[2] == (head or "")[:60]]
    if len(marks) > 2:
      a = marks[len(marks) // 2]
      b = next(j for j in marks if j > a)
      print(f"  one decode step, {b - a} launches after {head}:")
      for start, dur, name in evs[a + 1:b + 1]:
        print(f"    {(start - evs[a][0]) / 1e3:8.2f} us  {dur / 1e3:7.2f} us  {name}")
  span = ivs[-1][1] - ivs[0][0] if ivs else 0
  print(f"  launches/step {len(ivs)/n:.0f}; GPU busy {busy/1e6:.2f} ms of a {span/1e6:.2f} ms span ({100*busy/max(span,1):.0f}%)")
