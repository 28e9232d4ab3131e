"""`jaxbnb bench decode`: end-to-end decode speed of a Llama-shaped model.

Each implementation runs in its own process (so peak memory is its own):

  jaxbnb bench decode --impl jax-bf16 --json out/bf16.json
  jaxbnb bench decode --impl jax-nf4-dq --json out/nf4.json
  jaxbnb bench decode --impl torch-bnb-nf4-dq --json out/bnb.json

The model is random with real shapes (Llama-3-8B by default): speed and
memory do not depend on the values. jaxbnb's model is built in its stored
form directly on the devices (`random_model`): random packed 4-bit bytes
and absmax (or int8 rows and scales, or bf16 weights), every array made by
a jitted function whose `out_shardings` put each shard on its device, so no
16-bit copy of a quantized weight ever exists. With `--mesh` the model is
split over a device mesh as `from_pretrained(..., mesh=)` splits it, and
decodes tensor-parallel; a Llama-3.1-405B shape in NF4 fits two H200s:

  jaxbnb bench decode --shape llama-3.1-405b --mesh tensor=2 --quant nf4 \
      --batch 1 --steps 16 --prompt-len 64

Decode tokens/s counts new
tokens of every row: `batch * steps / seconds`, with the prefill excluded.
jaxbnb's number is `Generator.benchmark_decode` (the decode loop of
`generate`, run without stop checks); transformers' is `model.generate` with
`min_new_tokens = max_new_tokens`, the time of a 1-token generate (the
prefill) subtracted. The floor is the bytes every step must read (weights and
KV cache) over the measured copy bandwidth.
"""

# torch, transformers, bitsandbytes and matplotlib are optional and slow to
# import: the torch implementations and the plot import them where used.

from __future__ import annotations

import argparse
import datetime
import dataclasses
import gc
import math
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbnb import convert
from jaxbnb import models
# The well-known model shapes of `jaxbnb estimate` have no public name.
from jaxbnb._src.io import estimate
# Where each parameter lives on a mesh: the loader's rules.
from jaxbnb._src.io import sharding as sharding_lib
from jaxbnb._src.models import tensor_parallel
from jaxbnb._src.quant.weights import Int8Params
from jaxbnb._src.quant.weights import Params4bit
from jaxbnb._src.tools import argtypes
from jaxbnb._src.tools import measure
from jaxbnb._src.tools import report

__all__ = ["IMPLS", "QUANTS", "SHAPES", "add_parsers", "decode_bytes",
           "decode_table", "plot_decode", "random_model", "run_decode"]

# name -> LlamaConfig kwargs: the well-known shapes of `jaxbnb estimate`, and
# a tiny one for smoke tests.
SHAPES = {
    **{name: dict(cfg) for name, cfg in estimate.KNOWN_MODELS.items()},
    # Llama 3.1 405B (its llama3 RoPE scaling left out: speed is the same).
    "llama-3.1-405b": dict(vocab_size=128256, hidden_size=16384,
                           intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8,
                           max_position_embeddings=131072,
                           model_type="llama", hidden_act="silu"),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}
IMPLS = ("jax-bf16", "jax-nf4-dq", "jax-nf4", "jax-int8", "torch-bf16",
         "torch-bnb-nf4-dq", "torch-bnb-nf4")
# `--quant` names of the jax implementations.
QUANTS = {"bf16": "jax-bf16", "nf4": "jax-nf4", "nf4-dq": "jax-nf4-dq",
          "int8": "jax-int8"}


def decode_bytes(shape: dict, batch: int, context: int, quant: str | None,
                 blocksize: int = 64) -> float:
  """Bytes one decode step must read: weights, plus the KV cache.

  Args:
    shape: LlamaConfig kwargs.
    batch: rows.
    context: mean number of cached tokens per row during the measured steps.
    quant: None (bf16), "nf4", "nf4-dq" or "int8" (LLM.int8).
    blocksize: 4-bit block size.

  Returns:
    Bytes (embedding rows read are negligible and left out; lm_head is bf16).
  """
  h, f, n = shape["hidden_size"], shape["intermediate_size"], shape[
      "num_hidden_layers"]
  heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
  d = h // heads
  linear = n * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * f)
  if quant is None:
    wbytes = 2 * linear
  elif quant == "int8":  # int8 rows + a float32 scale per row
    wbytes = linear + 4 * n * (heads * d + 2 * kv * d + h + 2 * f + h)
  else:
    per_block = 1 + 4 / 256 if quant == "nf4-dq" else 4
    wbytes = linear / 2 + linear / blocksize * per_block
  head = 2 * shape["vocab_size"] * h
  cache = 2 * n * batch * context * kv * d * 2
  return wbytes + head + cache


