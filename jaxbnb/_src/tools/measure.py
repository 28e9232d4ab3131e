"""Timing helpers of the `jaxbnb bench` commands.

`time_jax` times a jitted function over rotating inputs without letting XLA
hoist, merge or drop the calls; `time_torch` times a round of torch calls
replayed from a CUDA graph; `roofs` measures the copy bandwidth and the bf16
matmul rate that the benchmarks' floors are computed from. torch and
bitsandbytes are optional: `load_torch` imports them only when a benchmark
wants them on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import math
import statistics
import time
from typing import Any
import warnings

import jax
from jax import lax
import jax.numpy as jnp

from jaxbnb._src.quant import dispatch
from jaxbnb._src.tools import report

__all__ = ["JAX_METHOD", "copy_bandwidth", "jax_column", "load_torch",
           "matmul_peak",
           "n_inner", "on_gpu", "random_bf16", "record", "roofs",
           "short_rounds", "summarize", "time_jax", "time_torch",
           "timed_loop"]

MAX_INNER = 64
# How `time_jax` samples, as the benchmarks' JSON records it.
JAX_METHOD = ("jax.jit fori_loop, the difference of n_inner and n_short "
              "rounds")


def on_gpu() -> bool:
  """Whether JAX's first device is a GPU."""
  return jax.devices()[0].platform == "gpu"


def n_inner(target_s: float, per_round_s: float) -> int:
  """Rounds per timed call so that a call takes about `target_s` seconds.

  Args:
    target_s: device time wanted per timed call (0: one round).
    per_round_s: an estimate of one round's time.

  Returns:
    Between 2 and `MAX_INNER` on the GPU, so that `time_jax` always has a
    short call to subtract (a round timed alone keeps the call's fixed
    cost, about 180 us on the H200, and two columns of one table would be
    timed two ways); 1 off the GPU or with no target.
  """
  # Off the GPU, XLA drops optimization barriers before loop-invariant code
  # motion, which would hoist the ops out of the loop: one round only.
  if target_s <= 0 or per_round_s <= 0 or not on_gpu():
    return 1
  return max(2, min(MAX_INNER, math.ceil(target_s / per_round_s)))


