"""Shared pieces of the training tests: a tiny model and a char tokenizer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb import models
from jaxbnb.lora import LoRAConfig
from jaxbnb.lora import apply_lora

# 32 + 95 printable characters + newline: ids 3..98; 0 pad, 1 eos, 2 "\n".
VOCAB = 128
CFG = models.LlamaConfig(vocab_size=VOCAB, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64,
                         # large enough that a frozen random head can still
                         # express a text's statistics (0.02 cannot)
                         initializer_range=0.3)
LORA = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear")
TEXT = ("It was a truth universally acknowledged that a single man in "
        "possession of a good fortune must be in want of a wife. ")


class CharTokenizer:
  """A character-level tokenizer with a tiny chat template."""

  pad_token_id = 0
  eos_token_id = 1
  chat_template = "[role]\ncontent\n"

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    return [2 if c == "\n" else 3 + (ord(c) - 32) % 96 for c in text]

  def decode(self, ids):
    out = []
    for i in ids:
      i = int(i)
      if i == 1:
        out.append("<eos>")
      elif i == 2:
        out.append("\n")
      elif i >= 3:
        out.append(chr(32 + i - 3))
    return "".join(out)

  def apply_chat_template(self, messages, tokenize=False,
                          add_generation_prompt=False):
    assert not tokenize
    text = "".join(f"[{m['role']}]\n{m['content']}\n" for m in messages)
    return text + ("[assistant]\n" if add_generation_prompt else "")


@functools.lru_cache(maxsize=None)
def _tiny_model(quantization, dtype, seed):
  return models.LlamaForCausalLM(CFG, quantization=quantization, dtype=dtype,
                                 param_dtype=dtype, rngs=nnx.Rngs(seed))


def tiny_model(*, quantization=None, dtype=jnp.float32, seed=0):
  """A fresh copy of the tiny model (built once per process: eager random
  initialisation takes seconds on a CPU)."""
  return nnx.clone(_tiny_model(quantization, jnp.dtype(dtype), seed))


@nnx.jit
def logits(model, ids):
  return model(ids)[0]


def lora_model(*, lora=LORA, seed=0, **kw):
  return apply_lora(tiny_model(seed=seed, **kw), lora, rngs=nnx.Rngs(seed + 1))


def frozen_state(model):
  """Every variable that is not an adapter, as host arrays."""
  state = nnx.state(model, nnx.Not(nnx.LoRAParam))
  return [np.asarray(x) for x in jax.tree.leaves(state)
          if not jax.dtypes.issubdtype(getattr(x, "dtype", np.float32),
                                       jax.dtypes.prng_key)]


def lora_arrays(model):
  return [np.asarray(x) for x in
          jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]


def sgd_qlora(path, mesh=None, storage="uint8"):
  """`(model, optimizer)`: the NF4 (float32 compute) model at `path`,
  its packed bytes in `storage`, loaded onto `mesh` when given, with LoRA r 4 and dropout 0.1 on every
  linear (random B, so the first step already moves the loss) in train
  mode, and plain SGD (lr 0.1) on the adapters. SGD moves the adapters by
  the gradients themselves: Adam's normalized, 8-bit quantized steps
  would magnify float noise into code flips when runs are compared."""
  import optax  # pylint: disable=g-import-not-at-top
  from jaxbnb import convert  # pylint: disable=g-import-not-at-top
  from jaxbnb import lora  # pylint: disable=g-import-not-at-top
  kw = {} if mesh is None else {"mesh": mesh}
  m = convert.from_pretrained(
      path, progress=False, param_dtype="float32",
      quantization=models.QuantizationConfig.nf4(
          compute_dtype="float32", bnb_4bit_quant_storage=storage),
      **kw)
  m = lora.apply_lora(m, lora.LoRAConfig(r=4, lora_dropout=0.1,
                                         target_modules="all-linear",
                                         init_lora_weights=False),
                      rngs=nnx.Rngs(1))
  m.train()
  return m, nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.LoRAParam)