def _quantization(impl: str) -> models.QuantizationConfig | None:
  if impl == "jax-nf4-dq":
    return models.QuantizationConfig.nf4(double_quant=True,
                                         compute_dtype="bfloat16")
  if impl == "jax-nf4":
    return models.QuantizationConfig.nf4(double_quant=False,
                                         compute_dtype="bfloat16")
  if impl == "jax-int8":
    return models.QuantizationConfig(load_in_8bit=True,
                                     llm_int8_threshold=6.0)
  return None


class _Maker:
  """Makes random arrays straight into their shardings, one jitted
  function per (kind, shape, dtype, sharding), reused across layers."""

  def __init__(self, seed: int):
    self.key = jax.random.key(seed)
    self.count = 0
    self.fns = {}

  def __call__(self, kind: str, shape, dtype, sharding, scale: float = 1.0):
    shape, dtype = tuple(int(d) for d in shape), jnp.dtype(dtype)
    fk = (kind, shape, dtype.name, sharding, scale)
    if fk not in self.fns:
      def make(key):
        if kind == "bits":  # random bytes, seen as `dtype`
          bits = jax.random.bits(key, shape, {1: jnp.uint8, 2: jnp.uint16,
                                              4: jnp.uint32}[dtype.itemsize])
          return jax.lax.bitcast_convert_type(bits, dtype)
        if kind == "normal":
          return (scale * jax.random.normal(key, shape, jnp.float32)
                  ).astype(dtype)
        if kind == "uniform":  # in [scale, 2 * scale)
          return (scale * (1 + jax.random.uniform(key, shape, jnp.float32))
                  ).astype(dtype)
        return jnp.full(shape, scale, dtype)  # "const"
      self.fns[fk] = jax.jit(make, out_shardings=sharding)
    self.count += 1
    return self.fns[fk](jax.random.fold_in(self.key, self.count))


def _random_weight(make, abstract, specs, mesh, tables):
  """A random quantized weight in its stored layout, shard by shard."""
  on = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
  w_scale = 1.0 / math.sqrt(abstract.shape[1])  # about unit-variance outputs
  if isinstance(abstract, Int8Params):  # W ~ CB * SCB / 127, CB uniform
    return Int8Params(
        make("bits", abstract.CB.shape, jnp.int8, on(specs.CB)),
        make("uniform", abstract.SCB.shape, jnp.float32, on(specs.SCB),
             w_scale), abstract.dtype)
  qs, qs_specs = abstract.quant_state, specs.quant_state
  code, nested_code = tables[qs.quant_type]
  rep = on(P())
  data = make("bits", abstract.data.shape, abstract.data.dtype,
              on(specs.data))
  if qs.nested:  # absmax = nested_code[c] * nested_absmax + offset
    state = dataclasses.replace(
        qs, absmax=make("bits", qs.absmax.shape, jnp.uint8,
                        on(qs_specs.absmax)),
        code=_replicated(code, mesh),
        offset=make("const", (), jnp.float32, rep, 1.5 * w_scale),
        nested_absmax=make("const", qs.nested_absmax.shape, jnp.float32,
                           rep, 0.5 * w_scale),
        nested_code=_replicated(nested_code, mesh))
  else:
    state = dataclasses.replace(
        qs, absmax=make("uniform", qs.absmax.shape, jnp.float32,
                        on(qs_specs.absmax), w_scale),
        code=_replicated(code, mesh))
  return Params4bit(data, state)


def _replicated(table: np.ndarray, mesh: Mesh) -> jax.Array:
  """A small host table on every device of `mesh` (of every process)."""
  return jax.jit(lambda: jnp.asarray(table),
                 out_shardings=NamedSharding(mesh, P()))()