def short_rounds(rounds: int) -> int:
  """Rounds of the short call `time_jax` subtracts: a quarter of `rounds`
  (at least one), or 0 for a single round (timed alone).

  Examples:
    >>> short_rounds(64), short_rounds(5), short_rounds(2), short_rounds(1)
    (16, 1, 1, 0)
  """
  return max(1, rounds // 4) if rounds >= 2 else 0


def timed_loop(fn: Callable[..., Any], rounds: int
               ) -> Callable[[Sequence[tuple[Any, ...]], Any], Any]:
  """`time_jax`'s timed call, unjitted: `run(slots, carry)` runs `rounds`
  rounds of `fn` over the slots, each op's inputs through an optimization
  barrier with its previous output (`carry`, one output per slot), and
  returns the last outputs."""
  def run(slots, carry):
    def round_(_, prev):
      outs = []
      for args, p in zip(slots, prev):
        args, _ = lax.optimization_barrier((args, p))
        outs.append(fn(*args))
      return tuple(outs)
    return lax.fori_loop(0, rounds, round_, carry)
  return run


def time_jax(fn: Callable[..., Any], slots: Sequence[tuple[Any, ...]],
             rounds: int, reps: int, warmup: int) -> list[float]:
  """Seconds per op of `fn(*slot)` over the tuple `slots`.

  A timed call is one jitted `fori_loop` of rounds; a round is a
  Python-unrolled pass over the slots. Each op's inputs pass an optimization
  barrier with its previous output (the donated loop carry), so XLA cannot
  hoist, merge or drop the ops, at no runtime cost. A sample times a call
  of `rounds` rounds and one of `short_rounds(rounds)` (two executables)
  and divides the difference by the difference in ops, so that a call's
  fixed cost cancels: the dispatch, the loop's start and the host's wait,
  about 180 us on the H200, which made a 1 GiB copy at 8 rounds a call
  read 6-8% slow (docs/benchmarks.md, twenty-first session). A single
  round is timed alone. Trace-time settings (the kernel mode) apply: call
  it inside the block that sets them.

  Args:
    fn: the jittable op.
    slots: argument tuples of `fn`, separately allocated inputs to rotate
      over.
    rounds: rounds of the long call (see `n_inner`).
    reps: samples.
    warmup: untimed calls after the compiling one.

  Returns:
    `reps` samples, seconds per op.
  """
  shapes = jax.eval_shape(lambda s: tuple(fn(*a) for a in s), slots)
  carry = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  short = short_rounds(rounds)
  # One executable per trip count: a count known at compile time spares
  # each iteration the predicate's trip to the host (a traced count cost
  # 15-20 us an iteration and made the samples scatter on the H200).
  steps = {n: jax.jit(timed_loop(fn, n), donate_argnums=1)
           for n in (rounds, short) if n}
  samples = []
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*donated buffers.*")

    def call(n):
      nonlocal carry
      t0 = time.perf_counter()
      carry = jax.block_until_ready(steps[n](slots, carry))
      return time.perf_counter() - t0

    for _ in range(1 + warmup):
      for n in steps:
        call(n)
    for _ in range(reps):
      t = call(rounds)
      if short:
        t -= call(short)
      samples.append(t / ((rounds - short) * len(slots)))
  return samples


def jax_column(opts: Any, fn: Callable[..., Any],
               slots: Sequence[tuple[Any, ...]], floor_s: float,
               mode: str | None = None) -> dict[str, Any]:
  """A benchmark column: `fn` over `slots` by `time_jax`, summarized.

  Args:
    opts: the parsed options (`target_ms`, `reps`, `warmup`).
    fn: the jittable op.
    slots: its rotating argument tuples.
    floor_s: the op's floor in seconds (sets the rounds a call).
    mode: kernel mode to trace in (default: the current one).

  Returns:
    `summarize`'s dict with the rotation, the rounds and the method.
  """
  inner = n_inner(opts.target_ms * 1e-3, len(slots) * floor_s)
  with dispatch.kernel_mode(mode or dispatch.get_kernel_mode()):
    samples = time_jax(fn, slots, inner, opts.reps, opts.warmup)
  return summarize(samples, n_rot=len(slots), n_inner=inner,
                   n_short=short_rounds(inner), method=JAX_METHOD)


def time_torch(torch: Any, calls: Sequence[Callable[[], Any]], reps: int,
               warmup: int, target_s: float, eager: str | None = None
               ) -> tuple[list[float], str, int]:
  """Times a round of torch `calls`, replayed from a CUDA graph.

  Args:
    torch: the imported torch module (see `load_torch`).
    calls: argument-free callables; one round calls each once.
    reps: timed samples.
    warmup: untimed replays.
    target_s: device time wanted per sample (see `n_inner`).
    eager: if given, why not to capture a graph: the rounds run eagerly
      (on the current stream, host launches included). For calls whose
      work a capture would miss, such as a kernel launched on the legacy
      default stream.

  Returns:
    (seconds per call, method, replays per sample). The method is
    "cuda-graph", or "eager (...)" saying why no graph was captured or
    why capturing it failed.
  """
  def round_():
    for call in calls:
      call()
  side = torch.cuda.Stream()
  side.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(side):
    for _ in range(2):
      round_()
  torch.cuda.current_stream().wait_stream(side)
  torch.cuda.synchronize()
  method, step = "cuda-graph", round_
  if eager is not None:
    method = f"eager ({eager})"
  else:
    try:
      graph = torch.cuda.CUDAGraph()
      with torch.cuda.graph(graph):
        round_()
      step = graph.replay
    except Exception as e:  # pylint: disable=broad-except
      method = f"eager (graph capture failed: {type(e).__name__}: {e})"[:300]
      torch.cuda.synchronize()
  step()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  step()
  torch.cuda.synchronize()
  inner = n_inner(target_s, time.perf_counter() - t0)
  for _ in range(warmup):
    step()
  samples = []
  for _ in range(reps):
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(inner):
      step()
    end.record()
    end.synchronize()
    samples.append(start.elapsed_time(end) * 1e-3 / (inner * len(calls)))
  return samples, method, inner


def load_torch(wanted: bool) -> tuple[Any, Any, str | None]:
  """Imports torch and bitsandbytes for the comparison columns.

  Args:
    wanted: False skips them (`--no-bnb`).

  Returns:
    (torch or None, bitsandbytes or None, why they are skipped or None).
    They are skipped without a GPU or a usable `torch.cuda`.
  """
  if not wanted or not on_gpu():
    return None, None, "not on a GPU" if wanted else "skipped by --no-bnb"
  # torch and bitsandbytes are optional and slow to import: imported here,
  # only when a benchmark compares against them on a GPU.
  try:
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      return None, None, "torch.cuda is not available"
  except ImportError as e:
    return None, None, f"torch not importable: {e}"
  try:
    import bitsandbytes  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return torch, None, f"bitsandbytes not importable: {e}"
  return torch, bitsandbytes, None


def summarize(samples_s: Sequence[float], **extra: Any) -> dict[str, Any]:
  """Median, min, max and all samples in microseconds, plus `extra`.

  Examples:
    >>> s = summarize([1e-6, 3e-6, 2e-6], method="m")
    >>> s["median_us"], s["max_us"], s["method"]
    (2.0, 3.0, 'm')
  """
  us = [s * 1e6 for s in samples_s]
  return {"median_us": statistics.median(us), "min_us": min(us),
          "max_us": max(us), "samples_us": [round(u, 4) for u in us],
          **extra}


def record(timings: dict[str, Any], errors: dict[str, str], name: str,
           fn: Callable[..., Any], *args: Any) -> None:
  """Sets `timings[name] = fn(*args)`; a failure goes to `errors[name]`.

  One column failing (an out-of-memory, a missing kernel) is logged and
  recorded, and the benchmark goes on with the other columns.
  `KeyboardInterrupt` is not an `Exception` and still stops the run.
  """
  try:
    timings[name] = fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    errors[name] = f"{type(e).__name__}: {e}"[:1000]
    report.log(f"  {name} failed: {errors[name][:300]}")


@functools.partial(jax.jit, static_argnums=1)
def random_bf16(key: jax.Array, shape: tuple[int, ...],
                scale: float = 1.0) -> jax.Array:
  """Standard normal bf16 values times `scale` (drawn in float32)."""
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(
      jnp.bfloat16)


def copy_bandwidth(*, quick: bool = False, reps: int = 5,
                   warmup: int = 1) -> float:
  """Measured device copy bandwidth, bytes/s counting read + write.

  XLA's `a + 1` over 1 GiB of uint32 words. 32-bit words, not 16-bit
  values: XLA's kernel for a 16-bit elementwise op moves 2 bytes a thread
  and reached 3.28 TB/s on the H200 where the same op on uint32 reached
  4.14 (docs/benchmarks.md, twelfth session); the floors divide by what
  the device can move.

  Args:
    quick: a 2 MB buffer and one round (a CPU smoke test) instead of 1 GB.
    reps: timed calls.
    warmup: untimed calls.

  Returns:
    Bytes per second.
  """
  words = 2**19 if quick else 2**28
  inner = 1 if quick or not on_gpu() else 8
  x = jax.random.bits(jax.random.key(1), (words,), jnp.uint32)
  t = statistics.median(time_jax(lambda a: a + jnp.uint32(1), ((x,),), inner,
                                 reps, warmup))
  return 8 * words / t


def matmul_peak(*, quick: bool = False, reps: int = 5,
                warmup: int = 1) -> tuple[float, int]:
  """Measured bf16 matmul rate: (FLOP/s, the square size d timed)."""
  d = 128 if quick else 8192
  inner = 1 if quick or not on_gpu() else 8
  a, b = (random_bf16(jax.random.key(i), (d, d)) for i in (2, 3))
  t = statistics.median(time_jax(jnp.matmul, ((a, b),), inner, reps,
                                 warmup))
  return 2 * d**3 / t, d


def roofs(*, quick: bool, reps: int, warmup: int) -> tuple[float, float]:
  """Measured (copy bytes/s counting read + write, bf16 matmul FLOP/s).

  Args:
    quick: small sizes (see `copy_bandwidth`).
    reps: timed calls per measurement.
    warmup: untimed calls per measurement.

  Returns:
    The two rates; both are also logged.
  """
  copy_bw = copy_bandwidth(quick=quick, reps=reps, warmup=warmup)
  peak, d = matmul_peak(quick=quick, reps=reps, warmup=warmup)
  report.log(f"copy bandwidth {report.fmt(copy_bw / 1e9)} GB/s, bf16 matmul "
             f"{report.fmt(peak / 1e12)} TFLOP/s ({d}^3)")
  return copy_bw, peak
