"""`finetune`: the training loop, its output folder and its metrics.

The output folder `OUT` receives, as training goes:

* `finetune.json`: the `TrainConfig`, the `LoRAConfig` and data sizes;
* `metrics.jsonl`: one JSON object per logged step (`step`, `loss`, `lr`,
  `grad_norm`, `tokens_per_s`, `tokens`, `elapsed_s`) and per evaluation
  (`step`, `eval_loss`, `eval_ppl`);
* `checkpoints/step_XXXXXXXX/`: resumable checkpoints (see
  `checkpoint.py`);

and at the end the adapter in PEFT's format (`adapter_config.json`,
`adapter_model.safetensors`, `jaxbnb.lora.save_adapter`) and `loss.png`
(when matplotlib is installed).

A run that fails or is interrupted (any exception, Ctrl-C; on the command
line SIGTERM too) before its first checkpoint removes the folder it created
(or, in a folder it did not create, the files it wrote); after a checkpoint
the folder stays, resumable (`resume=True`), and never holds a partial
adapter. A run killed outright (SIGKILL) before its first checkpoint leaves
`finetune.json` and `metrics.jsonl` only: `resume=True` there starts afresh.

With several processes (`jax.distributed`, one per host) every process
runs `finetune` with the same arguments and `out_dir` on a file system they
share; process 0 writes the files, each process its shards of the
checkpoints.

matplotlib (optional) and tqdm (slow to import) are imported where they are
used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbnb._src.io import paths
from jaxbnb._src.io import processes
from jaxbnb._src.io import sharding as sharding_lib
from jaxbnb._src.io.peft import ADAPTER_CONFIG
from jaxbnb._src.io.peft import ADAPTER_WEIGHTS
from jaxbnb._src.io.peft import save_adapter
from jaxbnb._src.layers.lora import LoRAConfig
from jaxbnb._src.layers.lora import apply_lora
from jaxbnb._src.layers.lora import find_targets
from jaxbnb._src.layers.lora import lora_layers
from jaxbnb._src.train import checkpoint
from jaxbnb._src.train import mesh as mesh_lib
from jaxbnb._src.train.config import RESUME_FIELDS
from jaxbnb._src.train.config import TrainConfig
from jaxbnb._src.train.data import TokenizedData
from jaxbnb._src.train.data import batch_arrays
from jaxbnb._src.train.data import batch_indices
from jaxbnb._src.train.data import prepare_data
from jaxbnb._src.train.layerwise import layerwise_train_step
from jaxbnb._src.train.layerwise import supports_layerwise
from jaxbnb._src.train.step import commit_to_device
from jaxbnb._src.train.step import evaluate
from jaxbnb._src.train.step import learning_rate_schedule
from jaxbnb._src.train.step import make_optimizer
from jaxbnb._src.train.step import train_step

__all__ = ["FinetuneResult", "finetune", "METRICS", "RUN_INFO", "LOSS_PLOT",
           "read_metrics", "plot_losses", "check_out_dir"]

METRICS = "metrics.jsonl"
RUN_INFO = "finetune.json"
LOSS_PLOT = "loss.png"
# What a run writes into OUT (and `overwrite=True` removes first).
_OWN = (METRICS, RUN_INFO, LOSS_PLOT, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
        checkpoint.CHECKPOINTS)


@dataclasses.dataclass(frozen=True, eq=False)
class FinetuneResult:
  """What `finetune` did.

  Attributes:
    model: the model with its trained adapters (the one passed in).
    out_dir: the absolute output folder.
    steps: the steps this call ran (1-based; after a resume they start
      after the checkpoint's step).
    losses: the training loss of each of `steps`.
    evals: `(step, eval_loss, eval_ppl)` of each evaluation this call ran
      (step 0 is before training).
    start_step: the step the run resumed from (0 for a fresh run).
    seconds: wall time of this call.
  """

  model: nnx.Module = dataclasses.field(repr=False)
  out_dir: str
  steps: tuple[int, ...]
  losses: tuple[float, ...]
  evals: tuple[tuple[int, float, float], ...]
  start_step: int
  seconds: float

  @property
  def eval_ppl(self) -> float | None:
    """The last evaluation's perplexity (None without a held-out split)."""
    return self.evals[-1][2] if self.evals else None


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of `OUT/metrics.jsonl` (empty when there is none)."""
  path = os.path.join(os.fspath(out_dir), METRICS)
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(out_dir: str | os.PathLike, path: str | None = None, *,
                title: str | None = None) -> str | None:
  """Draws the loss curves of `OUT/metrics.jsonl` as a PNG.

  Training loss per logged step, and the held-out loss of each evaluation.

  Args:
    out_dir: the run's output folder.
    path: the PNG to write (default `OUT/loss.png`).
    title: an optional plot title.

  Returns:
    The path written, or None when matplotlib is not installed.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = read_metrics(out_dir)
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
  if train:
    ax.plot(*zip(*train), label="train loss", lw=1.2)
  if held:
    ax.plot(*zip(*held), "o-", label="held-out loss", lw=1.2, ms=4)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  path = path or os.path.join(os.fspath(out_dir), LOSS_PLOT)
  paths.write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
  plt.close(fig)
  return path


def check_out_dir(out_dir: str | os.PathLike, *, resume: bool,
                  overwrite: bool) -> tuple[str, str | None]:
  """Checks where a run may write.

  Returns:
    `(absolute out_dir, checkpoint folder to resume from or None)`.

  Raises:
    ValueError: `out_dir` is a file, or `resume` and `overwrite` are both
      set.
    FileExistsError: a non-empty folder without `resume` or `overwrite`,
      or `resume` on a non-empty folder without a checkpoint (except one
      holding only a killed run's `finetune.json` / `metrics.jsonl`, where
      `resume` starts afresh).
  """
  out = os.path.abspath(os.fspath(out_dir))
  if resume and overwrite:
    raise ValueError("finetune: pass resume or overwrite, not both.")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"finetune: {out!r} exists and is not a folder.")
  entries = os.listdir(out) if os.path.isdir(out) else []
  if resume:
    found = checkpoint.list_checkpoints(out)
    if found:
      return out, found[-1][1]
    if entries and not _only_started(out, entries):
      raise FileExistsError(
          f"finetune: {out!r} holds no checkpoint to resume from (and is "
          "not empty); pass overwrite to start again there.")
    return out, None
  if entries and not overwrite:
    raise FileExistsError(
        f"finetune: {out!r} already exists and is not empty; resume the run "
        "in it (resume=True, --resume) or replace it (overwrite=True, "
        "--overwrite).")
  return out, None