def random_model(shape: dict, impl: str = "jax-nf4-dq", *,
                 mesh: Mesh | None = None, seed: int = 0):
  """A random `LlamaForCausalLM` of `shape`, built on the devices.

  Every parameter is made in its stored form by a jitted function with
  `out_shardings`, so each device makes only its own shard: random packed
  4-bit bytes and absmax (codes with double quantization), int8 rows and
  scales, or bf16 weights (embeddings and `lm_head` are always bf16, as
  bitsandbytes keeps them). No 16-bit copy of a quantized weight exists at
  any point. The layout on `mesh` is `from_pretrained(..., mesh=mesh)`'s
  (`ShardingRules()`): the model decodes tensor-parallel over "tensor".

  Examples:
    >>> import jax
    >>> m = random_model(SHAPES["tiny"], "jax-nf4-dq",
    ...                  mesh=convert.parse_mesh("tensor=1",
    ...                                          jax.devices()[:1]))
    >>> m.model.layers[0].mlp.up_proj.weight.get_value().shape
    (256, 128)

  Args:
    shape: `LlamaConfig` keyword arguments.
    impl: "jax-bf16", "jax-nf4", "jax-nf4-dq" or "jax-int8".
    mesh: the device mesh (default: the first device alone).
    seed: random seed.

  Returns:
    The model, its arrays on `mesh`.

  Raises:
    ValueError: if an axis of `mesh` does not divide a dimension it
      splits, or a row shard would cut a 4-bit block.
  """
  if impl not in QUANTS.values():
    raise ValueError(f"random_model: `impl` must be one of "
                     f"{sorted(QUANTS.values())}, got {impl!r}.")
  if mesh is None:
    mesh = Mesh(np.array(jax.devices()[:1]), ("tensor",))
  cfg = models.LlamaConfig(**shape)
  quant = _quantization(impl)
  model = nnx.eval_shape(lambda: models.LlamaForCausalLM(
      cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, quantization=quant,
      rngs=nnx.Rngs(0)))
  rules = sharding_lib.ShardingRules()
  make = _Maker(seed)
  tables = {}
  for qt in ("nf4", "fp4"):  # the real code tables, from a tiny weight
    w = Params4bit.from_float(jnp.ones((1, 256 * 64), jnp.float32),
                              quant_type=qt, compress_statistics=True)
    tables[qt] = (np.asarray(w.quant_state.code),
                  np.asarray(w.quant_state.nested_code))
  for name, var in model.iter_variables():
    value = var.get_value()
    if isinstance(value, (Params4bit, Int8Params)):
      specs = sharding_lib.quantized_specs(rules, name, value, mesh)
      var.set_value(_random_weight(make, value, specs, mesh, tables))
      continue
    sharding = NamedSharding(mesh, rules.spec(name, value.shape, mesh))
    if value.ndim == 1:  # norm weights one, biases zero
      const = 0.0 if name.endswith(".bias") else 1.0
      var.set_value(make("const", value.shape, value.dtype, sharding, const))
    else:
      var.set_value(make("normal", value.shape, value.dtype, sharding,
                         cfg.initializer_range))
  return model


def _memory(devices) -> tuple[int | None, int | None]:
  """(bytes in use, peak) summed over `devices` (None where unknown)."""
  stats = [d.memory_stats() or {} for d in devices]
  used = [s.get("bytes_in_use") for s in stats]
  peak = [s.get("peak_bytes_in_use") for s in stats]
  total = lambda v: None if None in v else sum(v)  # noqa: E731
  return total(used), total(peak)


