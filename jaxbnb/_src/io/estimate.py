"""How much memory a Llama-family model needs in each weight format.

`estimate_memory` counts parameters from the architecture alone (a
`LlamaConfig`, an HF `config.json` dict, an HF folder or GGUF file, or a
well-known model name) and returns the bytes of the weights as

  * fp32, and fp16/bf16 (2 bytes per parameter);
  * int8: LLM.int8 (bitsandbytes `Linear8bitLt`): int8 linear weights plus a
    float32 scale per output row (`SCB`); embeddings, norms, biases and
    `lm_head` stay 16-bit;
  * nf4 / fp4 (same size): linear weights packed two per byte plus a float32
    absmax per block of `blocksize` and the 16-entry float32 code; the rest
    16-bit, `lm_head` included (transformers' default skip);
  * nf4 + double quantization: the absmax as uint8 codes, with a float32
    absmax per 256 of them, a 256-entry float32 code and a float32 offset.

The 4-bit numbers are exactly what `jaxbnb` allocates for a
`LlamaForCausalLM` with bf16 `param_dtype` (see `jaxbnb.nnx.memory_footprint`).

Which GPUs fit: weights times `headroom` (1.2 by default: HF accelerate's
model-memory estimator advises adding up to 20% for inference, after
EleutherAI's measurements) must fit in the card's memory (GiB). The KV cache
(`kv_cache_bytes`) comes on top and grows with batch and context.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from jaxbnb._src.io import gguf_source
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.quant import validation

__all__ = ["MemoryEstimate", "TrainingMemoryEstimate", "estimate_memory",
           "estimate_training_memory", "KNOWN_MODELS", "GPU_SIZES_GB",
           "FORMATS", "PROJECTIONS"]

GPU_SIZES_GB = (8, 12, 16, 24, 40, 48, 80)
FORMATS = ("fp32", "bf16", "int8", "nf4", "nf4+dq")
_FORMAT_LABELS = {"fp32": "fp32", "bf16": "fp16/bf16", "int8": "int8 (LLM.int8)",
                  "nf4": "nf4/fp4", "nf4+dq": "nf4/fp4 + double quant"}
_NESTED_BLOCK = 256  # bitsandbytes' block size for double quantization

# HF config.json fields of some well-known models (architecture only).
_COMMON = dict(hidden_act="silu", model_type="llama")
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048,
                           intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4,
                       attention_bias=True, model_type="qwen2",
                       max_position_embeddings=32768),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072,
                         intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8,
                         head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192,
                        intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=8192),
}
for _cfg in KNOWN_MODELS.values():
  for _k, _v in _COMMON.items():
    _cfg.setdefault(_k, _v)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Weight memory of one architecture in each format.

  Attributes:
    name: model name or path it was computed for.
    num_parameters: all parameters (a tied head counted once).
    linear_parameters: elements of the quantizable linear weights (attention
      and MLP projections; not `lm_head`).
    weight_bytes: format ("fp32", "bf16", "int8", "nf4", "nf4+dq") -> bytes.
    kv_cache_bytes_per_token: bf16 K and V of all layers for one token.
    blocksize: 4-bit absmax block size used.
    headroom: multiplier applied to the weights when checking GPU fit.
  """

  name: str
  num_parameters: int
  linear_parameters: int
  weight_bytes: Mapping[str, int]
  kv_cache_bytes_per_token: int
  blocksize: int = 64
  headroom: float = 1.2

  def kv_cache_bytes(self, tokens: int, batch: int = 1) -> int:
    """bf16 KV cache bytes for `batch` sequences of `tokens` tokens."""
    return self.kv_cache_bytes_per_token * tokens * batch

  def required_bytes(self, fmt: str, *, tokens: int = 0,
                     batch: int = 1) -> int:
    """Weights x headroom, plus the KV cache of `tokens` x `batch`."""
    if fmt not in self.weight_bytes:
      raise ValueError(f"MemoryEstimate: unknown format {fmt!r}; expected one "
                       f"of {list(self.weight_bytes)}")
    return (math.ceil(self.weight_bytes[fmt] * self.headroom)
            + self.kv_cache_bytes(tokens, batch))

  def fits(self, fmt: str, *, tokens: int = 0, batch: int = 1,
           gpu_sizes_gb=GPU_SIZES_GB) -> list[int]:
    """GPU sizes (GiB) from `gpu_sizes_gb` that hold `required_bytes`."""
    need = self.required_bytes(fmt, tokens=tokens, batch=batch)
    return [g for g in gpu_sizes_gb if need <= g * 2**30]

  def smallest_gpu(self, fmt: str, **kwargs) -> int | None:
    """Smallest size in `GPU_SIZES_GB` that fits, or None."""
    sizes = self.fits(fmt, **kwargs)
    return sizes[0] if sizes else None

  def to_markdown(self, *, tokens: int = 0, batch: int = 1) -> str:
    """A markdown table: format, weight GiB, with headroom, smallest GPU."""
    lines = [
        f"{self.name}: {self.num_parameters:,} parameters "
        f"({self.linear_parameters:,} in quantizable linears), 4-bit block "
        f"size {self.blocksize}, headroom x{self.headroom:g}"
        + (f", KV cache {tokens} tokens x {batch}" if tokens else ""),
        "",
        "| format | weights | x headroom" + (" + KV" if tokens else "")
        + " | smallest GPU |",
        "| --- | --- | --- | --- |",
    ]
    for fmt in self.weight_bytes:
      need = self.required_bytes(fmt, tokens=tokens, batch=batch)
      gpu = self.smallest_gpu(fmt, tokens=tokens, batch=batch)
      lines.append(
          f"| {_FORMAT_LABELS.get(fmt, fmt)} | {_gib(self.weight_bytes[fmt])} "
          f"| {_gib(need)} | {f'{gpu} GB' if gpu else '> 80 GB'} |")
    lines.append("")
    lines.append(f"KV cache (bf16): {self.kv_cache_bytes_per_token:,} bytes "
                 "per token")
    return "\n".join(lines)


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _resolve_config(config) -> tuple[str, LlamaConfig]:
  if isinstance(config, LlamaConfig):
    return "config", config
  if isinstance(config, Mapping):
    d = dict(config)
    if "model_type" not in d and "architectures" not in d:
      d["model_type"] = "llama"  # a bare shape dict
    return str(d.get("_name_or_path") or "config"), LlamaConfig.from_hf(d)
  if isinstance(config, (str, os.PathLike)):
    key = os.fspath(config)
    if key.lower() in KNOWN_MODELS:
      return key.lower(), LlamaConfig.from_hf(KNOWN_MODELS[key.lower()])
    if os.path.isdir(key):
      path = os.path.join(key, "config.json")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"estimate_memory: folder {key!r} has no "
                                "config.json")
      with open(path, encoding="utf-8") as f:
        return key, LlamaConfig.from_hf(json.load(f))
    if os.path.isfile(key):
      if key.endswith(".json"):
        with open(key, encoding="utf-8") as f:
          return key, LlamaConfig.from_hf(json.load(f))
      return key, LlamaConfig.from_hf(gguf_source.GGUFSource(key).config)
    raise ValueError(
        f"estimate_memory: `config` {key!r} is neither an existing folder or "
        f"file nor a known model name ({', '.join(KNOWN_MODELS)})")
  raise TypeError("estimate_memory: `config` must be a LlamaConfig, a config "
                  f"dict, a path or a model name, got {type(config).__name__}")


