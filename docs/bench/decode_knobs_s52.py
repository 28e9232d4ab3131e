"""The fifty-second session's decode knobs (docs/benchmarks.md), set before
`docs/bench/decode_profile.py` or the CLI runs. On the GPU machine:

    KCHUNKS=GU LAYERS=4 python docs/bench/decode_knobs_s52.py profile jax-nf4-dq 8 32
    KCHUNKS=1 python docs/bench/decode_knobs_s52.py cli bench decode --impl jax-nf4-dq --batch 8

KCHUNKS: the TMA warp GEMV's K chunks a program, "1", "2", "A" (2 where
k <= 4096) or "GU" (2 for a launch of two weights at k <= 4096, the
gate/up pair; what `gemv_4bit_warp_tma.PAIR_KCHUNKS` now does at k =
4096); unset: the package's default. ATTN_SPLIT: the decode attention's
cache splits (unset: the kernel's rule). PART_HINT=last: the TMA warp
GEMV's partials stored with an L2 `evict_last` policy (a PTX rewrite).
ALLOC_FIRST=1 or 0 (fifty-third session; on by default since the
fifty-fourth): `gemv_4bit_lut.ALLOC_FIRST`, the table and TMA warp GEMVs'
pipeline buffers allocated before their builds, so the first copies need
not wait for them. LOADS_FIRST=1 or 0 (fifty-fourth session; in call 3
of that session it instead held the TMA warpgroup until then):
`gemv_4bit_lut.LOADS_FIRST`, the table GEMV's compute threads taking the
build's global loads back before they store the table; on by default in
builds of x as given since the fifty-fifth session, which LOADS_FIRST=1
keeps. LOADS_FIRST=plain, norm, swiglu or all: only in builds of that
kind (x as given, RMSNorm'd, silu(gate) * up), or in every build.
LOADS_FENCE=1 or 0 (fifty-fifth session): `gemv_4bit_lut.LOADS_FENCE`,
those builds' loads taken back by a fence instead of a branch. WT_EARLY=1 or 0
(fifty-fourth session): the TMA warp GEMV's TMA warpgroup past its build
(the compute threads meet at a named barrier) for every launch or none,
`gemv_4bit_warp_tma.EARLY_MAX_M` set to 16 or 0 (since the fifty-fifth
session 8 by default; 0 sets `EARLY_SMALL_ELEMENTS`, the fifty-eighth
session's bound for small weights up to 16 rows, to 0 as well);
WT_EARLY=N above 1 sets it to N. WT_SMALL=N (fifty-ninth session) sets
`EARLY_SMALL_ELEMENTS` to N (1024 x 4096 = 4194304 until then, 3072 x 4096
since). ATTN_BLOCK=N and ATTN_WARPS=N (sixtieth session): the decode
attention's cache slots a step (`block_s`; default 64 up to 512 slots)
and Triton warps a program (default 4); with ATTN_SPLIT=1 and
ATTN_BLOCK=256, one program a key/value head takes a 256-slot cache in
one step and writes the normalized output (no combine after it).
ATTN_STAGES=N: its Triton pipeline stages (default 1), so that a program
walking several blocks of the cache can have the next one's loads in
flight. RESIDUAL=1 or 0 (sixtieth session):
`gemv_4bit_lut.RESIDUAL_KERNEL`, the decoder layer's residual add made
with the down projection's partials' sum in one Pallas kernel
(`split_sum.add_splits`) at batch 1, or by XLA's fusion. QKV_PARTIALS=N
(fifty-sixth session, measured slower in the fifty-seventh, its code taken
out in the fifty-eighth; at commit 0168530 it set
`models.decode_kernel.QKV_PARTIALS_MAX_B`). SUM_REDUCE=N (fifty-sixth
session): the table and TMA warp GEMVs' partials of N or more K splits
summed by XLA's reduction (`jnp.sum`) instead of `sum_splits`' adds (the
down projection's 56 at K = 14336: an XLA kernel of 3.1 us at batch 1
on the H100, fifty-second session).
"""
import os, sys
from pallas_kernels import gemv_4bit_warp_tma as wt, decode_attention as da
from pallas_kernels import gemv_4bit_lut
_orig = wt.default_config
def default_config(ns, k, num_sms=None, kchunks=None, decode=None):
  if kchunks is None and os.environ.get("KCHUNKS"):
    rule = os.environ["KCHUNKS"]
    if rule == "A":
      kchunks = 2 if k <= 4096 else 1
    elif rule == "GU":
      kchunks = 2 if (k <= 4096 and len(ns) == 2) else 1
    else:
      kchunks = int(rule)
  return _orig(ns, k, num_sms, kchunks=kchunks, decode=decode)