def _jax_decode(opts, shape) -> dict:
  mesh = None if opts.mesh is None else convert.parse_mesh(opts.mesh)
  if mesh is not None:  # before building: heads the tensor axis must split
    tensor_parallel.check_mesh(mesh, models.LlamaConfig(**shape),
                               "argument --mesh")
  t0 = time.perf_counter()
  model = random_model(shape, opts.impl, mesh=mesh)
  jax.block_until_ready(nnx.state(model))
  gc.collect()
  devices = (jax.local_devices()[:1] if mesh is None else
             [d for d in mesh.devices.flat
              if d.process_index == jax.process_index()])
  used, _ = _memory(devices)
  out = {"build_s": time.perf_counter() - t0,
         "weights_bytes_in_use": used, "rows": [],
         "mesh": None if mesh is None else dict(mesh.shape),
         "devices": 1 if mesh is None else int(mesh.size)}
  report.log(f"{opts.impl}: built in {out['build_s']:.1f}s, "
             + ("memory in use unknown (the device reports none)"
                if used is None else f"{used / 2**30:.2f} GiB in use")
             + f" on {len(devices)} device(s)")
  gen = models.Generator(model)
  for batch in opts.batches:
    r = gen.benchmark_decode(batch=batch, prompt_len=opts.prompt_len,
                             steps=opts.steps, reps=opts.reps)
    row = {"batch": batch, **r}
    out["rows"].append(row)
    report.log(f"  batch {batch}: {row}")
  out["peak_bytes_in_use"] = _memory(devices)[1]
  return out


def _torch_modules(impl: str) -> tuple:
  """(torch, transformers, bitsandbytes or None) for a torch `impl`."""
  needs = ("torch, transformers and bitsandbytes"
           if impl.startswith("torch-bnb") else "torch and transformers")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    bnb = None
    if impl.startswith("torch-bnb"):
      import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"--impl {impl} needs {needs} installed (with a CUDA "
                      f"GPU); {e}") from e
  return torch, transformers, bnb


def _torch_decode(opts, shape) -> dict:
  torch, transformers, bnb = _torch_modules(opts.impl)

  kw = {k: v for k, v in shape.items() if k != "model_type"}
  kw.setdefault("tie_word_embeddings", False)
  cfg = transformers.LlamaConfig(**kw, torch_dtype="bfloat16")
  torch.manual_seed(0)
  t0 = time.perf_counter()
  torch.set_default_dtype(torch.bfloat16)
  with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(cfg)
  torch.set_default_dtype(torch.float32)
  model.eval()
  versions = {"torch": torch.__version__,
              "transformers": transformers.__version__}
  if opts.impl.startswith("torch-bnb"):
    versions["bitsandbytes"] = bnb.__version__
    dq = opts.impl.endswith("-dq")

    def replace(module):
      for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and name != "lm_head":
          new = bnb.nn.Linear4bit(
              child.in_features, child.out_features,
              bias=child.bias is not None, compute_dtype=torch.bfloat16,
              compress_statistics=dq, quant_type="nf4", device="meta")
          new.weight = bnb.nn.Params4bit(
              child.weight.data, requires_grad=False,
              compress_statistics=dq, quant_type="nf4").to("cuda")
          setattr(module, name, new)
          del child
        else:
          replace(child)
    replace(model)
    gc.collect()
    torch.cuda.empty_cache()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  out = {"build_s": time.perf_counter() - t0,
         "weights_bytes_in_use": torch.cuda.memory_allocated(), "rows": [],
         "versions": versions}
  report.log(f"{opts.impl}: built in {out['build_s']:.1f}s")
  gen = torch.Generator(device="cuda").manual_seed(0)
  for batch in opts.batches:
    ids = torch.randint(3, shape["vocab_size"], (batch, opts.prompt_len),
                        device="cuda", generator=gen)
    mask = torch.ones_like(ids)

    def run(n):
      torch.cuda.synchronize()
      t = time.perf_counter()
      with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0)
      torch.cuda.synchronize()
      return time.perf_counter() - t

    run(opts.steps)  # warm-up
    prefill = statistics.median(run(1) for _ in range(3))
    totals = [run(opts.steps + 1) for _ in range(opts.reps)]
    decode = [t - prefill for t in totals]
    med = statistics.median(decode)
    row = {"batch": batch, "steps": opts.steps, "prefill_s": prefill,
           "decode_s": med, "decode_samples_s": decode,
           "tokens_per_s": batch * opts.steps / med,
           "ms_per_step": 1e3 * med / opts.steps}
    out["rows"].append(row)
    report.log(f"  batch {batch}: {row['tokens_per_s']:.1f} tok/s")
  out["peak_bytes_in_use"] = torch.cuda.max_memory_allocated()
  return out