def _linears(cfg) -> list[tuple[int, int, bool]]:
  """(out, in, has_bias) of every quantizable linear (one per layer kind)."""
  h, hd = cfg.hidden_size, cfg.head_dim
  q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  i, bias, mlp_bias = cfg.intermediate_size, cfg.attention_bias, cfg.mlp_bias
  per_layer = [(q, h, bias), (kv, h, bias), (kv, h, bias),
               (h, q, cfg.o_proj_bias),
               (i, h, mlp_bias), (i, h, mlp_bias), (h, i, mlp_bias)]
  return per_layer * cfg.num_hidden_layers


def linear_shapes(config) -> list[tuple[int, int]]:
  """The distinct `[out, in]` shapes of a model's quantizable linears
  (q, k/v, o, gate/up, down; not `lm_head`), in layer order.

  Args:
    config: as `estimate_memory` takes it: a `LlamaConfig`, an HF
      `config.json` dict, a path (HF folder, config.json or `.gguf` file)
      or a name from `KNOWN_MODELS`.

  Returns:
    `(out, in)` pairs, each once.

  Example:
    >>> from jaxbnb._src.io.estimate import linear_shapes
    >>> linear_shapes("qwen2.5-7b")
    [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)]
  """
  _, cfg = _resolve_config(config)
  one_layer = _linears(dataclasses.replace(cfg, num_hidden_layers=1))
  return list(dict.fromkeys((out, inp) for out, inp, _ in one_layer))


def _check_blocksize(fn: str, blocksize) -> int:
  """`blocksize` as an int, if it is one of jaxbnb's 4-bit block sizes."""
  size = validation.as_int(blocksize)
  if size not in validation.BLOCKSIZES_4BIT:
    raise ValueError(f"{fn}: `blocksize` must be a 4-bit block size, one of "
                     f"{list(validation.BLOCKSIZES_4BIT)}, got {blocksize!r}")
  return size


