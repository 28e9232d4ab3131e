"""estimate_memory: hand-computed bytes, and jaxbnb's real allocations."""

import json

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxbnb._src.io.estimate import estimate_memory
from jaxbnb._src.io.estimate import KNOWN_MODELS
from jaxbnb._src.layers.quantize_model import memory_footprint
from jaxbnb.models import LlamaConfig
from jaxbnb.models import LlamaForCausalLM
from jaxbnb.models import QuantizationConfig

TINY = dict(vocab_size=10, hidden_size=8, intermediate_size=16,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            tie_word_embeddings=False)


def test_hand_computed_tiny():
  e = estimate_memory(TINY)
  # Linears [out, in]: q 8x8, k 4x8, v 4x8, o 8x8, gate/up 16x8, down 8x16.
  assert e.linear_parameters == 64 + 32 + 32 + 64 + 3 * 128  # 576
  # + embeddings 80 + head 80 + norms 3 * 8 = 184.
  assert e.num_parameters == 760
  w = e.weight_bytes
  assert w["fp32"] == 3040 and w["bf16"] == 1520
  # int8 weights + fp32 SCB per output row (64 rows) + 184 16-bit params.
  assert w["int8"] == 576 + 4 * 64 + 2 * 184
  # nf4: 288 packed bytes, 10 blocks of 64 -> 40 absmax bytes, 7 codes of
  # 16 float32, 184 16-bit params.
  assert w["nf4"] == 288 + 40 + 7 * 64 + 368
  # double quant: 10 uint8 absmax, per linear one fp32 nested absmax, a
  # 256-entry fp32 nested code and an fp32 offset.
  assert w["nf4+dq"] == 288 + 10 + 7 * (64 + 4 + 1024 + 4) + 368
  assert e.kv_cache_bytes_per_token == 2 * 1 * 1 * 4 * 2
  assert e.kv_cache_bytes(100, batch=3) == 16 * 300


@pytest.mark.parametrize("fmt,quant", [
    ("bf16", None),
    ("nf4", QuantizationConfig.nf4(double_quant=False)),
    ("nf4", QuantizationConfig.fp4(double_quant=False)),
    ("nf4+dq", QuantizationConfig.nf4(double_quant=True)),
])
def test_matches_jaxbnb_allocation(fmt, quant):
  cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, attention_bias=True)
  model = nnx.eval_shape(lambda: LlamaForCausalLM(
      cfg, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, quantization=quant,
      rngs=nnx.Rngs(0)))
  e = estimate_memory(cfg)
  assert e.weight_bytes[fmt] == memory_footprint(model)
  assert e.num_parameters == model.num_parameters()


def test_known_models_parameter_counts():
  # Published parameter counts.
  assert estimate_memory("llama-2-7b").num_parameters == 6_738_415_616
  assert estimate_memory("Llama-3-8B").num_parameters == 8_030_261_248
  assert estimate_memory("mistral-7b").num_parameters == 7_241_732_096
  assert estimate_memory("qwen2.5-7b").num_parameters == 7_615_616_512
  assert estimate_memory("tinyllama-1.1b").num_parameters == 1_100_048_384
  assert estimate_memory("smollm2-135m").num_parameters == 134_515_008
  # Llama 3.2 (tied embeddings): the model cards' 1.24B and 3.21B.
  assert estimate_memory("llama-3.2-1b").num_parameters == 1_235_814_400
  assert estimate_memory("llama-3.2-3b").num_parameters == 3_212_749_824
  assert set(KNOWN_MODELS) >= {"llama-3-70b"}


def test_gpu_fit():
  e = estimate_memory("llama-3-8b")
  assert e.smallest_gpu("bf16") == 24  # 14.96 GiB x 1.2 = 17.9 GiB
  assert e.fits("nf4") == [8, 12, 16, 24, 40, 48, 80]
  assert e.smallest_gpu("fp32") == 40
  assert estimate_memory("llama-3-70b").smallest_gpu("bf16") is None
  assert estimate_memory("llama-3-70b").smallest_gpu("nf4") == 48
  # A long KV cache moves the 4-bit 8B model off an 8 GB card.
  assert e.smallest_gpu("nf4", tokens=32768, batch=1) == 12
  loose = estimate_memory("llama-3-8b", headroom=1.0)
  assert loose.required_bytes("bf16") == loose.weight_bytes["bf16"]
  table = e.to_markdown()
  assert "| nf4/fp4 | 5.61 GiB |" in table and "24 GB" in table


def test_inputs(tmp_path):
  (tmp_path / "config.json").write_text(
      json.dumps(dict(TINY, model_type="llama")))
  assert estimate_memory(tmp_path).num_parameters == 760
  assert estimate_memory(tmp_path / "config.json").num_parameters == 760
  assert estimate_memory(LlamaConfig.from_hf(
      dict(TINY, model_type="llama"))).num_parameters == 760
  with pytest.raises(ValueError, match="known model name"):
    estimate_memory("gpt-5")
  with pytest.raises(TypeError, match="config"):
    estimate_memory(3)
  with pytest.raises(ValueError, match="blocksize"):
    estimate_memory(TINY, blocksize=0)