def run_decode(opts: argparse.Namespace) -> dict:
  """Runs one implementation and returns (and writes) its JSON document.

  On a mesh, a row's `floor_bytes` is what one device reads per step (the
  whole step's bytes over the "tensor" axis size), and only process 0
  writes `--json`.
  """
  _check_impl(opts)
  if jax.process_index() == 0:
    report.check_output(opts.json, "--json")
  if opts.impl.startswith("torch"):
    _torch_modules(opts.impl)  # before any measurement
  shape = dict(SHAPES[opts.shape])
  if opts.layers:
    shape["num_hidden_layers"] = opts.layers
  doc = {"kind": "decode", "impl": opts.impl, "shape_name": opts.shape,
         "shape": shape, "prompt_len": opts.prompt_len, "steps": opts.steps,
         "date": datetime.date.today().isoformat(),
         "python": platform.python_version(),
         # `compile_s` reads programs back from here when they are cached.
         "compilation_cache": jax.config.jax_compilation_cache_dir or None}
  try:
    doc["device"] = jax.devices()[0].device_kind
    doc["jax"] = jax.__version__
    if measure.on_gpu() and not opts.impl.startswith("torch"):
      # As `bench matmul` measures it.
      doc["copy_bytes_per_s"] = measure.copy_bandwidth(reps=5, warmup=1)
  except Exception as e:  # pylint: disable=broad-except
    doc["jax_error"] = str(e)
  if opts.impl.startswith("jax"):
    doc.update(_jax_decode(opts, shape))
  else:
    doc.update(_torch_decode(opts, shape))
  quant = {"jax-nf4-dq": "nf4-dq", "torch-bnb-nf4-dq": "nf4-dq",
           "jax-nf4": "nf4", "torch-bnb-nf4": "nf4",
           "jax-int8": "int8"}.get(opts.impl)
  for row in doc["rows"]:
    ctx = opts.prompt_len + opts.steps / 2
    row["floor_bytes"] = decode_bytes(shape, row["batch"], ctx, quant) / (
        (doc.get("mesh") or {}).get("tensor", 1))
  if opts.json and jax.process_index() == 0:
    report.write_json(doc, opts.json)
  return doc


def _check_impl(opts: argparse.Namespace) -> None:
  """Resolves `--quant` into `--impl`; refuses what does not go together."""
  quant, mesh = getattr(opts, "quant", None), getattr(opts, "mesh", None)
  opts.quant, opts.mesh = quant, mesh
  if quant is not None:
    impl = QUANTS[quant]
    if opts.impl is not None and opts.impl != impl:
      raise ValueError(f"--quant {quant} is --impl {impl}; got --impl "
                       f"{opts.impl} as well.")
    opts.impl = impl
  if opts.impl is None:
    raise ValueError("bench decode: one of --impl or --quant is required.")
  if mesh is not None and not opts.impl.startswith("jax"):
    raise ValueError(f"--mesh: only jaxbnb's implementations run on a "
                     f"mesh, got --impl {opts.impl}.")


def decode_table(docs: list[dict], copy_bw: float | None = None
                 ) -> list[str]:
  """Markdown lines: one row per (impl, batch), with the bandwidth floor.

  Args:
    docs: JSON documents of `run_decode`.
    copy_bw: copy bandwidth (bytes/s) for the floor; default: the largest
      measured in `docs`.

  Returns:
    The table's lines.
  """
  if copy_bw is None:
    copy_bw = max((d["copy_bytes_per_s"] for d in docs
                   if d.get("copy_bytes_per_s")), default=None)
  lines = ["| implementation | batch | decode tok/s | ms / step | floor tok/s "
           "| % of floor | GPU memory after load GiB | peak GiB |",
           "|---|---|---|---|---|---|---|---|"]
  for d in docs:
    for r in d["rows"]:
      floor = pct = ""
      if copy_bw:
        floor_tps = r["batch"] * copy_bw / r["floor_bytes"]
        floor = f"{floor_tps:.0f}"
        pct = f"{100 * r['tokens_per_s'] / floor_tps:.0f}%"
      mem = [d.get("weights_bytes_in_use"), d.get("peak_bytes_in_use")]
      mem = ["" if v is None else f"{v / 2**30:.2f}" for v in mem]
      lines.append(
          f"| {d['impl']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
          f"{r['ms_per_step']:.2f} | {floor} | {pct} | {mem[0]} | "
          f"{mem[1]} |")
  return lines


