"""`jaxbnb bench matmul|quant|report`: 4-bit matmul and (de)quantization.

`bench matmul` times `matmul_4bit` (kernels and the pure-jnp reference)
against the bf16 XLA matmul, bitsandbytes and torch; `bench quant` times
`quantize_4bit` / `dequantize_4bit`; `bench report` renders the JSON as
markdown and a plot. The floor is the larger of the bytes that must move
over a measured copy bandwidth and the flops over a measured bf16 peak.

Method: a timed call is one jitted `fori_loop` of rounds; a round is a
Python-unrolled pass over `n_rot` separately allocated inputs totalling over
twice a 50 MB L2, so each op reads them from device memory. Each op's
inputs pass an optimization barrier with its previous output (the donated
loop carry): XLA cannot hoist, merge or drop the ops, at no runtime cost
(`measure.time_jax`). A sample is the difference of a call of `n_inner`
rounds and one of `n_short`, over the difference in ops (a call's fixed
cost cancels); the median sample is reported.
bitsandbytes and torch run one round in a CUDA graph, replayed and timed
with CUDA events (`measure.time_torch`); they are imported only when used
and skipped without a CUDA device.
"""

# matplotlib is optional (the `bench` extra) and slow to import: the plot of
# `bench report --plot` imports it where it is drawn.

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import time

import jax
from jax import lax

import jaxbnb
from jaxbnb import functional as F
from jaxbnb._src.io import estimate
# `use_kernels` (whether the kernels serve the current mode) has no public
# name; the result documents record it.
from jaxbnb._src.quant import dispatch
from jaxbnb._src.tools import argtypes
from jaxbnb._src.tools import measure
from jaxbnb._src.tools import report

__all__ = ["MATMUL_COLUMNS", "QUANT_COLUMNS", "add_parsers", "matmul_bytes",
           "n_rotations", "parse_ints", "parse_shapes", "quant_bytes",
           "run_matmul", "run_quant", "write_markdown"]

DEFAULT_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096),
                  (1024, 4096))
DEFAULT_M = (1, 4, 16, 64, 256, 4096)
DEFAULT_SIZES = (2**24, 2**26, 2**28)
MATMUL_COLUMNS = ("jaxbnb", "jaxbnb-ref", "xla-bf16", "bnb", "torch-bf16")
QUANT_COLUMNS = ("jaxbnb", "jaxbnb-ref", "bnb")
_BF16_COLUMNS = ("xla-bf16", "torch-bf16")


def parse_shapes(text: str) -> list[tuple[int, int]]:
  """Parses comma-separated `NxK` weight shapes ([out, in], K reduced).

  Examples:
    >>> parse_shapes("14336x4096, 8x16")
    [(14336, 4096), (8, 16)]
  """
  shapes = []
  for item in text.split(","):
    try:
      n, k = (int(p) for p in item.strip().lower().split("x"))
    except ValueError:
      n = k = 0
    if n < 1 or k < 1:
      raise ValueError(
          "expected comma-separated NxK weight shapes of positive integers "
          f"such as '4096x4096,14336x4096', got {text!r}")
    shapes.append((n, k))
  return shapes


def parse_ints(text: str, example: str = "1,16,4096") -> list[int]:
  """Parses comma-separated positive integers; `2^N` is accepted.

  Examples:
    >>> parse_ints("1, 16,2^4")
    [1, 16, 16]
  """
  values = []
  for item in text.split(","):
    try:
      base, _, exp = item.strip().partition("^")
      value = int(base) ** int(exp) if exp else int(base)
    except ValueError:
      value = 0
    if value < 1:
      raise ValueError(f"expected comma-separated positive integers such as "
                       f"{example!r}, got {text!r}")
    values.append(value)
  return values


