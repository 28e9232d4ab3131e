"""`jaxbnb bench int8`: the LLM.int8 matmul at decode and prefill sizes.

For a weight `[N, K]` (default 14336 x 4096, a Llama-3-8B MLP projection)
and M rows of bf16 activations, times

* `jaxbnb`: `matmul_8bit` in the current kernel mode (auto on an NVIDIA
  GPU: the Pallas decode kernel for M <= 16 with a threshold, XLA's int8
  dot for M <= 16 without, `int8_gemm` above), including the activation
  quantization;
* `jaxbnb-ref`: the same in kernel mode "reference" (XLA only);
* `kernel`: the Pallas kernel alone on pre-quantized activations (the
  decode kernel for M <= 16, `int8_gemm` above; only where kernels run);
* `xla-bf16`: `x @ W.T` with a bf16 weight;
* `xla-int8`: XLA's `s8 x s8 -> s32` dot alone (no quantization, no
  epilogue);
* `floor`: the int8 weight's bytes over the measured copy bandwidth;

at threshold 0 and at threshold 6 with `--outliers` planted outlier columns
(|x| = 8 in every other row; the other activations are clipped to 5.5).
`--sweep` also times the kernel alone at threshold 6 over 48 tile
configurations at M <= 16 (`sweep_configs`) and 12 at larger M
(`gemm_sweep_configs`); `--configs` times a list of your own instead.
Both need the kernels to run (an NVIDIA GPU, or kernel mode
"interpret"): elsewhere they are refused before anything is timed.
Timing follows `bench matmul` (`measure.time_jax`: a jitted loop
over rotating weights that together exceed the L2). The results go to a
JSON file (`--out`) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import jax
from jax import lax
import jax.numpy as jnp

import jaxbnb
from jaxbnb import functional as F
from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant import reference
from jaxbnb._src.tools import argtypes
from jaxbnb._src.tools import bench_matmul
from jaxbnb._src.tools import measure
from jaxbnb._src.tools import report
from pallas_kernels import int8_gemm
from pallas_kernels import int8_matmul as int8_kernel

__all__ = ["COLUMNS", "add_parsers", "gemm_sweep_configs", "parse_configs",
           "planted_x", "run_int8", "sweep_configs", "table"]

COLUMNS = ("jaxbnb", "jaxbnb-ref", "kernel", "xla-bf16", "xla-int8")
DEFAULT_M = (1, 16, 256, 4096)
THRESHOLD = 6.0
_CONTRACT = (((1,), (1,)), ((), ()))


def sweep_configs() -> list[tuple]:
  """Kernel configurations `--sweep` times: (block_n, block_k, split_k,
  num_warps, num_stages, outliers); 48 of them."""
  return list(itertools.product((32, 64, 128), (256, 512), (1, 2), (4,),
                                (3, 4), ("skip", "always")))


def gemm_sweep_configs() -> list[tuple]:
  """`int8_gemm` configurations `--sweep` times at M > 16: (block_m,
  block_n, block_k, group_m, num_warps, num_stages); 12 of them."""
  return [(128, 128, 128, 8, 4, 3), (128, 128, 128, 8, 8, 3),
          (128, 128, 128, 8, 4, 4), (128, 128, 128, 4, 4, 3),
          (128, 128, 128, 16, 4, 3), (128, 256, 128, 8, 4, 3),
          (256, 128, 128, 8, 4, 3), (128, 128, 64, 8, 4, 4),
          (128, 128, 64, 8, 4, 5), (64, 128, 128, 8, 4, 3),
          (128, 256, 128, 8, 8, 3), (64, 256, 128, 8, 4, 3)]


def planted_x(key, m: int, k: int, n_outliers: int) -> jax.Array:
  """bf16 `[m, k]` activations, |x| <= 5.5 except `n_outliers` columns.

  The outlier columns are spread over K; every other row holds +-8 there.
  """
  x = jnp.clip(measure.random_bf16(key, (m, k)), -5.5, 5.5)
  if n_outliers:
    cols = jnp.linspace(0, k - 1, n_outliers + 2).astype(jnp.int32)[1:-1]
    sign = jnp.where(jnp.arange(n_outliers) % 2 == 0, 8.0, -8.0)
    x = x.at[0::2, cols].set(sign.astype(x.dtype))
  return x


_time = measure.jax_column  # one jaxbnb/XLA column


def _kernel_fn(threshold, config, interpret):
  """The kernel alone on the quantized inputs `_kernel_args` makes: the
  decode kernel for M <= 16, `int8_gemm` with the gathered outlier columns
  above."""
  def fn(ca, sca, x_out, mask, weight):
    if ca.shape[0] > int8_kernel.MAX_M:
      return int8_gemm.int8_gemm(
          ca, sca, weight.CB, weight.SCB, dtype=jnp.bfloat16,
          x=x_out if threshold > 0 else None,
          outlier_cols=mask if threshold > 0 else None, config=config,
          interpret=interpret)
    return int8_kernel.int8_matmul(
        ca, sca, weight.CB, weight.SCB, dtype=jnp.bfloat16,
        x_outlier=x_out if threshold > 0 else None,
        outlier_cols=mask if threshold > 0 else None, config=config,
        interpret=interpret)
  return fn


def _kernel_args(x, threshold):
  ca, sca, mask = reference.int8_vectorwise_quant(
      x.astype(jnp.float16), threshold)
  if mask is None:
    mask = jnp.zeros((x.shape[1],), jnp.bool_)
  x_out = jnp.where(mask[None, :], x, jnp.zeros((), x.dtype))
  return ca, sca, x_out, mask


def run_int8(opts: argparse.Namespace) -> dict:
  """Runs `bench int8` with parsed options; returns the JSON document.

  Raises:
    ValueError: `--sweep` or `--configs` where the kernels do not run (before
      any measurement).
  """
  quick = opts.quick
  for name, value in {"reps": 3 if quick else 30, "warmup": 1 if quick else 2,
                      "target_ms": 0.0 if quick else 5.0,
                      "rotate_mb": 0.0 if quick else 200.0}.items():
    if getattr(opts, name) is None:
      setattr(opts, name, value)
  n = opts.n or (256 if quick else 14336)
  k = opts.k or (512 if quick else 4096)
  ms = opts.m or ([1, 16] if quick else list(DEFAULT_M))
  mode = dispatch.resolve()
  kernels = mode != "reference"
  if (opts.sweep or opts.configs) and not kernels:
    flag = "--configs" if opts.configs else "--sweep"
    raise ValueError(
        f"argument {flag}: times the Pallas kernels, which do not run here "
        f"(kernel mode {jaxbnb.get_kernel_mode()!r} resolves to "
        f"'reference' on {jax.devices()[0].platform}); run it on an NVIDIA "
        "GPU, or without the flag")
  copy_bw = measure.copy_bandwidth(quick=quick, reps=opts.reps,
                                   warmup=opts.warmup)
  report.log(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
  budget = opts.rotate_mb * 1e6
  rot8 = bench_matmul.n_rotations(n * k, budget, 2, opts.max_rot)
  rot16 = bench_matmul.n_rotations(2 * n * k, budget, 2, opts.max_rot)
  with jaxbnb.kernel_mode("reference"):
    quant = jax.jit(F.quantize_int8_weight)
    w8 = [quant(measure.random_bf16(jax.random.key(100 + i), (n, k),
                                    k ** -0.5)) for i in range(rot8)]
  w16 = [measure.random_bf16(jax.random.key(200 + i), (n, k), k ** -0.5)
         for i in range(rot16)]
  floor_s = n * k / copy_bw
  dot16 = lambda a, w: lax.dot_general(a, w, _CONTRACT)
  dot8 = lambda a, w: lax.dot_general(a, w.CB, _CONTRACT,
                                      preferred_element_type=jnp.int32)
  results, sweep = [], []
  for m in ms:
    x = planted_x(jax.random.key(m), m, k, opts.outliers)
    shared, errors_shared = {}, {}
    report.log(f"int8 [{n}x{k}] M={m} (rotating {rot8} int8 / {rot16} bf16 "
               "weights)")
    measure.record(shared, errors_shared, "xla-bf16", _time, opts, dot16,
                   tuple((x, w) for w in w16), floor_s)
    ca0 = reference.int8_vectorwise_quant(x.astype(jnp.float16), 0.0)[0]
    measure.record(shared, errors_shared, "xla-int8", _time, opts, dot8,
                   tuple((ca0, w) for w in w8), floor_s)
    for threshold in (0.0, THRESHOLD):
      t0 = time.perf_counter()
      timings, errors = dict(shared), dict(errors_shared)
      mm8 = functools.partial(_matmul_8bit, threshold=threshold)
      slots = tuple((x, w) for w in w8)
      measure.record(timings, errors, "jaxbnb", _time, opts, mm8, slots,
                     floor_s)
      if not opts.no_ref:
        measure.record(timings, errors, "jaxbnb-ref", _time, opts, mm8,
                       slots, floor_s, "reference")
      decode = m <= int8_kernel.MAX_M
      use_kernel = kernels and (int8_kernel if decode else int8_gemm).can_use(
          m, n, k, jnp.bfloat16)
      if kernels and not use_kernel and threshold > 0:
        report.log(f"  M={m}: the kernel does not take this shape; no "
                   "kernel column" + (" and no sweep" if opts.sweep
                                      or opts.configs else ""))
      if use_kernel:
        kargs = _kernel_args(x, threshold)
        kslots = tuple((*kargs, w) for w in w8)
        interpret = mode == "interpret"
        measure.record(timings, errors, "kernel", _time, opts,
                       _kernel_fn(threshold, None, interpret), kslots,
                       floor_s)
        sweeping = (opts.sweep or opts.configs) and threshold > 0
        if opts.configs:
          configs = [c for c in opts.configs if _is_decode_config(c) == decode]
        else:
          configs = sweep_configs() if decode else gemm_sweep_configs()
        if sweeping and not configs:
          report.log(f"  M={m}: none of --configs is "
                     f"{'a decode kernel' if decode else 'an int8_gemm'} "
                     "configuration; no sweep at this M")
        for config in (configs if sweeping else ()):
          t, e = {}, {}
          measure.record(t, e, "kernel", _time, opts,
                         _kernel_fn(threshold, config, interpret), kslots,
                         floor_s)
          sweep.append({"m": m, "threshold": threshold,
                        "config": list(config),
                        "us": t.get("kernel", {}).get("median_us"),
                        "error": e.get("kernel")})
      n_out = 0
      if threshold > 0:
        mask = reference.int8_vectorwise_quant(x.astype(jnp.float16),
                                               threshold)[2]
        n_out = int(jnp.sum(mask))
      us = {c: timings.get(c, {}).get("median_us") for c in COLUMNS}
      j = us["jaxbnb"]
      results.append({
          "n": n, "k": k, "m": m, "threshold": threshold,
          "outlier_cols": n_out, "weight_bytes": n * k,
          "floor_us": floor_s * 1e6, "us": us,
          "default_config": list(
              (int8_kernel if m <= int8_kernel.MAX_M else int8_gemm)
              .default_config(m, n, k)),
          "pct_of_floor": 100 * floor_s * 1e6 / j if j else None,
          "speedup_vs_bf16": us["xla-bf16"] / j if j and us["xla-bf16"]
                             else None,
          "timing": timings, "errors": errors})
      report.log("  threshold " + f"{threshold:g}: " + ", ".join(
          f"{c} {report.fmt(v)}" for c, v in us.items() if v)
                 + f" us ({time.perf_counter() - t0:.1f} s)")
  meta = {
      "benchmark": "int8", "schema_version": 1, **report.environment(),
      "kernel_mode": jaxbnb.get_kernel_mode(), "resolved_mode": mode,
      "kernels_enabled": kernels, "copy_bandwidth_gbs": copy_bw / 1e9,
      "n": n, "k": k, "dtype": "bfloat16", "threshold": THRESHOLD,
      "planted_outliers": opts.outliers,
      "args": json.loads(json.dumps(vars(opts), default=str)),
  }
  return {"meta": meta, "results": results, "sweep": sweep}


def _is_decode_config(config) -> bool:
  return len(config) == 5 or isinstance(config[-1], str)


def parse_configs(text: str) -> list[tuple]:
  """`--configs`: ';'-separated tuples, e.g. "64,256,1,4,3,skip;128,128,
  128,8,4,3". Five numbers (and an optional outlier mode) are a decode
  kernel config, six numbers an `int8_gemm` config."""
  configs = []
  for item in text.split(";"):
    fields = [f.strip() for f in item.split(",") if f.strip()]
    if len(fields) not in (5, 6):
      raise ValueError(f"each config needs 5 or 6 comma-separated fields, "
                       f"got {item!r}")
    config = tuple(int(f) if f.isdigit() else f for f in fields)
    if not all(isinstance(f, int) for f in config[:5]):
      raise ValueError(f"the first 5 fields must be integers, got {item!r}")
    if isinstance(config[-1], str) and (
        config[-1] not in int8_kernel.OUTLIER_MODES):
      raise ValueError(f"the outlier mode must be one of "
                       f"{int8_kernel.OUTLIER_MODES}, got {config[-1]!r}")
    configs.append(config)
  return configs


def _matmul_8bit(x, w, *, threshold):
  return F.matmul_8bit(x, w, threshold=threshold)


def table(doc) -> tuple[list[str], list[list[str]]]:
  """(headers, rows) of the results table."""
  rows = []
  for r in doc["results"]:
    rows.append([f"{r['n']}x{r['k']}", r["m"], f"{r['threshold']:g}",
                 r["outlier_cols"],
                 *(report.fmt(r["us"][c]) for c in COLUMNS),
                 report.fmt(r["floor_us"]),
                 report.fmt(r["pct_of_floor"], "%"),
                 report.fmt(r["speedup_vs_bf16"], "x")])
  return (["shape NxK", "M", "threshold", "outlier cols", *COLUMNS, "floor",
           "% of floor", "vs bf16"], rows)


def _sweep_table(doc) -> tuple[list[str], list[list[str]]]:
  rows = sorted(doc["sweep"], key=lambda s: (s["m"], s["threshold"],
                                             s["us"] or float("inf")))
  return (["M", "threshold", "config (decode: block_n, block_k, split_k, "
           "warps, stages, outliers; gemm: block_m, block_n, block_k, "
           "group_m, warps, stages)", "kernel us"],
          [[s["m"], f"{s['threshold']:g}", str(tuple(s["config"])),
            report.fmt(s["us"]) if s["us"] else "failed"] for s in rows])


def _run(opts) -> int:
  report.check_output(opts.out, "--out")
  doc = run_int8(opts)
  m = doc["meta"]
  print(f"**int8** on {m['device_kind']}, {m['date_utc']}: jax "
        f"{m['jax_version']}, jaxbnb {m['jaxbnb_version']} (kernel mode "
        f"{m['kernel_mode']} -> {m['resolved_mode']}); copy bandwidth "
        f"{report.fmt(m['copy_bandwidth_gbs'])} GB/s; bf16 activations, "
        f"{m['planted_outliers']} planted outlier columns at threshold "
        f"{m['threshold']:g}. Times in us per op (median).")
  print()
  print("\n".join(report.markdown_table(*table(doc))))
  if doc["sweep"]:
    print()
    print("\n".join(report.markdown_table(*_sweep_table(doc))))
  report.write_json(doc, opts.out)
  report.log(f"wrote {opts.out}")
  return 0


def add_parsers(sub) -> None:
  """Adds `int8` to the `jaxbnb bench` subcommands.

  Args:
    sub: the subparsers action of `jaxbnb bench`.
  """
  p = sub.add_parser("int8", help="LLM.int8 matmul_8bit vs XLA bf16 and "
                     "int8 dots and the weight-bandwidth floor")
  p.add_argument("--n", type=argtypes.number(int, 1),
                 help="output features N (default 14336; --quick 256)")
  p.add_argument("--k", type=argtypes.number(int, 1),
                 help="input features K (default 4096; --quick 512)")
  p.add_argument("--m", type=argtypes.from_parser(bench_matmul.parse_ints,
                                                   "1,16,4096"),
                 help=("rows of x, comma-separated (default "
                       + ",".join(map(str, DEFAULT_M)) + "; --quick 1,16)"))
  p.add_argument("--outliers", type=argtypes.number(int, 0), default=5,
                 help="planted outlier columns at threshold 6 (default 5)")
  p.add_argument("--sweep", action="store_true", help=(
      "also time the kernel alone over its tile configurations at "
      "threshold 6 (48 for M <= 16, 12 above; about a minute per M on a "
      "GPU)"))
  p.add_argument("--configs", type=argtypes.from_parser(parse_configs), help=(
          "time the kernel alone at threshold 6 over these configurations "
          "instead of --sweep's: ';'-separated, 5 numbers and an optional "
          "outlier mode (decode kernel, M <= 16) or 6 numbers (int8_gemm)"))
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes, few repetitions (CPU smoke test)")
  p.add_argument("--reps", type=argtypes.number(int, 1),
                 help="timed repetitions (default 30; --quick 3)")
  p.add_argument("--warmup", type=argtypes.number(int, 0),
                 help="untimed runs after compiling (default 2; --quick 1)")
  p.add_argument("--target-ms", type=argtypes.number(float, 0.0),
                 help="device time per timed call (default 5; --quick 0)")
  p.add_argument("--rotate-mb", type=argtypes.number(float, 0.0), help=(
      "MB of distinct weights to rotate over (default 200; --quick 0)"))
  p.add_argument("--max-rot", type=argtypes.number(int, 1), default=64,
                 help="at most this many rotating copies (default 64)")
  p.add_argument("--no-ref", action="store_true", help="skip jaxbnb-ref")
  p.add_argument("--out", default="jaxbnb_bench_int8.json",
                 help="JSON results file (default jaxbnb_bench_int8.json)")
  p.set_defaults(func=_run)