def plot_decode(docs: list[dict], path: str,
                copy_bw: float | None = None) -> None:
  """Bar chart of decode tokens/s per implementation and batch (matplotlib).

  The extension of `path` names the format (`.png`, `.svg`, `.pdf`, ...).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  batches = sorted({r["batch"] for d in docs for r in d["rows"]})
  fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4))
  axes = list(np.atleast_1d(axes))
  for ax, b in zip(axes, batches):
    names, vals, floors = [], [], []
    for d in docs:
      for r in d["rows"]:
        if r["batch"] == b:
          names.append(d["impl"])
          vals.append(r["tokens_per_s"])
          floors.append(b * copy_bw / r["floor_bytes"] if copy_bw else None)
    bars = ax.bar(range(len(vals)), vals, color=[
        "tab:blue" if n.startswith("jax") else "tab:gray" for n in names])
    for i, f in enumerate(floors):
      if f:
        ax.hlines(f, i - 0.4, i + 0.4, colors="tab:red", linestyles="--")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(vals)), names, rotation=30, ha="right",
                  fontsize=8)
    ax.set_title(f"batch {b}")
    ax.set_ylabel("decode tokens/s")
  shape = docs[0].get("shape_name", "")
  fig.suptitle(f"{shape} decode on {docs[0].get('device', '')} "
               "(red dashes: bandwidth floor)", fontsize=10)
  fig.tight_layout()
  report.save_figure(fig, path, dpi=110)
  plt.close(fig)


def add_parsers(sub) -> None:
  """Adds `decode` and `decode-report` to the `jaxbnb bench` subcommands.

  Args:
    sub: the subparsers action of `jaxbnb bench`.
  """
  p = sub.add_parser("decode", help="end-to-end decode tokens/s of a "
                     "random Llama-shaped model (one implementation)")
  p.add_argument("--impl", choices=IMPLS, default=None,
                 help="the implementation (or --quant for jaxbnb's)")
  p.add_argument("--quant", choices=sorted(QUANTS), default=None,
                 help="jaxbnb's model in this format: --quant nf4 is "
                 "--impl jax-nf4")
  p.add_argument("--mesh", default=None, metavar="AXES",
                 help="jaxbnb only: split the model over a device mesh and "
                 "decode tensor-parallel, e.g. 'tensor=2' (sizes multiply "
                 "to the number of devices; see docs/distributed.md)")
  p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
  p.add_argument("--layers", type=argtypes.number(int, 0), default=0,
                 help="override the number of layers (0: the shape's)")
  p.add_argument("--batch", type=argtypes.int_list(1, "1,8"), default=[1, 8],
                 dest="batches", help="comma-separated batch sizes")
  p.add_argument("--prompt-len", type=argtypes.number(int, 1), default=128)
  p.add_argument("--steps", type=argtypes.number(int, 1), default=128)
  p.add_argument("--reps", type=argtypes.number(int, 1), default=3)
  p.add_argument("--json", help="write the JSON document here")

  def run(opts):
    doc = run_decode(opts)
    print("\n".join(decode_table([doc])))
    return 0
  p.set_defaults(func=run)

  rep = sub.add_parser("decode-report", help="decode JSON results -> "
                       "markdown table (+ plot)")
  rep.add_argument("--inputs", nargs="+", required=True)
  rep.add_argument("--plot", help="image to write, its format named by its "
                   "extension, e.g. decode.png or decode.svg (matplotlib)")
  rep.add_argument("--copy-gbs", type=argtypes.number(float, 0), default=None,
                   help="copy bandwidth in GB/s for the floor (default: "
                   "measured in the runs)")

  def run_report(opts):
    docs = report.read_results(opts.inputs, ("decode",))
    report.check_plot(opts.plot)
    bw = opts.copy_gbs * 1e9 if opts.copy_gbs else None
    print("\n".join(decode_table(docs, bw)))
    if opts.plot:
      plot_decode(docs, opts.plot, bw or max(
          (d["copy_bytes_per_s"] for d in docs if d.get("copy_bytes_per_s")),
          default=None))
      report.log(f"wrote {opts.plot}")
    return 0
  rep.set_defaults(func=run_report)