def quant_bytes(numel: int, blocksize: int = 64,
                double_quant: bool = True) -> int:
  """Bytes of a 4-bit tensor: packed codes plus absmax statistics.

  Double quantization stores one uint8 code per block, a float32 absmax per
  256 blocks and a 256-entry float32 table; otherwise a float32 per block.

  Examples:
    >>> quant_bytes(4096 * 4096), quant_bytes(4096 * 4096, 64, False)
    (8655872, 9437184)
  """
  nblocks = -(-numel // blocksize)
  if double_quant:
    absmax = nblocks + 4 * -(-nblocks // 256) + 4 * 256
  else:
    absmax = 4 * nblocks
  return (numel + 1) // 2 + absmax


def matmul_bytes(m: int, n: int, k: int, blocksize: int = 64,
                 double_quant: bool | None = True) -> int:
  """Bytes `[M, K] @ [N, K].T` must move: weight, bf16 x and output.

  The weight is 4-bit (`quant_bytes`), or bf16 if `double_quant` is None.

  Examples:
    >>> matmul_bytes(1, 4096, 4096), matmul_bytes(1, 4096, 4096, 64, None)
    (8672256, 33570816)
  """
  if double_quant is None:
    weight = 2 * n * k
  else:
    weight = quant_bytes(n * k, blocksize, double_quant)
  return weight + 2 * m * k + 2 * m * n


def n_rotations(copy_bytes: int, budget_bytes: float = 200e6,
                lo: int = 2, hi: int = 64) -> int:
  """Copies to rotate over so that together they exceed `budget_bytes`.

  Examples:
    >>> n_rotations(9_000_000), n_rotations(10**9), n_rotations(10**5)
    (23, 2, 64)
  """
  return max(lo, min(hi, math.ceil(budget_bytes / copy_bytes)))


# bitsandbytes 0.50.2 launches its 4-bit quantize kernel without a stream
# (`cquantize_blockwise_*_nf4(None, ...)`), i.e. on the legacy default
# stream, which a CUDA graph captured on another stream does not record:
# graph replays of it took 0.5 us for 2^24 values and 2.7 us for 2^28
# (H200, twentieth session). So it is timed eagerly.
BNB_QUANTIZE_EAGER = ("bnb's quantize_4bit launches on the legacy default "
                      "stream, which a CUDA graph does not capture")


@contextlib.contextmanager
def _bnb_cached_code(bnb, enable: bool = True):
  """Caches bnb's per-call host-to-device copy of the 4-bit code table.

  bnb's `quantize_4bit` copies a 16-entry table to the GPU on every call,
  which a CUDA graph cannot capture (and which syncs the host when eager).
  """
  original = bnb.functional.get_4bit_type
  if enable:
    bnb.functional.get_4bit_type = functools.lru_cache(None)(original)
  try:
    yield
  finally:
    bnb.functional.get_4bit_type = original


_jax_col = measure.jax_column  # one jaxbnb/XLA column


def _torch_col(opts, torch, calls, eager=None) -> dict:
  with torch.inference_mode():
    samples, method, inner = measure.time_torch(
        torch, calls, opts.reps, opts.warmup, opts.target_ms * 1e-3, eager)
  return measure.summarize(samples, n_rot=len(calls), n_inner=inner,
                           method=method)


def _prepare(opts, kind):
  """Fills defaults; returns (torch, bnb, skip reason, copy B/s, FLOP/s)."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch
  quick = opts.quick
  defaults = {"reps": 3 if quick else 30, "warmup": 1 if quick else 2,
              "target_ms": 0.0 if quick else 5.0,
              "rotate_mb": 0.0 if quick else 200.0,
              "out": f"jaxbnb_bench_{kind}.json"}
  for name, value in defaults.items():
    if getattr(opts, name) is None:
      setattr(opts, name, value)
  torch, bnb, skipped = measure.load_torch(not opts.no_bnb)
  if skipped:
    report.log(f"bitsandbytes / torch columns skipped: {skipped}")
  return (torch, bnb, skipped,
          *measure.roofs(quick=opts.quick, reps=opts.reps,
                         warmup=opts.warmup))


def _meta(opts, kind, torch, bnb, skipped, copy_bw, peak) -> dict:
  args = {k: v for k, v in vars(opts).items() if not callable(v)}
  return {
      "benchmark": kind, "schema_version": 1, **report.environment(),
      "kernel_mode": jaxbnb.get_kernel_mode(),
      "kernels_enabled": dispatch.use_kernels()[0],
      "torch_version": getattr(torch, "__version__", None),
      "bitsandbytes_version": getattr(bnb, "__version__", None),
      "bnb_skipped": skipped, "copy_bandwidth_gbs": copy_bw / 1e9,
      "bf16_peak_tflops": peak / 1e12,
      "bf16_peak_tflops_probe": peak / 1e12,
      "quant_type": opts.quant_type, "blocksize": opts.blocksize,
      "double_quant": not opts.no_double_quant,
      "args": json.loads(json.dumps(args, default=str)),
  }


def run_matmul(opts: argparse.Namespace) -> dict:
  """Runs `bench matmul` with parsed options; returns the JSON document."""
  if opts.model:
    try:
      shapes = estimate.linear_shapes(opts.model)
    except (ValueError, OSError) as e:
      raise SystemExit(f"bench matmul: --model: {e}") from e
  else:
    shapes = opts.shapes or ([(128, 256)] if opts.quick else DEFAULT_SHAPES)
  ms = opts.m or ([1, 4] if opts.quick else DEFAULT_M)
  torch, bnb, skipped, copy_bw, peak = _prepare(opts, "matmul")
  meta = _meta(opts, "matmul", torch, bnb, skipped, copy_bw, peak)
  qt, bs, dq = opts.quant_type, opts.blocksize, not opts.no_double_quant
  budget, results = opts.rotate_mb * 1e6, []
  mm4 = lambda a, p, s: F.matmul_4bit(a, p, s)
  dot = lambda a, w: lax.dot_general(a, w, (((1,), (1,)), ((), ())))
  for n, k in shapes:
    rot_q = n_rotations(quant_bytes(n * k, bs, dq), budget, 2, opts.max_rot)
    rot_b = n_rotations(2 * n * k, budget, 2, opts.max_rot)
    scale = 1 / math.sqrt(k)
    quant = jax.jit(functools.partial(F.quantize_4bit, blocksize=bs,
                                      compress_statistics=dq, quant_type=qt))
    with jaxbnb.kernel_mode("reference"):  # bit-identical to the kernels
      wq = [quant(measure.random_bf16(jax.random.key(100 + i), (n, k), scale))
            for i in range(rot_q)]
    wb = [measure.random_bf16(jax.random.key(200 + i), (n, k), scale)
          for i in range(rot_b)]
    tq = tb = None
    if torch is not None:
      tb, tq = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                 * scale for _ in range(r)] for r in (rot_b, rot_q)]
      tq = None if bnb is None else [bnb.functional.quantize_4bit(
          w, blocksize=bs, compress_statistics=dq, quant_type=qt) for w in tq]
    for m in ms:
      t_start = time.perf_counter()
      report.log(f"matmul [{n}x{k}] M={m} (rotating {rot_q} 4-bit / {rot_b} "
                 "bf16 weights)")
      x = measure.random_bf16(jax.random.key(m), (m, k))
      b4, b16 = matmul_bytes(m, n, k, bs, dq), matmul_bytes(m, n, k, bs, None)
      flops = 2 * m * n * k
      fl4, fl16 = (max(b / copy_bw, flops / peak) for b in (b4, b16))
      slots_q = tuple((x, p, s) for p, s in wq)
      timings, errors = {}, {}
      measure.record(timings, errors, "jaxbnb", _jax_col, opts, mm4, slots_q,
                     fl4)
      if not opts.no_ref:
        measure.record(timings, errors, "jaxbnb-ref", _jax_col, opts, mm4,
                       slots_q, fl4, "reference")
      measure.record(timings, errors, "xla-bf16", _jax_col, opts, dot,
               tuple((x, w) for w in wb), fl16)
      if torch is not None:
        xt = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if tq is not None:
          measure.record(timings, errors, "bnb", _torch_col, opts, torch, [
              functools.partial(bnb.matmul_4bit, xt, p.t(), quant_state=s)
              for p, s in tq])
        measure.record(timings, errors, "torch-bf16", _torch_col, opts, torch, [
            functools.partial(torch.nn.functional.linear, xt, w) for w in tb])
      results.append({
          "n": n, "k": k, "m": m, "shape": f"{n}x{k}", "quant_type": qt,
          "double_quant": dq, "blocksize": bs, "dtype": "bfloat16",
          "bytes_4bit": b4, "bytes_bf16": b16, "flops": flops,
          "floor_mem_us": b4 / copy_bw * 1e6,
          "us": {c: timings.get(c, {}).get("median_us")
                 for c in MATMUL_COLUMNS}, "timing": timings,
          "errors": errors})
      report.log("  " + ", ".join(f"{c} {report.fmt(v)}" for c, v in
                            results[-1]["us"].items() if v)
           + f" us ({time.perf_counter() - t_start:.1f} s)")
    del wq, wb, tq, tb
    if torch is not None:
      torch.cuda.empty_cache()
  # The compute floor takes the best bf16 rate: the probe's or a large M's.
  for r in results:
    for c in _BF16_COLUMNS:
      if r["us"][c] and r["m"] >= 1024:
        peak = max(peak, r["flops"] / (r["us"][c] * 1e-6))
  meta["bf16_peak_tflops"] = peak / 1e12
  for r in results:
    r["floor_compute_us"] = r["flops"] / peak * 1e6
    r["floor_us"] = max(r["floor_mem_us"], r["floor_compute_us"])
    us, j = r["us"], r["us"]["jaxbnb"]
    r["speedup_vs_bf16"] = us["xla-bf16"] / j if j and us["xla-bf16"] else None
    r["speedup_vs_bnb"] = us["bnb"] / j if j and us["bnb"] else None
    r["pct_of_floor"] = 100 * r["floor_us"] / j if j else None
    r["below_floor"] = [c for c, v in us.items() if v and c not in
                        _BF16_COLUMNS and v < 0.9 * r["floor_us"]]
    if r["below_floor"]:
      report.log(f"WARNING: {r['shape']} M={r['m']}: {r['below_floor']} faster "
           "than the floor; the measurement is suspect")
  return {"meta": meta, "results": results}


def run_quant(opts: argparse.Namespace) -> dict:
  """Runs `bench quant` with parsed options; returns the JSON document."""
  sizes = opts.sizes or ([4096] if opts.quick else DEFAULT_SIZES)
  torch, bnb, skipped, copy_bw, peak = _prepare(opts, "quant")
  qt, bs, budget = opts.quant_type, opts.blocksize, opts.rotate_mb * 1e6
  results = []
  for numel in sizes:
    for dq in (False,) if opts.no_double_quant else (False, True):
      packed_bytes = quant_bytes(numel, bs, dq)
      rot = n_rotations(2 * numel + packed_bytes, budget, 1, opts.max_rot)
      report.log(f"quant {numel:,} elements, {qt}, double quant {dq} (rotating "
           f"{rot} buffers)")
      quant = functools.partial(F.quantize_4bit, blocksize=bs,
                                compress_statistics=dq, quant_type=qt)
      xs = [measure.random_bf16(jax.random.key(300 + i), (numel,))
            for i in range(rot)]
      with jaxbnb.kernel_mode("reference"):
        qs = [jax.jit(quant)(x) for x in xs]
      tx = tq = None
      if bnb is not None:
        tx = [torch.randn(numel, device="cuda", dtype=torch.bfloat16)
              for _ in range(rot)]
        tq = [bnb.functional.quantize_4bit(
            x, blocksize=bs, compress_statistics=dq, quant_type=qt)
              for x in tx]
      for op, bytes_in, bytes_out in (
          ("quantize", 2 * numel, packed_bytes),
          ("dequantize", packed_bytes, 2 * numel)):
        floor = (bytes_in + bytes_out) / copy_bw
        if op == "quantize":
          fn, slots = quant, tuple((x,) for x in xs)
        else:
          fn, slots = F.dequantize_4bit, tuple(qs)
        timings, errors = {}, {}
        measure.record(timings, errors, "jaxbnb", _jax_col, opts, fn, slots,
                       floor)
        if not opts.no_ref:
          measure.record(timings, errors, "jaxbnb-ref", _jax_col, opts, fn,
                         slots, floor, "reference")
        if bnb is not None:
          if op == "quantize":
            calls = [functools.partial(
                bnb.functional.quantize_4bit, x, blocksize=bs,
                compress_statistics=dq, quant_type=qt) for x in tx]
          else:
            calls = [functools.partial(bnb.functional.dequantize_4bit, p, s)
                     for p, s in tq]
          with _bnb_cached_code(bnb, op == "quantize"):
            measure.record(timings, errors, "bnb", _torch_col, opts, torch,
                           calls, BNB_QUANTIZE_EAGER if op == "quantize"
                           else None)
          if op == "quantize" and "bnb" in timings:
            timings["bnb"]["method"] += ", bnb's 4-bit code table cached"
        us = {c: timings.get(c, {}).get("median_us")
              for c in QUANT_COLUMNS}
        results.append({
            "op": op, "numel": numel, "quant_type": qt, "double_quant": dq,
            "blocksize": bs, "bytes_in": bytes_in, "bytes_out": bytes_out,
            "floor_us": floor * 1e6, "us": us,
            "gbs": {c: (bytes_in + bytes_out) / v / 1e3 if v else None
                    for c, v in us.items()},
            "pct_copy_bw": {c: 100 * floor * 1e6 / v if v else None
                            for c, v in us.items()},
            "timing": timings, "errors": errors})
        report.log(f"  {op}: " + ", ".join(
            f"{c} {report.fmt(v)}" for c, v in us.items() if v) + " us")
      del xs, qs, tx, tq
      if torch is not None:
        torch.cuda.empty_cache()
  meta = _meta(opts, "quant", torch, bnb, skipped, copy_bw, peak)
  meta["double_quant"] = [False] if opts.no_double_quant else [False, True]
  return {"meta": meta, "results": results}


def _rows(doc):
  """(headers, rows) of a result document's table."""
  rows = []
  if doc["meta"]["benchmark"] == "quant":
    for r in doc["results"]:
      us, pct = r["us"], r["pct_copy_bw"]
      rows.append([r["op"], f"{r['numel']:,}",
                   r["quant_type"] + (" + dq" if r["double_quant"] else ""),
                   *(report.fmt(us[c]) for c in QUANT_COLUMNS),
                   report.fmt(r["floor_us"]), report.fmt(r["gbs"]["jaxbnb"]),
                   report.fmt(pct["jaxbnb"], "%"),
                   report.fmt(pct["bnb"], "%")])
    return ["op", "elements", "type", *QUANT_COLUMNS, "floor", "jaxbnb GB/s",
            "jaxbnb % copy BW", "bnb % copy BW"], rows
  for r in doc["results"]:
    rows.append([r["shape"], r["m"], *(report.fmt(r["us"][c]) for c in
                                       MATMUL_COLUMNS),
                 report.fmt(r["floor_us"]),
                 report.fmt(r["speedup_vs_bf16"], "x"),
                 report.fmt(r["speedup_vs_bnb"], "x"),
                 report.fmt(r["pct_of_floor"], "%")])
  return ["shape NxK", "M", *MATMUL_COLUMNS, "floor", "vs bf16", "vs bnb",
          "% of floor"], rows


def _header(doc) -> str:
  m = doc["meta"]
  what = m["quant_type"]
  if m["benchmark"] == "matmul" and m.get("double_quant"):
    what += " + double quant"
  return (f"**{m['benchmark']}** on {m['device_kind']}, {m['date_utc']}: jax "
          f"{m['jax_version']}, jaxbnb {m['jaxbnb_version']} (kernel mode "
          f"{m['kernel_mode']}), bitsandbytes "
          f"{m['bitsandbytes_version'] or 'not run'}, torch "
          f"{m['torch_version'] or 'not run'}; copy bandwidth "
          f"{report.fmt(m['copy_bandwidth_gbs'])} GB/s, bf16 peak "
          f"{report.fmt(m.get('bf16_peak_tflops'))} TFLOP/s; {what}, blocksize "
          f"{m['blocksize']}, bf16. Times in us per op (median).")


def _plot_matmul(docs, plot_path: str) -> None:
  """Time vs M (log-log) per weight shape: jaxbnb, xla-bf16, bnb, floor."""
  try:
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("`jaxbnb bench report --plot` needs matplotlib "
                      "(pip install matplotlib).") from e
  devices = {d["meta"]["device_kind"] for d in docs}
  series = {}  # shape -> label -> [(m, us)]
  for d in docs:
    tag = f" [{d['meta']['device_kind']}]" if len(devices) > 1 else ""
    for r in d["results"]:
      values = {c: r["us"][c] for c in ("jaxbnb", "jaxbnb-ref", "xla-bf16",
                                         "bnb")} | {"floor": r["floor_us"]}
      for col, v in values.items():
        if v:
          series.setdefault(r["shape"], {}).setdefault(col + tag, []).append(
              (r["m"], v))
  ncols = min(3, len(series))
  nrows = -(-len(series) // ncols)
  fig = Figure(figsize=(5 * ncols, 4 * nrows))
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  styles = {"floor": dict(color="k", linestyle="--"),
            "jaxbnb-ref": dict(linestyle=":")}
  for ax, (shape, lines) in zip(axes, series.items()):
    for label, points in lines.items():
      ax.plot(*zip(*sorted(points)), marker="o", markersize=3, label=label,
              **styles.get(label.split(" [")[0], {}))
    ax.set(xscale="log", yscale="log", title=f"weight [N, K] = {shape}",
           xlabel="M (rows of x)", ylabel="us per matmul")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[len(series):]:
    ax.set_visible(False)
  fig.tight_layout()
  report.save_figure(fig, plot_path, dpi=120)


def write_markdown(results_json_paths, md_path: str,
                   plot_path: str | None = None) -> list[str]:
  """Renders `bench matmul` / `bench quant` JSON files as markdown (+ plot).

  Both outputs are checked before either is written, and each is written
  whole or not at all.

  Args:
    results_json_paths: JSON files written by `jaxbnb bench ... --out`.
    md_path: markdown file to write: a header line and a table per input.
    plot_path: optional image of the matmul results (time vs M, log-log, a
      subplot per weight shape); its extension names the format (`.png`,
      `.svg`, `.pdf`, ...); needs matplotlib.

  Returns:
    The paths written.

  Raises:
    ValueError: an input that is not `bench matmul` / `bench quant`
      results, or an output that cannot be written (naming its flag).
  """
  docs = report.read_results(results_json_paths, ("matmul", "quant"))
  report.check_output(md_path, "--md")
  report.check_plot(plot_path)
  lines = ["<!-- written by `jaxbnb bench report` -->", ""]
  for doc in docs:
    lines += [_header(doc), "", *report.markdown_table(*_rows(doc)), ""]
  report.write_text("\n".join(lines), md_path)
  written = [md_path]
  matmul = [d for d in docs if d["meta"]["benchmark"] == "matmul"]
  if plot_path and matmul:
    _plot_matmul(matmul, plot_path)
    written.append(plot_path)
  elif plot_path:
    report.log("no matmul results: no plot written")
  return written


def _run(opts) -> int:
  if opts.out is None:
    opts.out = f"jaxbnb_bench_{opts.bench_command}.json"
  report.check_output(opts.out, "--out")
  doc = (run_matmul if opts.bench_command == "matmul" else run_quant)(opts)
  print(_header(doc))
  print(report.format_table(*_rows(doc)))
  report.write_json(doc, opts.out)
  report.log(f"wrote {opts.out}")
  return 0


def _report(opts) -> int:
  for path in write_markdown(opts.inputs, opts.md, opts.plot):
    report.log(f"wrote {path}")
  return 0


def add_parsers(sub) -> None:
  """Adds `matmul`, `quant` and `report` to the `jaxbnb bench` subcommands.

  Args:
    sub: the subparsers action of `jaxbnb bench`.
  """
  mm = sub.add_parser("matmul", help="matmul_4bit vs bf16 and bitsandbytes")
  which = mm.add_mutually_exclusive_group()
  which.add_argument("--shapes", type=argtypes.from_parser(parse_shapes),
                     help=("weight shapes NxK ([out, in]; K is reduced), "
                           "comma-separated (default: " + ",".join(
                               f"{n}x{k}" for n, k in DEFAULT_SHAPES) + ")"))
  which.add_argument("--model", help=(
      "the shapes of a model's linear layers instead: a known name (" +
      ", ".join(estimate.KNOWN_MODELS) + "), an HF folder or config.json, "
      "or a .gguf file"))
  mm.add_argument("--m", type=argtypes.from_parser(parse_ints, "1,16,4096"),
                  help=("rows of x, comma-separated (default: "
                        + ",".join(map(str, DEFAULT_M)) + ")"))
  q = sub.add_parser("quant", help="quantize_4bit / dequantize_4bit")
  q.add_argument("--sizes", type=argtypes.from_parser(parse_ints, "2^24,2^26"),
                 help=("elements per tensor, comma-separated; 2^N accepted "
                       "(default: 2^24,2^26,2^28)"))
  common = [
      ("--quant-type", dict(default="nf4", choices=["nf4", "fp4"])),
      ("--no-double-quant", dict(action="store_true", help=(
          "no double quantization of the absmax (quant runs both by "
          "default)"))),
      ("--blocksize", dict(type=argtypes.blocksize_4bit(), default=64,
                           help="4-bit block size (default 64)")),
      ("--quick", dict(action="store_true", help=(
          "tiny sizes, few repetitions (CPU smoke test)"))),
      ("--reps", dict(type=argtypes.number(int, 1), help=(
          "timed repetitions (default 30; --quick 3)"))),
      ("--warmup", dict(type=argtypes.number(int, 0), help=(
          "untimed runs after compiling (default 2; --quick 1)"))),
      ("--target-ms", dict(type=argtypes.number(float, 0.0), help=(
          "device time per timed call (default 5; --quick 0)"))),
      ("--rotate-mb", dict(type=argtypes.number(float, 0.0), help=(
          "MB of distinct inputs to rotate over (default 200; --quick 0)"))),
      ("--max-rot", dict(type=argtypes.number(int, 1), default=64, help=(
          "at most this many rotating copies (default 64)"))),
      ("--no-ref", dict(action="store_true", help="skip jaxbnb-ref")),
      ("--no-bnb", dict(action="store_true", help=(
          "skip the bitsandbytes and torch columns"))),
      ("--out", dict(help=(
          "JSON results file (default jaxbnb_bench_<matmul|quant>.json)"))),
  ]
  for p in (mm, q):
    for flag, kwargs in common:
      p.add_argument(flag, **kwargs)
    p.set_defaults(func=_run)
  rep = sub.add_parser("report", help="JSON results -> markdown + plot")
  rep.add_argument("--inputs", nargs="+", required=True,
                   help="JSON files from bench matmul / quant")
  rep.add_argument("--md", required=True, help="markdown file to write")
  rep.add_argument("--plot", help="matmul plot image to write, its format "
                   "named by its extension, e.g. plot.png or plot.svg "
                   "(matplotlib)")
  rep.set_defaults(func=_report)
