"""`jaxbnb bench optim`: optimizer step time and state memory.

Per parameter tree (`--sizes`: element counts such as `16M`, or
`llama-1b`, the parameter shapes of Llama-3.2-1B), it times one training
step (update + `optax.apply_updates`) of

* `optax-adamw`: `optax.adamw` with fp32 state,
* `adamw8bit`: `jaxbnb.optim.adamw8bit` (kernel mode `auto`),
* `adamw8bit-fused`: the same optimizer through
  `jaxbnb.optim.apply_updates_fused`: the kernel writes the new parameter
  and state in place of the donated ones (no update array, no second pass),
* `paged_adamw8bit`: the same with its state in host memory,
* `bnb-adamw8bit` / `torch-adamw-fused`: `bnb.optim.AdamW8bit` and
  `torch.optim.AdamW(fused=True)` when torch and bitsandbytes import on a
  CUDA device (CUDA events around an eager loop of steps).

Method: the JAX step is one jitted function of (params, grads, state) with
all three donated (update + `optax.apply_updates`, or `apply_updates_fused`
for the fused column) (the gradients pass through, aliased, so a loop can feed
them back). A timed call is a Python loop of `n` steps dispatched without a
host sync, then one `block_until_ready`; the reported time is the median
over `--reps` calls of (call time / n). State memory is the bytes of the
optimizer state's arrays, split by memory kind (device vs host).

The floor is the bytes one step must move over the measured copy bandwidth
(`measure.roofs`, read + write counted): per fp32 parameter, read and write
p (8 B), read g (4 B) and read and write the states: 16 B for 8-bit AdamW
(2 x 1 B codes, read and written) and 28 B for fp32 AdamW (2 x 4 B states,
read and written); a leaf under 4096 elements (`MIN_8BIT_SIZE`) keeps
float32 states in the 8-bit optimizers too, so it counts 28 B. The
unfused 8-bit step moves 12 B more (XLA reads the
kernel's new p and p, and writes the new p); the fused one moves the floor's
16 B. The paged variant additionally moves its 2 B/param of
state over the host link twice (in and out), which is reported, not floored.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import optax

import jaxbnb
from jaxbnb import optim
# Where paged state lives (`HOST_KINDS`, `host_memory_kind`) has no public
# name; the state-memory columns need it.
from jaxbnb._src.optim import paged as optim_paged
from jaxbnb._src.tools import argtypes
from jaxbnb._src.tools import measure
from jaxbnb._src.tools import report

__all__ = ["COLUMNS", "LLAMA_1B", "MIN_8BIT_SIZE", "add_parsers",
           "bytes_per_param", "floor_bytes",
           "optim_table", "parse_columns", "parse_sizes", "run_optim",
           "tree_shapes"]

COLUMNS = ("optax-adamw", "adamw8bit", "adamw8bit-fused", "paged_adamw8bit",
           "bnb-adamw8bit", "torch-adamw-fused")
_FUSED_COLUMNS = ("adamw8bit-fused",)
_TORCH_COLUMNS = ("bnb-adamw8bit", "torch-adamw-fused")
DEFAULT_SIZES = ("16M", "64M", "llama-1b")
QUICK_SIZES = ("64K",)
# Llama-3.2-1B: hidden 2048, 16 layers, ffn 8192, 32 query / 8 kv heads of
# 64, vocab 128256, tied embeddings.
LLAMA_1B = dict(hidden=2048, layers=16, ffn=8192, heads=32, kv_heads=8,
                vocab=128256)
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
_MAX_LEAF = 2**24
_COLS = 4096
LR = 1e-3
# jaxbnb's and bitsandbytes' default: smaller leaves keep float32 states.
MIN_8BIT_SIZE = 4096


def bytes_per_param(column: str, leaf_size: int | None = None) -> int:
  """Bytes one step moves per fp32 parameter (see the module docstring).

  Args:
    column: a name from `COLUMNS`.
    leaf_size: the elements of the parameter's leaf, or None (a large one).
      The 8-bit optimizers (jaxbnb's and bitsandbytes') keep float32 states
      for a leaf under `MIN_8BIT_SIZE` elements, which then moves as much as
      fp32 AdamW.

  Examples:
    >>> bytes_per_param("adamw8bit"), bytes_per_param("optax-adamw")
    (16, 28)
    >>> bytes_per_param("adamw8bit", 100)
    28
  """
  if column in ("optax-adamw", "torch-adamw-fused"):
    return 28
  return 28 if leaf_size is not None and leaf_size < MIN_8BIT_SIZE else 16


def floor_bytes(column: str, shapes: dict[str, tuple[int, ...]]) -> int:
  """Bytes one step of `column` must move over a tree of `shapes`."""
  return sum(bytes_per_param(column, math.prod(s)) * math.prod(s)
             for s in shapes.values())


def parse_sizes(text: str) -> list[str]:
  """Parses `--sizes`: element counts with K/M/G (powers of 2) or llama-1b.

  Examples:
    >>> parse_sizes("16M, 64K,llama-1b")
    ['16M', '64K', 'llama-1b']
  """
  out = []
  for item in text.split(","):
    item = item.strip()
    try:
      tree_shapes(item)
    except ValueError:
      raise ValueError(
          "expected comma-separated sizes such as '16M,64M,llama-1b' (K, M, "
          f"G are powers of 2), got {text!r}") from None
    out.append(item)
  return out


def parse_columns(text: str) -> list[str]:
  """Parses `--skip`: comma-separated names from `COLUMNS`.

  Examples:
    >>> parse_columns("bnb-adamw8bit, torch-adamw-fused,")
    ['bnb-adamw8bit', 'torch-adamw-fused']
  """
  names = [c.strip() for c in text.split(",") if c.strip()]
  bad = [c for c in names if c not in COLUMNS]
  if bad:
    raise ValueError(f"expected names from {','.join(COLUMNS)}, got "
                     f"{','.join(bad)!r}")
  return names


def tree_shapes(size: str) -> dict[str, tuple[int, ...]]:
  """Parameter shapes for a `--sizes` entry.

  A count becomes `[rows, 4096]` matrices of at most 16M elements (plus a
  1-D remainder); `llama-1b` gives Llama-3.2-1B's weights (tied embedding).

  Examples:
    >>> tree_shapes("20M")
    {'w0': (4096, 4096), 'w1': (1024, 4096)}
    >>> n = sum(math.prod(s) for s in tree_shapes("llama-1b").values())
    >>> n
    1235814400
  """
  if size.lower() == "llama-1b":
    c = LLAMA_1B
    h, hd = c["hidden"], c["hidden"] // c["heads"]
    shapes = {"embed": (c["vocab"], h), "final_norm": (h,)}
    for i in range(c["layers"]):
      shapes.update({
          f"layer{i:02d}.q": (h, h), f"layer{i:02d}.k": (c["kv_heads"] * hd, h),
          f"layer{i:02d}.v": (c["kv_heads"] * hd, h),
          f"layer{i:02d}.o": (h, h), f"layer{i:02d}.gate": (c["ffn"], h),
          f"layer{i:02d}.up": (c["ffn"], h),
          f"layer{i:02d}.down": (h, c["ffn"]),
          f"layer{i:02d}.attn_norm": (h,), f"layer{i:02d}.mlp_norm": (h,)})
    return shapes
  text = size.strip().upper()
  suffix = text[-1] if text[-1:] in _SUFFIX else ""
  try:
    numel = int(text[:len(text) - len(suffix)]) * _SUFFIX[suffix]
  except ValueError:
    numel = 0
  if numel < 1:
    raise ValueError(f"bad size {size!r}")
  shapes, i = {}, 0
  while numel:
    take = min(numel, _MAX_LEAF)
    rows, rest = divmod(take, _COLS)
    shape = (rows, _COLS) if rows else (rest,)
    shapes[f"w{i}"] = shape
    numel -= math.prod(shape)
    i += 1
  return shapes


def _jax_tree(shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2 * len(shapes))
  make = jax.jit(lambda k, s: jax.random.normal(k, s, jnp.float32) * 0.01,
                 static_argnums=1)
  params = {n: make(keys[2 * i], s) for i, (n, s) in enumerate(shapes.items())}
  grads = {n: make(keys[2 * i + 1], s)
           for i, (n, s) in enumerate(shapes.items())}
  return params, grads


def _state_bytes(tree) -> dict:
  dev = host = 0
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.Array):
      continue
    if x.sharding.memory_kind in optim_paged.HOST_KINDS:
      host += x.nbytes
    else:
      dev += x.nbytes
  return {"state_bytes": dev, "state_bytes_host": host}


def _jax_optimizer(column):
  if column == "optax-adamw":
    return optax.adamw(LR)
  if column in ("adamw8bit", "adamw8bit-fused"):
    return optim.adamw8bit(LR)
  return optim.paged_adamw8bit(LR)


def _time_jax_step(opts, column, shapes) -> dict:
  opt = _jax_optimizer(column)
  params, grads = _jax_tree(shapes)
  state = opt.init(params)
  mem = _state_bytes(state)

  def step(p, g, s):
    if column in _FUSED_COLUMNS:
      p, s = optim.apply_updates_fused(opt, g, s, p)
      return p, g, s
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), g, s

  with jaxbnb.kernel_mode("auto"):
    fn = jax.jit(step, donate_argnums=(0, 1, 2))
    carry = (params, grads, state)
    del params, grads, state
    samples = []
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*donated buffers.*")
      for _ in range(1 + opts.warmup):
        carry = jax.block_until_ready(fn(*carry))
      t0 = time.perf_counter()
      carry = jax.block_until_ready(fn(*carry))
      n = max(1, min(200, math.ceil(opts.target_ms * 1e-3 /
                                    max(time.perf_counter() - t0, 1e-6))))
      for _ in range(opts.reps):
        t0 = time.perf_counter()
        for _ in range(n):
          carry = fn(*carry)
        jax.block_until_ready(carry)
        samples.append((time.perf_counter() - t0) / n)
  del carry
  return {**measure.summarize(samples, n_steps=n,
                              method="jax.jit step loop, donated, no sync"),
          **mem}


def _time_torch_step(opts, torch, make_opt, shapes) -> dict:
  gen = torch.Generator(device="cuda").manual_seed(0)
  params = []
  for s in shapes.values():
    p = torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * .01)
    p.grad = torch.randn(s, device="cuda", generator=gen) * 0.01
    params.append(p)
  opt = make_opt(params)
  for _ in range(1 + opts.warmup):
    opt.step()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  opt.step()
  torch.cuda.synchronize()
  n = max(1, min(200, math.ceil(opts.target_ms * 1e-3 /
                                max(time.perf_counter() - t0, 1e-6))))
  samples = []
  for _ in range(opts.reps):
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(n):
      opt.step()
    end.record()
    end.synchronize()
    samples.append(start.elapsed_time(end) * 1e-3 / n)
  state_bytes = sum(v.numel() * v.element_size()
                    for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.numel() > 256)
  del opt, params
  torch.cuda.empty_cache()
  return {**measure.summarize(samples, n_steps=n, method="eager, CUDA events"),
          "state_bytes": state_bytes, "state_bytes_host": 0}


def _columns(opts, torch, bnb):
  cols = [c for c in COLUMNS if c not in opts.skip]
  if torch is None:
    cols = [c for c in cols if c not in _TORCH_COLUMNS]
  if bnb is None and "bnb-adamw8bit" in cols:
    cols.remove("bnb-adamw8bit")
  return cols


def run_optim(opts: argparse.Namespace) -> dict:
  """Runs `bench optim` with parsed options; returns the JSON document.

  Raises:
    ValueError: `--skip` leaves no column to run (before any measurement).
  """
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  quick = opts.quick
  for name, value in {"reps": 3 if quick else 20, "warmup": 1 if quick else 3,
                      "target_ms": 0.0 if quick else 50.0}.items():
    if getattr(opts, name, None) is None:
      setattr(opts, name, value)
  sizes = opts.sizes or list(QUICK_SIZES if quick else DEFAULT_SIZES)
  torch, bnb, skipped = measure.load_torch(not opts.no_bnb)
  if skipped:
    report.log(f"bitsandbytes / torch columns skipped: {skipped}")
  if not _columns(opts, torch, bnb):
    why = (f" ({','.join(_TORCH_COLUMNS)} do not run: {skipped})"
           if skipped else "")
    raise ValueError(f"argument --skip: expected a column of "
                     f"{','.join(COLUMNS)} left to run{why}, got "
                     f"{','.join(opts.skip)!r}")
  copy_bw, _ = measure.roofs(quick=opts.quick, reps=opts.reps,
                             warmup=opts.warmup)
  dev = jax.devices()[0]
  meta = {"benchmark": "optim", "schema_version": 1, **report.environment(),
          "optax_version": optax.__version__,
          "kernel_mode": "auto",
          "host_memory_kind": optim_paged.host_memory_kind(dev),
          "torch_version": getattr(torch, "__version__", None),
          "bitsandbytes_version": getattr(bnb, "__version__", None),
          "bnb_skipped": skipped, "copy_bandwidth_gbs": copy_bw / 1e9,
          "args": json.loads(json.dumps(
              {k: v for k, v in vars(opts).items() if not callable(v)},
              default=str))}
  results = []
  for size in sizes:
    shapes = tree_shapes(size)
    numel = sum(math.prod(s) for s in shapes.values())
    row = {"size": size, "numel": numel, "leaves": len(shapes),
           "columns": {}, "errors": {}}
    for col in _columns(opts, torch, bnb):
      report.log(f"{size} ({numel:,} params): {col}")
      if col == "bnb-adamw8bit":
        args = (opts, torch, lambda p: bnb.optim.AdamW8bit(p, lr=LR), shapes)
        fn = _time_torch_step
      elif col == "torch-adamw-fused":
        args = (opts, torch,
                lambda p: torch.optim.AdamW(p, lr=LR, fused=True), shapes)
        fn = _time_torch_step
      else:
        fn, args = _time_jax_step, (opts, col, shapes)
      measure.record(row["columns"], row["errors"], col, fn, *args)
      gc.collect()
      if col in row["columns"]:
        r = row["columns"][col]
        floor = floor_bytes(col, shapes)
        r["bytes_per_param"] = floor / numel
        r["floor_us"] = floor / copy_bw * 1e6
        r["pct_of_floor"] = 100 * r["floor_us"] / r["median_us"]
    results.append(row)
  return {"meta": meta, "results": results}


def optim_table(doc) -> tuple[list[str], list[list]]:
  """(headers, rows) of a `bench optim` document (one row per column)."""
  headers = ["size", "params", "optimizer", "step ms", "floor ms",
             "% of floor", "state MB (device)", "state MB (host)"]
  rows = []
  fmt = report.fmt
  for r in doc["results"]:
    for col in COLUMNS:
      if col in r["columns"]:
        c = r["columns"][col]
        rows.append([r["size"], f"{r['numel'] / 1e6:.1f}M", col,
                     fmt(c["median_us"] / 1e3), fmt(c["floor_us"] / 1e3),
                     fmt(c["pct_of_floor"]), fmt(c["state_bytes"] / 1e6),
                     fmt(c["state_bytes_host"] / 1e6)])
      elif col in r["errors"]:
        rows.append([r["size"], f"{r['numel'] / 1e6:.1f}M", col,
                     "error", "-", "-", "-", "-"])
  return headers, rows


def add_parsers(sub) -> None:
  """Adds `optim` to the `jaxbnb bench` subcommands.

  Args:
    sub: the subparsers action of `jaxbnb bench`.
  """
  p = sub.add_parser("optim", help="optimizer step time and state memory: "
                     "optax.adamw, jaxbnb (paged_)adamw8bit, adamw8bit fused "
                     "in place, bitsandbytes")
  p.add_argument("--sizes", type=argtypes.from_parser(parse_sizes), help=(
      "parameter counts (K/M/G = 2^10/2^20/2^30) or llama-1b, "
      "comma-separated (default 16M,64M,llama-1b; --quick 64K)"))
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes, few repetitions (CPU smoke test)")
  p.add_argument("--reps", type=argtypes.number(int, 1),
                 help="timed calls (default 20)")
  p.add_argument("--warmup", type=argtypes.number(int, 0),
                 help="untimed steps (default 3)")
  p.add_argument("--target-ms", type=argtypes.number(float, 0.0),
                 help="time per timed call (default 50; --quick 0)")
  p.add_argument("--skip", default=[], type=argtypes.from_parser(parse_columns),
                 help="columns to skip, comma-separated: " + ",".join(COLUMNS))
  p.add_argument("--no-bnb", action="store_true",
                 help="skip the bitsandbytes and torch columns")
  p.add_argument("--json", help="write the JSON document here")

  def run(opts):
    report.check_output(opts.json, "--json")
    doc = run_optim(opts)
    headers, rows = optim_table(doc)
    print("\n".join(report.markdown_table(headers, rows)))
    if opts.json:
      report.write_json(doc, opts.json)
      report.log(f"wrote {opts.json}")
    return 0
  p.set_defaults(func=run)
