"""Quantize with double quantization: what follows the 4-bit kernel, and
what the timer adds (docs/benchmarks.md, twenty-first session; run on the
GPU).

    python docs/bench/quantize_tail.py timer   # the timer's own costs
    python docs/bench/quantize_tail.py evict   # L2 hints, A/B
    python docs/bench/quantize_tail.py nested  # the nested kernel's tile
    python docs/bench/quantize_tail.py hlo     # the timed loop's copies
    ncu --clock-control none -k regex:"jaxbnb|reduce" \\
        --metrics gpu__time_duration.sum \\
        python docs/bench/quantize_tail.py ncu

"timer" times `F.quantize_4bit` with double quantization at 2^28 bf16
values and the copy-bandwidth op (`a + 1` over 1 GiB of uint32 words)
with `measure.time_jax` at 8, 22 and 64 rounds a call, then the bench's
copy bandwidth, to $OUT/quantize_tail_timer.jsonl. Run a of this session
(`quantize_tail_timer_2026-12-03_h200_a.jsonl`) came from an earlier form
of this mode: the timer before it took differences, at the rounds of 5
and 20 ms calls and a quarter of those, with the input in 1, 2 and 4
slots of a round.

"evict" times quantize with and without double quantization at three
sizes, 30 rounds a call, two calls per variant and round, with the 4-bit
kernel's L2 hints off and on (`quantize_4bit(..., evict=...)`: the input
and the codes `evict_first`, the absmax `evict_last`, so that the sum and
the nested kernel read the absmax from L2), each output checked byte for
byte, to $OUT/quantize_tail_evict.jsonl. "nested" times the nested kernel
alone in several tiles (blocks a program, warps), its absmax hot in L2,
then quantize + DQ with the first five, to
$OUT/quantize_tail_nested.jsonl. "ncu" runs quantize + DQ with the hints
off and on once per size after a warm-up (Nsight Compute flushes the L2
before each kernel, so it cannot show what the hints do). "hlo" writes the
timed loop's optimized HLO at 2^22 values to $OUT/quantize_tail_loop.hlo
and prints its copies.
"""
import contextlib
import functools
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import kernels
from jaxbnb._src.tools import measure
from pallas_kernels import code_tables
from pallas_kernels import quantize_4bit as qk
from pallas_kernels import quantize_nested as nk

sys.path.insert(0, os.path.dirname(__file__))
from quantize_sweep import SIZES, TH, _emit, _inputs, _out, _same, median_us  # pylint: disable=g-import-not-at-top,wrong-import-position


def quant_dq(x):
  return F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)


def add_one(a):
  return a + jnp.uint32(1)


@contextlib.contextmanager
def _evict(on):
  """The 4-bit kernel's L2 hints forced on or off."""
  orig = qk.quantize_4bit

  def forced(*args, **kw):
    return orig(*args, **{**kw, "evict": on})
  kernels.qk.quantize_4bit = forced
  try:
    yield
  finally:
    kernels.qk.quantize_4bit = orig


@contextlib.contextmanager
def _nested_tile(block_rows, num_warps):
  orig = nk.quantize_nested
  kernels.nk.quantize_nested = functools.partial(
      orig, block_rows=block_rows, num_warps=num_warps)
  try:
    yield
  finally:
    kernels.nk.quantize_nested = orig


def timer():
  """`measure.time_jax` (the difference of a long and a short call) at
  several lengths, and the bench's copy bandwidth."""
  out = _out("quantize_tail_timer.jsonl")
  x = measure.random_bf16(jax.random.key(0), (1 << 28,))
  w = jax.random.bits(jax.random.key(1), (1 << 28,), jnp.uint32)
  for name, fn, arg in (("quant_dq_2^28", quant_dq, x),
                        ("copy_1GiB", add_one, w)):
    for rounds in (8, 22, 64):
      for rnd in range(2):
        s = measure.time_jax(fn, ((arg,),), rounds, 7, 1)
        _emit(out, what=name, rounds=rounds, round=rnd,
              us=statistics.median(s) * 1e6,
              samples_us=[round(v * 1e6, 2) for v in s])
  for rnd in range(2):
    _emit(out, what="copy_bandwidth", round=rnd,
          gbs=measure.copy_bandwidth() / 1e9)