wt.default_config = default_config
for env, module, name in (("ALLOC_FIRST", gemv_4bit_lut, "ALLOC_FIRST"),
                          ("LOADS_FIRST", gemv_4bit_lut, "LOADS_FIRST"),
                          ("LOADS_FENCE", gemv_4bit_lut, "LOADS_FENCE")):
  if os.environ.get(env) in ("0", "1"):
    setattr(module, name, os.environ[env] == "1")
if os.environ.get("LOADS_FIRST") in ("plain", "norm", "swiglu", "all"):
  # loads first only in the table GEMV's builds of that kind: x as given
  # (o), RMSNorm'd in the build (q/k/v, gate/up), silu(gate) * up (down)
  import inspect
  _build = gemv_4bit_lut.build_ptx
  _params = inspect.signature(_build)
  def build_ptx(*a, **kw):
    args = _params.bind(*a, **kw).arguments
    kind = ("swiglu" if args.get("swiglu") is not None else
            "norm" if args.get("norm") is not None else "plain")
    args["loads_first"] = os.environ["LOADS_FIRST"] in (kind, "all")
    return _build(**args)
  gemv_4bit_lut.build_ptx = build_ptx
if os.environ.get("QKV_PARTIALS"):
  sys.exit("QKV_PARTIALS: the q/k/v partials hand-off was taken out "
           "(fifty-eighth session); run commit 0168530 to measure it")
if int(os.environ.get("SUM_REDUCE", "0")) > 0:
  _min_splits = int(os.environ["SUM_REDUCE"])
  _sum_splits = gemv_4bit_lut.sum_splits
  def sum_splits(part):
    if part.shape[0] >= _min_splits:
      return part.sum(0)
    return _sum_splits(part)
  gemv_4bit_lut.sum_splits = wt.sum_splits = sum_splits
if os.environ.get("RESIDUAL") in ("0", "1"):  # sixtieth session
  gemv_4bit_lut.RESIDUAL_KERNEL = os.environ["RESIDUAL"] == "1"
if os.environ.get("WT_EARLY"):
  _early = int(os.environ["WT_EARLY"])
  wt.EARLY_MAX_M = wt.MAX_M if _early == 1 else _early
  if _early == 0:  # none: small weights past EARLY_MAX_M as well
    wt.EARLY_SMALL_ELEMENTS = 0
if os.environ.get("WT_SMALL"):
  wt.EARLY_SMALL_ELEMENTS = int(os.environ["WT_SMALL"])
if os.environ.get("ATTN_SPLIT"):
  _s = da._splits
  da._splits = lambda b, h, s, bs, split=None, num_sms=None: _s(
      b, h, s, bs, int(os.environ["ATTN_SPLIT"]), num_sms)
if os.environ.get("ATTN_BLOCK") or os.environ.get("ATTN_WARPS"):
  _attn = da.decode_attention
  def decode_attention(*a, **kw):
    if os.environ.get("ATTN_BLOCK"):
      kw["block_s"] = int(os.environ["ATTN_BLOCK"])
    if os.environ.get("ATTN_WARPS"):
      kw["num_warps"] = int(os.environ["ATTN_WARPS"])
    return _attn(*a, **kw)
  da.decode_attention = decode_attention
if os.environ.get("ATTN_STAGES"):  # the decode attention's pipeline stages
  class _Backend:
    def __getattr__(self, name):
      return getattr(_real_backend, name)
    def compiler_params(self, **kw):
      kw["num_stages"] = int(os.environ["ATTN_STAGES"])
      return _real_backend.compiler_params(**kw)
  _real_backend, da._backend = da._backend, _Backend()
if os.environ.get("PART_HINT"):  # the partials' stores kept in L2
  _step = wt.step_ptx
  def step_ptx(*a, **kw):
    text = _step(*a, **kw)
    text = text.replace("st.global.f32 [", "st.global.L2::cache_hint.f32 [")
    lines, made = [], False
    for line in text.split("\n"):
      if "L2::cache_hint" in line:
        if not made:
          lines.append("createpolicy.fractional.L2::evict_"
                       + os.environ["PART_HINT"] + ".b64 pol, 1.0;")
          made = True
        line = line.rstrip(";") + ", pol;"
      lines.append(line)
    lines.insert(1, ".reg .b64 pol;")
    return "\n".join(lines)
  wt.step_ptx = step_ptx

if __name__ == "__main__":
  import runpy
  what, sys.argv = sys.argv[1], sys.argv[1:]
  if what == "profile":
    sys.argv[0] = "decode_profile.py"
    runpy.run_path(os.path.join(os.path.dirname(__file__),
                                "decode_profile.py"), run_name="__main__")
  else:
    from jaxbnb._src.tools import cli
    sys.exit(cli.main(sys.argv[1:]))