def _only_started(out: str, entries: list[str]) -> bool:
  """Whether `out` holds only what a run writes before its first
  checkpoint (`finetune.json`, `metrics.jsonl`, an empty or unfinished
  `checkpoints`): a run killed (SIGKILL, power loss) before it could clean
  up. Resuming there starts afresh, since nothing was saved to resume."""
  return set(entries) <= {RUN_INFO, METRICS, checkpoint.CHECKPOINTS} and (
      RUN_INFO in entries or METRICS in entries)


def _append(path: str, record: dict[str, Any]) -> None:
  if not processes.is_primary():
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_metrics(out: str, step: int) -> None:
  """Drops the records after `step` (written after the checkpoint)."""
  keep = [r for r in read_metrics(out) if r.get("step", 0) <= step]
  text = "".join(json.dumps(r) + "\n" for r in keep)

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  paths.write_file_atomic(os.path.join(out, METRICS), write)


def _write_adapter(model: nnx.Module, out: str,
                   base_model_name_or_path: str | None) -> None:
  """Saves the adapter beside, then moves its two files into `out`.

  With several processes all gather the adapters; process 0 writes."""
  tmp = os.path.join(out, ".adapter.tmp")
  primary = processes.is_primary()
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)
  processes.sync("finetune:adapter")
  try:
    save_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path)
    if primary:
      for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
  finally:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
  processes.sync("finetune:adapter-written")


