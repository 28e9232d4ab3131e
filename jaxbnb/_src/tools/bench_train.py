"""`jaxbnb bench qlora`: the (Q)LoRA training step of a Llama-shaped model.

One implementation per process (so the peak memory is its own):

  jaxbnb bench qlora --impl jax-nf4-dq --json out/qlora.json
  jaxbnb bench qlora --impl jax-bf16 --json out/lora-bf16.json

The model is random-initialized with real shapes (Llama-3-8B by default):
speed and memory do not depend on the values. The step is
`jaxbnb.train.layerwise_train_step` (or, with `--step jit`,
`train.train_step` as one program) as `jaxbnb finetune` runs it: LoRA r 16, alpha 32,
dropout 0.05 on the seven projections, bf16 compute with float32 adapters,
gradient checkpointing per decoder layer, bitsandbytes' paged 8-bit AdamW
over the adapters, clipping at norm 1. Tokens/s is `batch * seq` over the
median step time (after `--warmup` steps); the peak is the device's
`peak_bytes_in_use`, next to `jaxbnb estimate --train`'s prediction.

With `--mesh data=D,fsdp=F` the model, adapters and optimizer state are
split as `jaxbnb finetune --mesh` splits them (`train.shard_for_training`)
and each batch over "data" x "fsdp"; `--batch` is then the global batch,
and the peak is the largest of the devices' peaks:

  jaxbnb bench qlora --impl jax-nf4-dq --mesh fsdp=2 --batch 4
"""

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

from jaxbnb import lora
from jaxbnb import models
from jaxbnb import train
from jaxbnb import convert
from jaxbnb._src.io import estimate
from jaxbnb._src.train import layerwise as train_layerwise
from jaxbnb._src.train import mesh as train_mesh
from jaxbnb._src.tools import argtypes
from jaxbnb._src.tools import bench_decode
from jaxbnb._src.tools import report

__all__ = ["IMPLS", "TARGETS", "add_parsers", "estimate_doc", "run_qlora",
           "qlora_table"]

IMPLS = ("jax-nf4-dq", "jax-bf16")
TARGETS = estimate.PROJECTIONS  # all seven projections


def _build(opts, shape):
  quant = None
  if opts.impl == "jax-nf4-dq":
    quant = models.QuantizationConfig.nf4(double_quant=True,
                                          compute_dtype="bfloat16")
  cfg = models.LlamaConfig(**shape)
  model = models.LlamaForCausalLM(
      cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, quantization=quant,
      rngs=nnx.Rngs(0))
  lcfg = lora.LoRAConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha,
                         lora_dropout=0.05, target_modules=TARGETS)
  model = lora.apply_lora(model, lcfg, rngs=nnx.Rngs(1))
  model.train()
  tcfg = train.TrainConfig(steps=opts.steps, batch_size=opts.batch,
                           seq_len=opts.seq, optimizer=opts.optimizer,
                           remat=opts.remat, learning_rate=2e-4)
  optimizer = nnx.Optimizer(model, train.make_optimizer(tcfg),
                            wrt=nnx.LoRAParam)
  train.commit_to_device(model, optimizer)
  return cfg, model, optimizer


def _max_stat(key: str):
  """The largest `key` of the local devices' memory stats (None off GPU)."""
  vals = [(d.memory_stats() or {}).get(key) for d in jax.local_devices()]
  vals = [v for v in vals if v is not None]
  return max(vals) if vals else None


