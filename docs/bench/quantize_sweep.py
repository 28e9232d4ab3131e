"""Tiles of the 4-bit quantize kernel and of double quantization's nested
step (docs/benchmarks.md, eighteenth session; run on the GPU).

    python docs/bench/quantize_sweep.py        # tiles, nested, package
    python docs/bench/quantize_sweep.py mean   # ways to take the offset
    python docs/bench/quantize_sweep.py pipe   # with double quantization
    python docs/bench/quantize_sweep.py tiles  # more tiles, 30 rounds
    QK_OLD=old_quantize_4bit.py python docs/bench/quantize_sweep.py ab
    ncu --clock-control none --metrics gpu__time_duration.sum \\
        python docs/bench/quantize_sweep.py ncu   # or ncupkg

The default mode times, for each size (bf16, NF4, blocksize 64) over two
rotating inputs, `quantize_4bit.quantize_4bit` over blocks per program
and warps; `quantize_nested.quantize_nested` over blocks per program and
warps on that size's absmax; the mean XLA takes first; `F.quantize_4bit`
with and without double quantization as the package runs it. Every
variant's bytes are checked against the default's. With `$QK_OLD` naming
a copy of an earlier `quantize_4bit.py`, its default is timed too. One
JSON line per measurement goes to $OUT/quantize_sweep.jsonl.

"tiles" times five tiles of the quantize kernel at 2^28 and 14336x4096
values, 30 rounds a call, to $OUT/quantize_tiles.jsonl. "mean" times
`jnp.mean` of an absmax against sums of rows first. "pipe"
times the kernel, the mean and the nested kernel together, the nested
kernel in its earlier tile (16 blocks, 4 warps) and its present one (2
blocks, 2 warps); "ncu" runs each of those once per size after a
warm-up, so Nsight Compute times each kernel (add `--cache-control none`
to keep what L2 holds between them); "ncupkg" runs `F.quantize_4bit` with
double quantization the same way.

The eighteenth session's raw files also hold two variants that were
measured and not kept (their code is not in the package): a loop form
of the quantize kernel ("programs": each program walking every
`programs`-th tile, the next tile's load issued before the current one
is quantized) and L2 eviction hints ("evict": the input and the codes
evict-first, the absmax evict-last). The nineteenth session's "ab" run
timed a third (`quantize_words_ab_2026-12-03_h200.jsonl`, "new"): each
NF4 code from one uint32 bucket word (the bucket's count and the low 20
bits of the threshold inside it) in place of the uint8 count and the
16-entry threshold table; "old" is the kernel the package keeps. A
later "ab" run timed two more variants against it: buckets of the top 11
bits (`qk_s21.py`: a 2048-entry count table, half the bytes a warp's
lookups span) and the same with each bucket's two signs side by side
(`qk_s21i.py`: one run of hot entries in place of two, two more
instructions a value).
"""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks, kernels
from jaxbnb._src.tools import measure
from pallas_kernels import code_tables
from pallas_kernels import quantize_4bit as qk
from pallas_kernels import quantize_nested as nk

SIZES = [1 << 28, 14336 * 4096, 1 << 24]
TH = kernels.thresholds("nf4")
NESTED = {"nested16x4": (16, 4), "nested2x2": (2, 2)}


def median_us(fn, slots, rounds=10):
  return float(np.median(measure.time_jax(fn, slots, rounds=rounds, reps=5,
                                          warmup=1))) * 1e6


def _out(name):
  return open(os.path.join(os.environ.get("OUT", "."), name), "a")


def _emit(out, **rec):
  out.write(json.dumps(rec) + "\n")
  out.flush()
  print(rec, flush=True)


def _tables():
  return tuple(jnp.asarray(t) for t in code_tables.quantize_tables(
      codebooks.create_dynamic_map(signed=True)))


def _quantize(block_rows=None, num_warps=None, smem=True):
  """The 4-bit kernel, jitted, in the tile given (None: its default),
  its NF4 tables in shared memory or not (`smem`)."""
  return jax.jit(lambda x: qk.quantize_4bit(
      x, blocksize=64, quant_type="nf4", thresholds=TH,
      block_rows=block_rows, num_warps=num_warps, smem=smem))