def _commit(*nodes: Any) -> None:
  """Commits every array of `nodes` to where it lives (memory kind kept),
  not weakly typed: as arrays restored from a checkpoint are, so a fresh
  and a resumed run call the same compiled step."""
  def commit(x):
    if not isinstance(x, jax.Array):
      return x
    return jax.device_put(jax.lax.convert_element_type(x, x.dtype),
                          x.sharding)
  for node in nodes:
    nnx.update(node, jax.tree.map(commit, nnx.state(node)))


def _check_vocab(model: nnx.Module, data: TokenizedData, what: str) -> None:
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if vocab is None:
    return
  top = int(data.input_ids.max()) if data.input_ids.size else 0
  if top >= vocab:
    raise ValueError(
        f"finetune: the {what} data has token id {top}, beyond the model's "
        f"vocabulary of {vocab} (a tokenizer of another model?).")


def _resume_mismatch(meta: dict[str, Any], config: TrainConfig,
                     lora: dict[str, Any], fingerprint: str) -> str | None:
  old = meta.get("train_config", {})
  for name in RESUME_FIELDS:
    if old.get(name) != getattr(config, name):
      return (f"{name}={old.get(name)!r} in the checkpoint, "
              f"{getattr(config, name)!r} now")
  saved = meta.get("lora_config")
  if saved != lora:
    if not isinstance(saved, dict):
      return f"the checkpoint has no LoRA settings (lora_config={saved!r})"
    diffs = [f"{k}={saved.get(k)!r} in the checkpoint, {lora.get(k)!r} now"
             for k in sorted(set(saved) | set(lora))
             if saved.get(k) != lora.get(k)]
    return "the LoRA settings differ: " + "; ".join(diffs)
  if meta.get("data_fingerprint") != fingerprint:
    return "the training data differs"
  return None