def run_qlora(opts: argparse.Namespace) -> dict:
  """Builds, times and returns (and writes) one implementation's document."""
  shape = dict(bench_decode.SHAPES[opts.shape])
  if opts.layers:
    shape["num_hidden_layers"] = opts.layers
  doc = {"kind": "qlora", "impl": opts.impl, "shape_name": opts.shape,
         "shape": shape, "batch": opts.batch, "seq": opts.seq,
         "lora_r": opts.lora_r, "lora_alpha": opts.lora_alpha,
         "remat": opts.remat, "optimizer": opts.optimizer,
         "step": opts.step,
         "date": datetime.date.today().isoformat(),
         "python": platform.python_version(), "jax": jax.__version__,
         "device": jax.devices()[0].device_kind}
  report.check_output(opts.json, "--json")
  if opts.step == "layerwise" and not opts.remat:
    raise ValueError("bench qlora: --step layerwise recomputes each layer "
                     "(gradient checkpointing); use --step jit with "
                     "--no-remat")
  mesh = None
  if opts.mesh is not None:
    mesh = convert.parse_mesh(opts.mesh)
    train_mesh.check_batch_size(opts.batch, mesh,
                           prefix="bench qlora: --batch ")
    doc["mesh"] = dict(mesh.shape)
  doc["devices"] = 1 if mesh is None else mesh.size
  t0 = time.perf_counter()
  cfg, model, optimizer = _build(opts, shape)
  if mesh is not None:
    train.shard_for_training(model, optimizer, mesh)
  jax.block_until_ready(nnx.state(model))
  gc.collect()
  doc["build_s"] = time.perf_counter() - t0
  doc["bytes_in_use_after_build"] = _max_stat("bytes_in_use")
  doc["adapter_parameters"] = int(sum(
      x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
  in_use = doc["bytes_in_use_after_build"]
  report.log(f"{opts.impl}: built in {doc['build_s']:.1f}s, "
             + ("memory in use unknown (the device reports none), "
                if in_use is None else f"{in_use / 2**30:.2f} GiB in use, ")
             +              f"{doc['adapter_parameters']:,} adapter parameters")
  key = jax.random.key(0)
  ids = jax.random.randint(key, (1, opts.batch, opts.seq), 0,
                           min(cfg.vocab_size, 128000), jnp.int32)
  ones = jnp.ones(ids.shape, bool)
  batch = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
  if mesh is not None:  # [1, B, T]: B over "data" x "fsdp"
    where = train_mesh.batch_sharding(mesh, 3, 1)
    batch = {k: jax.device_put(v, where) for k, v in batch.items()}
  times, losses = [], []
  for step in range(opts.warmup + opts.steps):
    t = time.perf_counter()
    if opts.step == "layerwise":
      out = train.layerwise_train_step(model, optimizer, batch)
    else:
      out = train.train_step(model, optimizer, batch, remat=opts.remat)
    loss = float(out["loss"])  # waits for the step
    dt = time.perf_counter() - t
    losses.append(loss)
    if step >= opts.warmup:
      times.append(dt)
    report.log(f"  step {step}: loss {loss:.3f}, {dt * 1e3:.0f} ms")
  med = statistics.median(times)
  doc.update(step_s=med, steps_s=times, losses=losses,
             tokens_per_s=opts.batch * opts.seq / med,
             peak_bytes_in_use=_max_stat("peak_bytes_in_use"))
  doc.update(estimate_doc(opts, cfg))
  if opts.json:
    report.write_json(doc, opts.json)
  return doc


def estimate_doc(opts: argparse.Namespace, cfg) -> dict:
  """`estimate_bytes` and `estimate` (the parts) of a run's settings.

  `estimate_training_memory` with the run's optimizer, and the head in
  `layerwise_train_step`'s chunks (`--step layerwise`) or all tokens at
  once (`--step jit`: `train_step`).
  """
  est = models.estimate_training_memory(
      cfg, weights="nf4+dq" if opts.impl == "jax-nf4-dq" else "bf16",
      batch=opts.batch, seq=opts.seq, lora_r=opts.lora_r,
      target_modules=TARGETS, remat=opts.remat, optimizer=opts.optimizer,
      head_chunk=(train_layerwise.DEFAULT_CHUNK
                  if opts.step == "layerwise" else None))
  return {"estimate_bytes": est.total_bytes, "estimate": est.breakdown()}


def qlora_table(docs: list[dict]) -> list[str]:
  """Markdown rows: implementation, tokens/s, step, peak, estimate."""
  rows = []
  for d in docs:
    peak = d.get("peak_bytes_in_use")
    est = d.get("estimate_bytes")
    mesh = ",".join(f"{k}={v}" for k, v in (d.get("mesh") or {}).items())
    rows.append([
        d["impl"] + (f" ({mesh})" if mesh else ""),
        f"{d['batch']}x{d['seq']}", f"{d['tokens_per_s']:,.0f}",
        f"{d['step_s'] * 1e3:.0f} ms",
        report.fmt(peak / 2**30 if peak else None, " GiB"),
        report.fmt(est / 2**30 if est else None, " GiB")])
  return report.markdown_table(
      ["impl", "batch x seq", "tokens/s", "step", "peak memory (per device)",
       "jaxbnb estimate --train (one device)"], rows)


def add_parsers(sub) -> None:
  """Adds `qlora` to the `jaxbnb bench` subcommands.

  Args:
    sub: the subparsers action of `jaxbnb bench`.
  """
  p = sub.add_parser("qlora", help="(Q)LoRA training step tokens/s and peak "
                     "memory of a random Llama-shaped model")
  p.add_argument("--impl", choices=IMPLS, required=True)
  p.add_argument("--shape", choices=sorted(bench_decode.SHAPES),
                 default="llama-3-8b")
  p.add_argument("--layers", type=argtypes.number(int, 0), default=0,
                 help="override the number of layers (0: the shape's)")
  p.add_argument("--batch", type=argtypes.number(int, 1), default=2)
  p.add_argument("--seq", type=argtypes.number(int, 2), default=2048)
  p.add_argument("--lora-r", type=argtypes.number(int, 1), default=16)
  p.add_argument("--lora-alpha", type=argtypes.number(float, 0,
                                                      lo_open=True),
                 default=32.0)
  p.add_argument("--optimizer", choices=train.OPTIMIZERS,
                 default="paged_adamw8bit")
  p.add_argument("--no-remat", dest="remat", action="store_false",
                 help="keep every layer's activations (no gradient "
                 "checkpointing)")
  p.add_argument("--step", choices=("layerwise", "jit"),
                 default="layerwise",
                 help="layerwise: `train.layerwise_train_step` (one compiled "
                 "program per layer kind, what `finetune` runs with remat); "
                 "jit: `train.train_step`, the whole step one program")
  p.add_argument("--warmup", type=argtypes.number(int, 0), default=3)
  p.add_argument("--steps", type=argtypes.number(int, 1), default=10)
  p.add_argument("--mesh", default=None, metavar="AXES",
                 help="split the run over a device mesh as `finetune "
                 "--mesh` does, e.g. 'fsdp=2' or 'data=2,fsdp=4' (sizes "
                 "multiply to the number of devices); --batch is global")
  p.add_argument("--json", help="write the JSON document here")

  def run(opts):
    doc = run_qlora(opts)
    print("\n".join(qlora_table([doc])))
    return 0
  p.set_defaults(func=run)

  rep = sub.add_parser("qlora-report", help="qlora JSON results -> "
                       "markdown table")
  rep.add_argument("--inputs", nargs="+", required=True)

  def run_report(opts):
    print("\n".join(qlora_table(report.read_results(opts.inputs,
                                                     ("qlora",)))))
    return 0
  rep.set_defaults(func=run_report)
