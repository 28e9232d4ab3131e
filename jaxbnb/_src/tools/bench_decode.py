"""`jaxbnb bench decode`: end-to-end decode speed of a Llama-shaped model.

Each implementation runs in its own process (so peak memory is its own):

  jaxbnb bench decode --impl jax-bf16 --json out/bf16.json
  jaxbnb bench decode --impl jax-nf4-dq --json out/nf4.json
  jaxbnb bench decode --impl torch-bnb-nf4-dq --json out/bnb.json

The model is random-initialized with real shapes (Llama-3-8B by default):
speed and memory do not depend on the values. Decode tokens/s counts new
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
import gc
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb import models
# The well-known model shapes of `jaxbnb estimate` have no public name.
from jaxbnb._src.io import estimate
from jaxbnb._src.tools import argtypes
from jaxbnb._src.tools import measure
from jaxbnb._src.tools import report

__all__ = ["IMPLS", "SHAPES", "add_parsers", "decode_bytes",
           "decode_table", "plot_decode", "run_decode"]

# name -> LlamaConfig kwargs: the well-known shapes of `jaxbnb estimate`, and
# a tiny one for smoke tests.
SHAPES = {
    **{name: dict(cfg) for name, cfg in estimate.KNOWN_MODELS.items()},
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}
IMPLS = ("jax-bf16", "jax-nf4-dq", "jax-nf4", "jax-int8", "torch-bf16",
         "torch-bnb-nf4-dq", "torch-bnb-nf4")


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


def _jax_decode(opts, shape) -> dict:
  quant = None
  if opts.impl == "jax-nf4-dq":
    quant = models.QuantizationConfig.nf4(double_quant=True,
                                          compute_dtype="bfloat16")
  elif opts.impl == "jax-nf4":
    quant = models.QuantizationConfig.nf4(double_quant=False,
                                          compute_dtype="bfloat16")
  elif opts.impl == "jax-int8":
    quant = models.QuantizationConfig(load_in_8bit=True,
                                      llm_int8_threshold=6.0)
  cfg = models.LlamaConfig(**shape)
  t0 = time.perf_counter()
  model = models.LlamaForCausalLM(
      cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, quantization=quant,
      rngs=nnx.Rngs(0))
  jax.block_until_ready(nnx.state(model))
  gc.collect()
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() or {}
  out = {"build_s": time.perf_counter() - t0,
         "weights_bytes_in_use": stats.get("bytes_in_use"), "rows": []}
  report.log(f"{opts.impl}: built in {out['build_s']:.1f}s, "
             f"{(stats.get('bytes_in_use') or 0) / 2**30:.2f} GiB in use")
  gen = models.Generator(model)
  for batch in opts.batches:
    r = gen.benchmark_decode(batch=batch, prompt_len=opts.prompt_len,
                             steps=opts.steps, reps=opts.reps)
    row = {"batch": batch, **r}
    out["rows"].append(row)
    report.log(f"  batch {batch}: {row}")
  stats = dev.memory_stats() or {}
  out["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  return out


def _torch_decode(opts, shape) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

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
    import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
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
  """Runs one implementation and returns (and writes) its JSON document."""
  shape = dict(SHAPES[opts.shape])
  if opts.layers:
    shape["num_hidden_layers"] = opts.layers
  doc = {"kind": "decode", "impl": opts.impl, "shape_name": opts.shape,
         "shape": shape, "prompt_len": opts.prompt_len, "steps": opts.steps,
         "date": datetime.date.today().isoformat(),
         "python": platform.python_version()}
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
    row["floor_bytes"] = decode_bytes(shape, row["batch"], ctx, quant)
  if opts.json:
    report.write_json(doc, opts.json)
  return doc


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
  """Bar chart of decode tokens/s per implementation and batch (matplotlib)."""
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def add_parsers(sub) -> None:
  """Adds `decode` and `decode-report` to the `jaxbnb bench` subcommands.

  Args:
    sub: the subparsers action of `jaxbnb bench`.
  """
  p = sub.add_parser("decode", help="end-to-end decode tokens/s of a "
                     "random Llama-shaped model (one implementation)")
  p.add_argument("--impl", choices=IMPLS, required=True)
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
  rep.add_argument("--plot", help="image to write (matplotlib)")
  rep.add_argument("--copy-gbs", type=argtypes.number(float, 0), default=None,
                   help="copy bandwidth in GB/s for the floor (default: "
                   "measured in the runs)")

  def run_report(opts):
    docs = report.read_json(opts.inputs)
    bw = opts.copy_gbs * 1e9 if opts.copy_gbs else None
    print("\n".join(decode_table(docs, bw)))
    if opts.plot:
      plot_decode(docs, opts.plot, bw or max(
          (d["copy_bytes_per_s"] for d in docs if d.get("copy_bytes_per_s")),
          default=None))
    return 0
  rep.set_defaults(func=run_report)