def finetune(model: nnx.Module, tokenizer: Any, data: Any,
             config: TrainConfig | None = None,
             lora_config: LoRAConfig | None = None,
             out_dir: str | os.PathLike = "finetune-out", *,
             resume: bool = False, overwrite: bool = False,
             rngs: nnx.Rngs, eval_data: Any = None, progress: bool = True,
             base_model_name_or_path: str | None = None,
             callback: Callable[[int, dict[str, Any]], None] | None = None,
             mesh: jax.sharding.Mesh | None = None,
             sharding: sharding_lib.ShardingRules | Mapping | None = None,
             ) -> FinetuneResult:
  """Fine-tunes LoRA adapters of a (4-bit) model on text or chat data.

  Adds adapters (`jaxbnb.lora.apply_lora(model, lora_config)`) unless the
  model has some already, then trains only them (`nnx.LoRAParam`) with
  `TrainConfig.optimizer` (bitsandbytes' 8-bit AdamW by default), a warmup
  + cosine learning rate, gradient clipping and accumulation, and optional
  per-layer gradient checkpointing. The base model's dtype is the compute
  dtype (a 4-bit layer computes in its `compute_dtype`); the adapters and
  their optimizer state are float32, the loss a float32 log-softmax.

  Resumable: every `save_every` steps (and after the last) the adapters,
  the optimizer state, the dropout RNG state and the data position are
  checkpointed in `OUT/checkpoints`; `resume=True` continues from the
  latest one and computes exactly the losses the uninterrupted run would
  have (same settings and data required; the message names a difference).

  On a device mesh (FSDP-QLoRA, `mesh=`): the frozen base is split by
  `sharding`'s rules (a base loaded with `from_pretrained(..., mesh=mesh)`
  already is), each adapter along its largest dimension over "fsdp", the
  optimizer state like its parameter, and every batch along its batch
  axis over "data" and "fsdp" (see `jaxbnb.train.shard_for_training` and
  docs/distributed.md). The losses are the single-device run's up to
  float summation order. Checkpoints are written sharded and resume on any
  mesh (or one device): they hold global arrays.

  Args:
    model: the base model (e.g. `jaxbnb.convert.from_pretrained(path,
      quantization=QuantizationConfig.nf4())`), modified in place.
    tokenizer: encodes the data (see `jaxbnb.train.prepare_data`); may be
      None when `data` is a `TokenizedData`.
    data: a `.txt` or `.jsonl` path, a list of documents or records, or a
      `TokenizedData`.
    config: the `TrainConfig` (default `TrainConfig()`).
    lora_config: the adapters to add (default `LoRAConfig()`); must be None
      for a model that already has adapters.
    out_dir: the output folder.
    resume: continue from the latest checkpoint in `out_dir` (a missing or
      empty folder starts a fresh run).
    overwrite: start afresh in a non-empty `out_dir` (removing a previous
      run's files; other files are kept).
    rngs: random generators for the adapters' initial values and dropout.
    eval_data: held-out data like `data` (default: the last
      `config.eval_split` of `data`).
    progress: show a tqdm progress bar (loss and tokens/s).
    base_model_name_or_path: recorded in `adapter_config.json` (default: the
      checkpoint the model was loaded from).
    callback: called as `callback(step, metrics)` after each step.
    mesh: a `jax.sharding.Mesh` (axes among "data", "fsdp", "tensor", e.g.
      `jaxbnb.convert.parse_mesh("data=2,fsdp=4")`) to train on. Default:
      the mesh the model's weights are already sharded on, if any, else one
      device.
    sharding: `ShardingRules` (or a dict of its fields) for the base;
      default `ShardingRules()`. Needs a mesh.

  Returns:
    A `FinetuneResult`.

  Raises:
    TypeError: `config`, `lora_config` or `mesh` of the wrong type.
    ValueError: unusable data, a `seq_len` beyond the model's
      `max_position_embeddings`, targets that match no linear layer, a
      model with adapters and a `lora_config`, a checkpoint made with other
      settings or data, `sharding` without a mesh, a `batch_size` that the
      mesh's "data" x "fsdp" size does not divide, or an axis of the rules
      that does not divide the dimension it splits.
    FileExistsError: a non-empty `out_dir` without `resume` or `overwrite`.

  Examples:
    >>> import tempfile
    >>> from flax import nnx
    >>> from jaxbnb import models
    >>> from jaxbnb.lora import LoRAConfig
    >>> from jaxbnb.train import TokenizedData, TrainConfig, finetune
    >>> import numpy as np
    >>> cfg = models.LlamaConfig(vocab_size=32, hidden_size=32,
    ...                          intermediate_size=64, num_hidden_layers=1,
    ...                          num_attention_heads=4, num_key_value_heads=2)
    >>> model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> ids = np.tile(np.arange(16) % 8, (8, 1))
    >>> data = TokenizedData(ids, np.ones_like(ids, bool),
    ...                      np.ones_like(ids, bool))
    >>> with tempfile.TemporaryDirectory() as out:
    ...   result = finetune(model, None, data,
    ...                     TrainConfig(steps=20, batch_size=4, seq_len=16,
    ...                                 learning_rate=1e-2, optimizer="adamw",
    ...                                 eval_split=0),
    ...                     LoRAConfig(r=4, target_modules="all-linear"),
    ...                     out, rngs=nnx.Rngs(1), progress=False)
    >>> result.losses[-1] < result.losses[0]
    True
  """
  t_start = time.perf_counter()
  config = TrainConfig() if config is None else config
  if not isinstance(config, TrainConfig):
    raise TypeError("finetune: `config` must be a TrainConfig, got "
                    f"{type(config).__name__}.")
  if lora_config is not None and not isinstance(lora_config, LoRAConfig):
    raise TypeError("finetune: `lora_config` must be a LoRAConfig or None, "
                    f"got {type(lora_config).__name__}.")
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError("finetune: `mesh` must be a jax.sharding.Mesh or None, "
                    f"got {type(mesh).__name__}.")
  mesh = mesh if mesh is not None else mesh_lib.model_mesh(model)
  if sharding is not None and mesh is None:
    raise ValueError("finetune: `sharding` needs a `mesh`.")
  if mesh is not None:
    mesh_lib.check_batch_size(config.batch_size, mesh, sharding)
  max_pos = getattr(getattr(model, "config", None), "max_position_embeddings",
                    None)
  if max_pos is not None and config.seq_len > max_pos:
    raise ValueError(
        f"finetune: seq_len={config.seq_len} exceeds the model's "
        f"max_position_embeddings={max_pos}.")

  # Everything that can fail on the inputs fails before OUT is touched.
  train = prepare_data(tokenizer, data, config.seq_len)
  if eval_data is not None:
    held_out = prepare_data(tokenizer, eval_data, config.seq_len)
  else:
    train, held_out = train.split(config.eval_split)
  _check_vocab(model, train, "training")
  if held_out is not None:
    _check_vocab(model, held_out, "held-out")
  has_adapters = bool(lora_layers(model))
  if has_adapters and lora_config is not None:
    raise ValueError("finetune: the model already has LoRA adapters; pass "
                     "lora_config=None to train them, or unload them first.")
  if not has_adapters:
    lora_config = LoRAConfig() if lora_config is None else lora_config
    find_targets(model, lora_config)  # a clear error before anything else
  out, resume_from = check_out_dir(out_dir, resume=resume,
                                   overwrite=overwrite)
  paths.check_destination(out, paths.source_of(model), "finetune")
  lora_dict = (lora_layers(model)[0][1].config if has_adapters
               else lora_config).to_dict()
  fingerprint = train.fingerprint()
  meta = None
  if resume_from is not None:
    meta = checkpoint.read_meta(resume_from)
    why = _resume_mismatch(meta, config, lora_dict, fingerprint)
    if why:
      raise ValueError(
          f"finetune: cannot resume from {resume_from!r}: {why}. Resume "
          "with the checkpoint's settings and data, or start again with "
          "overwrite.")

  if not has_adapters:
    model = apply_lora(model, lora_config, rngs=rngs)
  optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.LoRAParam)
  if mesh is None:
    commit_to_device(model, optimizer)
  else:
    mesh_lib.shard_for_training(model, optimizer, mesh, sharding)
  _commit(model, optimizer)
  start_step, position = 0, 0
  if meta is not None:
    checkpoint.restore_checkpoint(resume_from, model, optimizer)
    start_step, position = int(meta["step"]), int(meta["data_position"])

  created = not os.path.exists(out)
  # With several processes, process 0 writes the folder's files (orbax
  # checkpoints: each process its shards) once every process has checked it.
  processes.sync("finetune:checked")
  primary = processes.is_primary()
  if primary:
    if overwrite and os.path.isdir(out):
      _remove_own(out)
    os.makedirs(out, exist_ok=True)
  processes.sync("finetune:ready")
  try:
    return _run(model, optimizer, train, held_out, config, out, lora_dict,
                fingerprint, start_step, position, progress,
                base_model_name_or_path, callback, t_start, mesh, sharding)
  except BaseException:
    if primary and not checkpoint.list_checkpoints(out):
      # nothing resumable: leave the folder as it was found
      if created:
        shutil.rmtree(out, ignore_errors=True)
      else:
        _remove_own(out)
    raise


