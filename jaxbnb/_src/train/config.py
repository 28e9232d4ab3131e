"""`TrainConfig`: the static settings of a fine-tuning run."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["OPTIMIZERS", "TrainConfig", "RESUME_FIELDS"]

OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "adamw")
# Fields that change the numbers a run computes: a checkpoint resumes only
# under the same values (the others only change logging and saving).
RESUME_FIELDS = ("steps", "batch_size", "seq_len", "learning_rate",
                 "warmup_steps", "weight_decay", "max_grad_norm",
                 "grad_accum", "seed", "optimizer", "eval_split")


def _int(name: str, value: Any, lo: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    raise ValueError(f"TrainConfig: `{name}` must be an int >= {lo}, got "
                     f"{value!r}.")


def _float(name: str, value: Any, lo: float, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> None:
  ok = (not isinstance(value, bool) and isinstance(value, (int, float))
        and math.isfinite(value))
  if ok:
    ok = value > lo if lo_open else value >= lo
  if ok and hi is not None:
    ok = value < hi if hi_open else value <= hi
  if not ok:
    rng = (f"{'(' if lo_open else '['}{lo}, "
           f"{'inf)' if hi is None else str(hi) + (')' if hi_open else ']')}")
    raise ValueError(f"TrainConfig: `{name}` must be a number in {rng}, got "
                     f"{value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Settings of a LoRA/QLoRA fine-tuning run (`jaxbnb.train.finetune`).

  One optimizer step consumes `batch_size * grad_accum` sequences of
  `seq_len` tokens; the loss is the mean over their target tokens.

  Attributes:
    steps: optimizer steps (> 0).
    batch_size: sequences per micro-batch (one forward/backward pass).
    seq_len: tokens per sequence (at most the model's
      `max_position_embeddings`).
    learning_rate: peak learning rate (> 0).
    warmup_steps: steps of linear warmup (step k, counted from 1, uses
      `learning_rate * k / warmup_steps`), then a cosine decay from
      `learning_rate` towards 0 over the remaining steps (see
      `jaxbnb.train.learning_rate_schedule`); at most `steps`.
    weight_decay: decoupled weight decay (AdamW) of the adapters.
    max_grad_norm: clip the gradient to this global norm
      (`optax.clip_by_global_norm`); 0 disables clipping.
    grad_accum: micro-batches per optimizer step; their summed token loss
      is divided by their total number of target tokens, so the step equals
      one step on the `batch_size * grad_accum` batch.
    seed: shuffles the training sequences (a new order each epoch).
    eval_every: evaluate the held-out split every this many steps (0: only
      before the first and after the last step).
    log_every: write a `metrics.jsonl` line every this many steps (and the
      last).
    save_every: write a resumable checkpoint every this many steps (0: only
      after the last).
    eval_split: fraction of the data held out for evaluation, in [0, 1).
    remat: recompute each decoder layer's activations in the backward pass
      (gradient checkpointing): less memory, about a third more compute.
    optimizer: "adamw8bit" (bitsandbytes' 8-bit AdamW, the default),
      "paged_adamw8bit" (its states in host memory) or "adamw" (optax,
      float32 states).
    keep_checkpoints: how many of the latest checkpoints to keep (>= 1).

  Raises:
    ValueError: a value out of range or an unknown optimizer.

  Examples:
    >>> from jaxbnb.train import TrainConfig
    >>> cfg = TrainConfig(steps=50, batch_size=4, seq_len=128, grad_accum=2)
    >>> cfg.sequences_per_step, cfg.optimizer
    (8, 'adamw8bit')
  """

  steps: int = 100
  batch_size: int = 4
  seq_len: int = 512
  learning_rate: float = 2e-4
  warmup_steps: int = 0
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  grad_accum: int = 1
  seed: int = 0
  eval_every: int = 0
  log_every: int = 1
  save_every: int = 0
  eval_split: float = 0.1
  remat: bool = False
  optimizer: str = "adamw8bit"
  keep_checkpoints: int = 2

  def __post_init__(self):
    _int("steps", self.steps, 1)
    _int("batch_size", self.batch_size, 1)
    _int("seq_len", self.seq_len, 2)
    _float("learning_rate", self.learning_rate, 0, lo_open=True)
    _int("warmup_steps", self.warmup_steps, 0)
    if self.warmup_steps > self.steps:
      raise ValueError(f"TrainConfig: `warmup_steps` ({self.warmup_steps}) "
                       f"must be at most `steps` ({self.steps}).")
    _float("weight_decay", self.weight_decay, 0)
    _float("max_grad_norm", self.max_grad_norm, 0)
    _int("grad_accum", self.grad_accum, 1)
    _int("seed", self.seed, 0)
    _int("eval_every", self.eval_every, 0)
    _int("log_every", self.log_every, 1)
    _int("save_every", self.save_every, 0)
    _float("eval_split", self.eval_split, 0, 1, hi_open=True)
    _int("keep_checkpoints", self.keep_checkpoints, 1)
    if not isinstance(self.remat, bool):
      raise ValueError(f"TrainConfig: `remat` must be a bool, got "
                       f"{self.remat!r}.")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"TrainConfig: `optimizer` must be one of "
                       f"{list(OPTIMIZERS)}, got {self.optimizer!r}.")

  @property
  def sequences_per_step(self) -> int:
    """Sequences one optimizer step consumes: `batch_size * grad_accum`."""
    return self.batch_size * self.grad_accum

  def to_dict(self) -> dict[str, Any]:
    """The fields as a JSON-ready dict."""
    return dataclasses.asdict(self)