def _same(got, want):
  """Whether two outputs (pytrees of arrays) hold the same arrays, byte
  for byte."""
  return all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _inputs(n):
  return [(measure.random_bf16(jax.random.key(7 + i), (n,)),)
          for i in range(2)]


def sweep():
  out = _out("quantize_sweep.jsonl")
  print("device", jax.devices()[0].device_kind, flush=True)
  old = None
  if os.environ.get("QK_OLD"):
    spec = importlib.util.spec_from_file_location("qk_old",
                                                  os.environ["QK_OLD"])
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
  lo, aux = _tables()
  for n in SIZES:
    xs = _inputs(n)
    base = _quantize()
    want = jax.device_get(base(*xs[0]))
    floor_bytes = 2 * n + n // 2 + 4 * (n // 64)
    if old is not None:
      f = jax.jit(lambda x: old.quantize_4bit(
          x, blocksize=64, quant_type="nf4", thresholds=TH))
      _emit(out, what="quantize_old", n=n, us=median_us(f, xs),
            floor_bytes=floor_bytes)
    for br, w in ((64, 8), (64, 4), (32, 4), (32, 8)):
      f = _quantize(br, w)
      _emit(out, what="quantize", n=n, programs=None, block_rows=br, warps=w,
            same=_same(jax.device_get(f(*xs[0])), want),
            us=median_us(f, xs), floor_bytes=floor_bytes)
    am = [(base(x)[1],) for (x,) in xs]
    mean = jax.jit(jnp.mean)
    _emit(out, what="mean", n=n // 64, us=median_us(mean, am))
    off = mean(am[0][0])
    want_n = jax.device_get(nk.quantize_nested(am[0][0], off, lo, aux))
    for br in (1, 2, 4, 8, 16):
      for w in (1, 2, 4):
        f = jax.jit(lambda a, br=br, w=w: nk.quantize_nested(
            a, off, lo, aux, block_rows=br, num_warps=w))
        _emit(out, what="nested", n=n // 64, block_rows=br, warps=w,
              same=_same(jax.device_get(f(*am[0])), want_n),
              us=median_us(f, am, rounds=50))
    for dq in (False, True):
      f = jax.jit(lambda x, dq=dq: F.quantize_4bit(
          x, quant_type="nf4", compress_statistics=dq))
      _emit(out, what="package", n=n, double_quant=dq, us=median_us(f, xs))
    del xs, am


def tiles():
  out = _out("quantize_tiles.jsonl")
  for n in SIZES[:2]:
    xs = _inputs(n)
    want = None
    for br, w in ((64, 8), (32, 4), (128, 16), (16, 2), (128, 8)):
      f = _quantize(br, w)
      got = jax.device_get(f(*xs[0]))
      want = got if want is None else want
      _emit(out, n=n, block_rows=br, warps=w, same=_same(got, want),
            us=median_us(f, xs, rounds=30))


def ab():
  """The 4-bit kernel against earlier or variant copies of
  `quantize_4bit.py` (`$QK_OLD`, comma-separated paths): the package's
  default and four more tiles, and each copy's default, 30 rounds a call,
  each checked byte for byte against the first copy's output, to
  $OUT/quantize_ab.jsonl ("what": "new" for the package, else the
  copy's file name; "old" when there is one copy)."""
  out = _out("quantize_ab.jsonl")
  paths = os.environ["QK_OLD"].split(",")
  olds = {}
  for path in paths:
    name = "old" if len(paths) == 1 else os.path.basename(path)
    spec = importlib.util.spec_from_file_location(f"qk_{len(olds)}", path)
    olds[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(olds[name])
  for n in SIZES:
    xs = _inputs(n)
    want = None
    for rnd in range(2):
      for name, mod in olds.items():
        f = jax.jit(lambda x, mod=mod: mod.quantize_4bit(
            x, blocksize=64, quant_type="nf4", thresholds=TH))
        got = jax.device_get(f(*xs[0]))
        want = got if want is None else want
        _emit(out, what=name, n=n, round=rnd, same=_same(got, want),
              us=median_us(f, xs, rounds=30))
      for br, w in ((None, None), (32, 4), (128, 8), (64, 4), (128, 16)):
        f = _quantize(br, w)
        _emit(out, what="new", n=n, round=rnd, block_rows=br, warps=w,
              same=_same(jax.device_get(f(*xs[0])), want),
              us=median_us(f, xs, rounds=30))
    del xs


def mean_variants():
  """The offset as `jnp.mean` and as sums of `r`-value rows, then their
  sum."""
  out = _out("quantize_mean.jsonl")
  for n in (1 << 22, 917504, 1 << 18):
    am = [(jnp.abs(jax.random.normal(jax.random.key(i), (n,))),)
          for i in range(4)]
    fns = {"mean": jnp.mean}
    for r in (64, 256, 1024, 4096):
      def f(a, r=r, n=n):
        pad = -a.shape[0] % r
        a = jnp.pad(a, (0, pad)) if pad else a
        return jnp.sum(jnp.sum(a.reshape(-1, r), axis=1)) / np.float32(n)
      fns[f"rows{r}"] = f
    for name, f in fns.items():
      _emit(out, what="mean", n=n, how=name,
            us=median_us(jax.jit(f), am, rounds=50))


def pipeline(nested_rows, nested_warps):
  """Quantize with double quantization as `ops` runs it: the kernel, the
  mean, the nested kernel in the tile given."""
  lo, aux = _tables()

  def f(x):
    packed, am = qk.quantize_4bit(x, blocksize=64, quant_type="nf4",
                                  thresholds=TH)
    off = jax.lax.optimization_barrier(jnp.mean(am))
    q, nam = nk.quantize_nested(am, off, lo, aux, block_rows=nested_rows,
                                num_warps=nested_warps)
    return packed, q, nam, off
  return jax.jit(f)


def pipes():
  """Each `NESTED` tile timed at each size, its bytes checked against the
  first's; then `F.quantize_4bit` with double quantization as the package
  runs it (since the nineteenth session its nested kernel takes the
  mean's factor, so the mean is the sum alone: its offset may differ
  from `jnp.mean`'s in the last place, so only the codes' shapes are
  compared)."""
  out = _out("quantize_pipe.jsonl")
  for n in SIZES:
    xs = _inputs(n)
    want = None
    for name, args in NESTED.items():
      f = pipeline(*args)
      got = jax.device_get(f(*xs[0]))
      want = got if want is None else want
      _emit(out, what="pipe", n=n, how=name,
            same=_same(got, want), us=median_us(f, xs))
    f = jax.jit(lambda x: F.quantize_4bit(x, quant_type="nf4",
                                          compress_statistics=True))
    packed, qs = jax.device_get(f(*xs[0]))
    _emit(out, what="pipe", n=n, how="package",
          same=bool(np.array_equal(packed.reshape(-1), want[0])
                    and qs.absmax.shape == want[1].shape),
          us=median_us(f, xs))


def ncu():
  """Each `NESTED` pipeline once per size after a warm-up."""
  for n in SIZES:
    x = measure.random_bf16(jax.random.key(1), (n,))
    for name, args in NESTED.items():
      f = pipeline(*args)
      jax.block_until_ready(f(x))
      print("ncu", n, name, flush=True)
      jax.block_until_ready(f(x))


def ncu_package():
  """`F.quantize_4bit` with double quantization, as the package runs it,
  once per size after a warm-up (for Nsight Compute)."""
  f = jax.jit(lambda x: F.quantize_4bit(x, quant_type="nf4",
                                        compress_statistics=True))
  for n in SIZES:
    x = measure.random_bf16(jax.random.key(1), (n,))
    jax.block_until_ready(f(x))
    print("ncu package", n, flush=True)
    jax.block_until_ready(f(x))


def main():
  what = sys.argv[1] if len(sys.argv) > 1 else "sweep"
  return {"sweep": sweep, "tiles": tiles, "ab": ab, "mean": mean_variants,
          "pipe": pipes, "ncu": ncu, "ncupkg": ncu_package}[what]()


if __name__ == "__main__":
  sys.exit(main())