def estimate_memory(config, *, blocksize: int = 64,
                    headroom: float = 1.2) -> MemoryEstimate:
  """Estimates the weight memory of a Llama-family model in each format.

  Args:
    config: a `LlamaConfig`, an HF `config.json` dict, a path (HF folder,
      config.json, or `.gguf` file) or a name from `KNOWN_MODELS`
      ("llama-3-8b", "mistral-7b", ...).
    blocksize: 4-bit absmax block size, one of
      `jaxbnb.functional`'s 4-bit block sizes (32, 64, ..., 4096).
    headroom: memory multiplier for GPU fit (activations, workspace), a
      finite number >= 1.

  Returns:
    A `MemoryEstimate`.

  Raises:
    ValueError: unknown name / missing path, bad blocksize or headroom.
    TypeError: `config` of another type.

  Example:
    >>> e = estimate_memory("llama-3-8b")
    >>> e.num_parameters
    8030261248
    >>> round(e.weight_bytes["nf4"] / 2**30, 2), e.smallest_gpu("nf4")
    (5.61, 8)
    >>> e.smallest_gpu("bf16")
    24
  """
  blocksize = _check_blocksize("estimate_memory", blocksize)
  if (isinstance(headroom, bool) or not isinstance(headroom, (int, float))
      or not math.isfinite(headroom) or headroom < 1.0):
    raise ValueError(f"estimate_memory: `headroom` must be a finite number "
                     f">= 1, got {headroom!r}")
  name, cfg = _resolve_config(config)
  linears = _linears(cfg)
  lin_w = sum(o * i for o, i, _ in linears)
  lin_b = sum(o for o, _, b in linears if b)
  norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
  embed = cfg.vocab_size * cfg.hidden_size
  head = 0 if cfg.tie_word_embeddings else embed
  other = embed + head + norms + lin_b  # kept 16-bit in quantized formats
  total = lin_w + other

  int8 = sum(o * i + 4 * o for o, i, _ in linears) + 2 * other
  nf4 = dq = 2 * other
  for o, i, _ in linears:
    n = o * i
    blocks = -(-n // blocksize)
    packed = -(-n // 2) + 16 * 4  # bytes + the 16-entry float32 code
    nf4 += packed + 4 * blocks
    dq += (packed + blocks + 4 * -(-blocks // _NESTED_BLOCK)
           + 256 * 4 + 4)
  kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
  return MemoryEstimate(
      name=name, num_parameters=total, linear_parameters=lin_w,
      weight_bytes={"fp32": 4 * total, "bf16": 2 * total, "int8": int8,
                    "nf4": nf4, "nf4+dq": dq},
      kv_cache_bytes_per_token=kv, blocksize=blocksize, headroom=headroom)


@dataclasses.dataclass(frozen=True)
class TrainingMemoryEstimate:
  """Device memory of one (Q)LoRA training step, by part.

  Attributes:
    weights: the frozen base model in its format.
    adapters: LoRA parameters, their gradient and its accumulator (float32).
    optimizer: the optimizer state of the adapters.
    saved_activations: what the backward pass keeps from the forward pass
      (with gradient checkpointing, each decoder layer's bf16 input).
    layer_working_set: the largest transient of one decoder layer's
      backward pass (its recomputed activations and their gradients).
    logits: the output head's logits, their float32 log-softmax and
      gradient.
  """

  weights: int
  adapters: int
  optimizer: int
  saved_activations: int
  layer_working_set: int
  logits: int

  @property
  def total_bytes(self) -> int:
    """The sum of the parts: the predicted peak."""
    return sum(self.breakdown().values())

  def breakdown(self) -> dict[str, int]:
    """Part name -> bytes."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def to_markdown(self) -> str:
    """A markdown table of the parts and the total."""
    lines = ["| part | memory |", "| --- | ---: |"]
    lines += [f"| {k.replace('_', ' ')} | {_gib(v)} |"
              for k, v in self.breakdown().items()]
    lines.append(f"| **total (predicted peak)** | **{_gib(self.total_bytes)}** |")
    return "\n".join(lines)


_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "adamw")
# jaxbnb's (and bitsandbytes') 8-bit optimizers keep float32 states for a
# leaf of fewer elements (`min_8bit_size`), and 8-bit states for the rest:
# a uint8 code per element and a float32 absmax per block of 256.
_MIN_8BIT_SIZE = 4096
_STATE_BLOCK = 256


def _optimizer_state_bytes(optimizer: str, leaf_sizes) -> int:
  """AdamW's two states over leaves of `leaf_sizes` elements (its scalar
  step counts left out)."""
  total = 0
  for n in leaf_sizes:
    if optimizer == "adamw" or n < _MIN_8BIT_SIZE:
      total += 2 * 4 * n
    else:
      total += 2 * (n + 4 * -(-n // _STATE_BLOCK))
  return total


# The seven projections of a decoder layer (the QLoRA targets).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")


def estimate_training_memory(config, *, weights: str = "nf4+dq",
                             batch: int = 1, seq: int = 2048,
                             lora_r: int = 16,
                             target_modules=PROJECTIONS,
                             remat: bool = True,
                             optimizer: str = "paged_adamw8bit",
                             head_chunk: int | None = 1024,
                             blocksize: int = 64) -> TrainingMemoryEstimate:
  """Predicts the peak device memory of a jaxbnb (Q)LoRA training step.

  The model of `jaxbnb.train.train_step`: bf16 compute, float32 adapters on
  the `target_modules` projections of every layer, loss in float32. Parts:

  * the frozen weights (`estimate_memory`'s bytes for `weights`);
  * adapters: 12 bytes per parameter (float32 value, gradient and the
    micro-batch accumulator), plus the optimizer's state: AdamW's two
    float32 states (8 bytes per parameter), or with an 8-bit AdamW two
    uint8 codes and a float32 absmax per 256 for each adapter matrix of
    4096 elements or more (`min_8bit_size`) and float32 states for the
    smaller ones;
  * with `remat`, each layer's bf16 input `[batch, seq, hidden]`; without,
    every layer's working set;
  * one layer's backward working set: the bf16 projections' outputs
    (q, k, v, attention output, gate, up, their product) and as many
    gradients, plus the float32 attention scores and their bf16
    probabilities `[batch, heads, seq, seq]` (the attention is not fused);
  * the logits of `head_chunk` tokens at a time (`finetune`'s layer by
    layer step; None: all tokens at once, as `train_step`): float32 logits,
    their log-softmax and its gradient (12 bytes per logit).

  Args:
    config: what `estimate_memory` takes (a name, a path, a config).
    weights: the base model's format, a key of `FORMATS`.
    batch: sequences per micro-batch.
    seq: tokens per sequence.
    lora_r: adapter rank.
    target_modules: projection names that get adapters.
    remat: gradient checkpointing per decoder layer.
    optimizer: "adamw8bit", "paged_adamw8bit" or "adamw".
    head_chunk: tokens per chunk of the output head and loss, or None.
    blocksize: 4-bit absmax block size (as `estimate_memory`).

  Returns:
    A `TrainingMemoryEstimate`.

  Raises:
    ValueError: an unknown `weights` format or optimizer, a size < 1, or a
      `blocksize` jaxbnb does not quantize with.

  Example:
    >>> e = estimate_training_memory("llama-3-8b", batch=2, seq=2048)
    >>> round(e.weights / 2**30, 2), round(e.total_bytes / 2**30, 1)
    (5.31, 10.6)
  """
  fn = "estimate_training_memory"
  if weights not in FORMATS:
    raise ValueError(f"{fn}: `weights` must be one of {list(FORMATS)}, got "
                     f"{weights!r}")
  if optimizer not in _OPTIMIZERS:
    raise ValueError(f"{fn}: `optimizer` must be one of "
                     f"{list(_OPTIMIZERS)}, got {optimizer!r}")
  sizes = [("batch", batch), ("seq", seq), ("lora_r", lora_r)]
  if head_chunk is not None:
    sizes.append(("head_chunk", head_chunk))
  for name, value in sizes:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{fn}: `{name}` must be an int >= 1, got {value!r}")
  targets = ((target_modules,) if isinstance(target_modules, str)
             else tuple(target_modules))
  unknown = sorted(set(targets) - set(PROJECTIONS))
  if unknown:
    raise ValueError(f"{fn}: `target_modules` must be projection names "
                     f"from {list(PROJECTIONS)}, got {unknown}")
  blocksize = _check_blocksize(fn, blocksize)
  _, cfg = _resolve_config(config)
  base = estimate_memory(cfg, blocksize=blocksize).weight_bytes[weights]
  h, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
  nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  i = cfg.intermediate_size
  shapes = {"q_proj": (nq, h), "k_proj": (nkv, h), "v_proj": (nkv, h),
            "o_proj": (h, nq), "gate_proj": (i, h), "up_proj": (i, h),
            "down_proj": (h, i)}
  # Each adapter is two leaves, A [r, in] and B [out, r], per layer.
  leaves = [lora_r * d for t in targets for d in shapes[t]] * layers
  n_lora = sum(leaves)
  tokens = batch * seq
  per_layer = 2 * tokens * (2 * nq + 2 * nkv + 3 * i) * 2  # values + grads
  scores = batch * cfg.num_attention_heads * seq * seq * (4 + 2)
  working = per_layer + scores
  saved = layers * 2 * tokens * h if remat else layers * working
  return TrainingMemoryEstimate(
      weights=base, adapters=12 * n_lora,
      optimizer=_optimizer_state_bytes(optimizer, leaves),
      saved_activations=saved, layer_working_set=working,
      logits=12 * min(tokens, head_chunk or tokens) * cfg.vocab_size)