def _remove_own(out: str) -> None:
  """Removes the files a run writes into `out` (others are kept)."""
  for name in _OWN:
    p = os.path.join(out, name)
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    elif os.path.lexists(p):
      os.remove(p)


def _run(model, optimizer, train, held_out, config, out, lora_dict,
         fingerprint, start_step, position, progress,
         base_model_name_or_path, callback, t_start, mesh=None,
         sharding=None) -> FinetuneResult:
  metrics_path = os.path.join(out, METRICS)
  primary = processes.is_primary()
  if primary and start_step:
    _truncate_metrics(out, start_step)
  elif primary:
    open(metrics_path, "w", encoding="utf-8").close()
  info = {"train_config": config.to_dict(), "lora_config": lora_dict,
          "train_sequences": len(train), "train_targets": train.num_targets,
          "eval_sequences": 0 if held_out is None else len(held_out),
          "eval_targets": 0 if held_out is None else held_out.num_targets,
          "data_fingerprint": fingerprint}
  if primary:
    with open(os.path.join(out, RUN_INFO), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=1, sort_keys=True)
  ckpt_meta = {k: info[k] for k in ("train_config", "lora_config",
                                    "data_fingerprint")}

  evals: list[tuple[int, float, float]] = []

  def run_eval(step):
    model.eval()
    loss, ppl = evaluate(model, held_out, config.batch_size, mesh=mesh,
                         sharding=sharding)
    model.train()
    evals.append((step, loss, ppl))
    _append(metrics_path, {"step": step, "eval_loss": loss, "eval_ppl": ppl})
    return loss, ppl

  def save(step, pos):
    checkpoint.save_checkpoint(out, step, model, optimizer,
                               dict(ckpt_meta, data_position=pos),
                               keep=config.keep_checkpoints)

  bar = None
  if progress and primary:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=config.steps, initial=start_step, desc="finetune",
               unit="step")
  lr_at = learning_rate_schedule(config)
  shape = (config.grad_accum, config.batch_size)
  per_step = config.sequences_per_step
  steps, losses = [], []
  saved = start_step
  model.train()
  try:
    if held_out is not None and start_step == 0:
      run_eval(0)
    # With remat, one compiled program per layer kind instead of one per
    # layer (the same numbers; see train/layerwise.py).
    layerwise = config.remat and supports_layerwise(model)
    elapsed = 0.0
    warm_time, warm_tokens = 0.0, 0  # after this call's first (compiling) step
    for step in range(start_step + 1, config.steps + 1):
      index = batch_indices(len(train), position, per_step, config.seed)
      arrays = batch_arrays(train, index, shape)
      if mesh is None:
        batch = {k: jnp.asarray(v) for k, v in arrays.items()}
      else:  # [A, B, T]: B over "data" x "fsdp"
        where = mesh_lib.batch_sharding(mesh, 3, 1, sharding)
        batch = {k: mesh_lib.put(v, where) for k, v in arrays.items()}
      t0 = time.perf_counter()
      if layerwise:
        out_step = layerwise_train_step(model, optimizer, batch)
      else:
        out_step = train_step(model, optimizer, batch, remat=config.remat)
      loss = float(out_step["loss"])
      dt = time.perf_counter() - t0
      position += per_step
      real = int(arrays["attention_mask"].sum())
      elapsed += dt
      if step > start_step + 1:
        warm_time += dt
        warm_tokens += real
      record = {"step": step, "loss": loss,
                "lr": float(lr_at(step - 1)),
                "grad_norm": float(out_step["grad_norm"]),
                "tokens_per_s": real / max(dt, 1e-9), "tokens": real,
                "elapsed_s": round(elapsed, 4)}
      steps.append(step)
      losses.append(loss)
      if step % config.log_every == 0 or step == config.steps:
        _append(metrics_path, record)
      if bar is not None:
        rate = (warm_tokens / warm_time if warm_time else
                record["tokens_per_s"])
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
        bar.update(1)
      if held_out is not None and config.eval_every and (
          step % config.eval_every == 0) and step != config.steps:
        run_eval(step)
      if config.save_every and step % config.save_every == 0:
        save(step, position)
        saved = step
      if callback is not None:
        callback(step, record)
    if held_out is not None and start_step < config.steps:
      run_eval(config.steps)
    if saved != config.steps:
      save(config.steps, position)
  finally:
    model.eval()
    if bar is not None:
      bar.close()
  _write_adapter(model, out, base_model_name_or_path)
  if primary:
    plot_losses(out)
  return FinetuneResult(
      model=model, out_dir=out, steps=tuple(steps), losses=tuple(losses),
      evals=tuple(evals), start_step=start_step,
      seconds=time.perf_counter() - t_start)