@pytest.mark.parametrize("blocksize", [1, 2, 16, 48, 96, 8192, 64.0, True])
def test_blocksizes_jaxbnb_refuses_are_refused(blocksize):
  with pytest.raises(ValueError, match=r"`blocksize` must be a 4-bit block "
                     r"size, one of \[32, 64, .*got " + repr(blocksize)):
    estimate_memory(TINY, blocksize=blocksize)
  from jaxbnb.models import estimate_training_memory
  with pytest.raises(ValueError, match="estimate_training_memory: "
                     "`blocksize`"):
    estimate_training_memory(TINY, blocksize=blocksize)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_every_4bit_blocksize_is_accepted(blocksize):
  assert estimate_memory(TINY, blocksize=blocksize).blocksize == blocksize


@pytest.mark.parametrize("headroom", [float("inf"), float("nan"), 0.5, 0,
                                      "1.2", None, True])
def test_headroom_must_be_a_finite_number_at_least_1(headroom):
  with pytest.raises(ValueError, match="`headroom` must be a finite number "
                     ">= 1, got " + repr(headroom)):
    estimate_memory(TINY, headroom=headroom)
  with pytest.raises(ValueError, match="unknown format"):
    estimate_memory(TINY).required_bytes("int4")


def test_training_estimate_hand_computed():
  from jaxbnb.models import estimate_training_memory
  e = estimate_training_memory(TINY, weights="bf16", batch=2, seq=3,
                               lora_r=2, target_modules=("q_proj", "down_proj"),
                               optimizer="adamw", head_chunk=4)
  assert e.weights == estimate_memory(TINY).weight_bytes["bf16"]
  # q_proj 8x8 and down_proj 8x16 adapters: 2 * (8 + 8) + 2 * (16 + 8).
  n_lora = 32 + 48
  assert e.adapters == 12 * n_lora and e.optimizer == 8 * n_lora
  tokens = 6
  assert e.saved_activations == 1 * 2 * tokens * 8  # one layer's bf16 input
  # q 8 + k 4 + v 4 + attention out 8 (2 * 8 + 2 * 4) and gate, up, their
  # product (3 * 16), bf16 values and gradients; fp32 scores + bf16 probs.
  assert e.layer_working_set == (2 * tokens * (16 + 8 + 48) * 2
                                 + 2 * 2 * 3 * 3 * 6)
  assert e.logits == 12 * 4 * 10  # one chunk of 4 tokens
  whole = estimate_training_memory(TINY, batch=2, seq=3, head_chunk=None)
  assert whole.logits == 12 * tokens * 10
  assert e.total_bytes == sum(e.breakdown().values())
  no_remat = estimate_training_memory(TINY, weights="bf16", batch=2, seq=3,
                                      lora_r=2, remat=False,
                                      target_modules="q_proj")
  assert no_remat.saved_activations == no_remat.layer_working_set
  eight = estimate_training_memory(TINY, batch=2, seq=3, lora_r=2,
                                   target_modules=("q_proj", "down_proj"))
  # Every adapter matrix has fewer than 4096 elements: float32 states.
  assert eight.optimizer == 8 * n_lora
  assert eight.weights == estimate_memory(TINY).weight_bytes["nf4+dq"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(weights="int4"), "`weights`"),
    (dict(optimizer="sgd"), "`optimizer`"),
    (dict(batch=0), "`batch`"),
    (dict(seq=1.5), "`seq`"),
    (dict(head_chunk=0), "`head_chunk`"),
    (dict(target_modules=("q_proj", "lm_head")), "lm_head"),
])
def test_training_estimate_bad_arguments(kwargs, needle):
  from jaxbnb.models import estimate_training_memory
  with pytest.raises(ValueError, match=needle):
    estimate_training_memory(TINY, **kwargs)


@pytest.mark.parametrize("name, r", [("smollm2-135m", 8),
                                     ("smollm2-135m", 16),
                                     ("smollm2-135m", 64),
                                     ("tinyllama-1.1b", 4)])
@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit",
                                       "adamw"])
def test_optimizer_state_is_what_the_optimizer_allocates(name, r, optimizer):
  """Adapter matrices under `min_8bit_size` (4096) keep float32 states."""
  import jax
  from jaxbnb import lora
  from jaxbnb import train
  from jaxbnb._src.io.estimate import PROJECTIONS
  from jaxbnb.models import estimate_training_memory
  cfg = LlamaConfig.from_hf(KNOWN_MODELS[name])

  def make():
    model = LlamaForCausalLM(cfg, param_dtype=jnp.bfloat16,
                             dtype=jnp.bfloat16,
                             quantization=QuantizationConfig.nf4(),
                             rngs=nnx.Rngs(0))
    return lora.apply_lora(model, lora.LoRAConfig(
        r=r, target_modules=list(PROJECTIONS)), rngs=nnx.Rngs(1))

  adapters = nnx.state(nnx.eval_shape(make), nnx.LoRAParam)
  tx = train.make_optimizer(train.TrainConfig(optimizer=optimizer))
  state = jax.eval_shape(tx.init, adapters)
  real = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  e = estimate_training_memory(name, lora_r=r, optimizer=optimizer)
  # All but the scalar step counts (the optimizer's and the schedule's).
  assert 0 <= real - e.optimizer <= 8