def evict():
  out = _out("quantize_tail_evict.jsonl")
  for n in SIZES:
    xs = _inputs(n)
    for dq in (True, False):
      want = None
      fn = quant_dq if dq else functools.partial(F.quantize_4bit,
                                                 quant_type="nf4")
      for rnd in range(2):
        for on in (False, True):
          with _evict(on):
            f = jax.jit(fn)
            got = jax.device_get(f(*xs[0]))
            want = got if want is None else want
            _emit(out, what="package_dq" if dq else "package", n=n,
                  round=rnd, evict=on, same=_same(got, want),
                  us=median_us(f, xs, rounds=30))
    del xs


NESTED_TILES = [(2, 2), (1, 1), (2, 1), (4, 2), (4, 4), (1, 2), (8, 4),
                (4, 1)]


def nested():
  """The nested kernel alone in each tile (its absmax input hot in L2, as
  after the 4-bit kernel with its hints), then quantize + DQ with it."""
  out = _out("quantize_tail_nested.jsonl")
  lo, aux = (jnp.asarray(t) for t in code_tables.quantize_tables(
      codebooks.create_dynamic_map(signed=True)))
  for n in SIZES:
    xs = _inputs(n)
    absmax = jax.jit(lambda x: qk.quantize_4bit(
        x, blocksize=64, quant_type="nf4", thresholds=TH)[1])(*xs[0])
    total = jnp.sum(absmax)
    want = None
    for rnd in range(2):
      for br, w in NESTED_TILES:
        f = jax.jit(functools.partial(
            nk.quantize_nested, lo=lo, aux=aux, block_rows=br, num_warps=w,
            count=absmax.shape[0]))
        got = jax.device_get(f(absmax, total))
        want = got if want is None else want
        _emit(out, what="nested", n=n, round=rnd, block_rows=br, warps=w,
              same=_same(got, want),
              us=median_us(f, ((absmax, total),), rounds=64))
    want = None
    for rnd in range(2):
      for br, w in NESTED_TILES[:5]:
        with _nested_tile(br, w):
          f = jax.jit(quant_dq)
          got = jax.device_get(f(*xs[0]))
          want = got if want is None else want
          _emit(out, what="package_dq", n=n, round=rnd, block_rows=br,
                warps=w, same=_same(got, want),
                us=median_us(f, xs, rounds=30))
    del xs


def hlo():
  x = measure.random_bf16(jax.random.key(0), (1 << 22,))

  run = measure.timed_loop(quant_dq, 4)
  slots = ((x,),)
  carry = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(lambda s: tuple(quant_dq(*a)
                                                      for a in s), slots))
  text = jax.jit(run, donate_argnums=1).lower(slots, carry).compile(
      ).as_text()
  with open(os.path.join(os.environ.get("OUT", "."),
                         "quantize_tail_loop.hlo"), "w") as f:
    f.write(text)
  for line in text.splitlines():
    if " copy" in line or "copy-start" in line or "copy(" in line:
      print(line.strip()[:300])


def ncu():
  for n in SIZES:
    x = measure.random_bf16(jax.random.key(1), (n,))
    for on in (False, True):
      with _evict(on):
        f = jax.jit(quant_dq)
        jax.block_until_ready(f(x))
        print("ncu", n, "evict" if on else "default", flush=True)
        jax.block_until_ready(f(x))


if __name__ == "__main__":
  print("device", jax.devices()[0].device_kind, json.dumps(
      {"jax": jax.__version__}), flush=True)
  sys.exit({"timer": timer, "evict": evict, "nested": nested, "hlo": hlo,
            "ncu": ncu}[
      sys.argv[1]]())
