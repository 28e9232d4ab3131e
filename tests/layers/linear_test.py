"""The float `Linear` and the float32 precision rule (no silent TF32)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbnb.models import LlamaConfig, LlamaForCausalLM, QuantizationConfig
from jaxbnb.nnx import Linear, Linear4bit, make_linear, weight_format
from tests import helpers


def _dot_precisions(fn, *args) -> list[str]:
  """The precision of every dot in the lowered StableHLO of `fn(*args)`."""
  text = jax.jit(fn).lower(*args).as_text()
  dots = [l for l in text.splitlines() if "dot_general" in l]
  assert dots, "no dot_general in the lowered program"
  out = []
  for line in dots:
    m = re.search(r"precision(?:_config)? = \[([^\]]*)\]", line)
    out.append(m.group(1) if m else "DEFAULT")
  return out


def test_linear_matches_numpy_in_float32():
  layer = Linear(8, 4, use_bias=True, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std=0.5, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.arange(4, dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(1), (3, 8))
  # float32 accumulation over K = 8 products and the bias add, against
  # float64 (helpers.matmul_bound: K * eps * sum|x||w| + eps * |y|).
  want, bound = helpers.matmul_bound(x, layer.weight[...], jnp.float32,
                                     bias=layer.bias[...])
  helpers.assert_within(layer(x), want, bound, "Linear")
  np.testing.assert_array_equal(layer.bias[...], np.arange(4))


def test_float32_model_computes_in_float32_not_tf32():
  cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, tie_word_embeddings=True)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def logits(state, ids):
    return nnx.merge(graphdef, state)(ids)[0]

  precisions = _dot_precisions(logits, state, jnp.ones((1, 4), jnp.int32))
  assert all("HIGHEST" in p for p in precisions), precisions


def test_bfloat16_model_keeps_the_default_precision():
  cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1)
  model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def logits(state, ids):
    return nnx.merge(graphdef, state)(ids)[0]

  precisions = _dot_precisions(logits, state, jnp.ones((1, 4), jnp.int32))
  assert not any("HIGHEST" in p for p in precisions), precisions


@pytest.mark.parametrize("path, want", [
    ("model.layers.0.mlp.up_proj", "4bit"),
    ("lm_head", None),
    ("model.layers.0.self_attn.o_proj", None),
])
def test_factory_follows_the_config_and_skip_list(path, want):
  q = QuantizationConfig.nf4(llm_int8_skip_modules=["lm_head", "o_proj"])
  assert weight_format(q, path) == want
  layer = make_linear(32, 16, use_bias=False, path=path, dtype=jnp.float32,
                      param_dtype=jnp.float32, init_std=0.02,
                      quantization=q, rngs=nnx.Rngs(0))
  assert isinstance(layer, Linear4bit if want else Linear)
  if want:
    qs = layer.weight.get_value().quant_state
    assert (qs.quant_type, qs.blocksize, qs.nested) == ("nf4", 64, True)
    assert layer.dtype == jnp.bfloat16  # the config's compute dtype


def test_factory_without_quantization_is_float():
  layer = make_linear(8, 4, use_bias=True, path="mlp.up_proj",
                      dtype=jnp.float32, param_dtype=jnp.float32,
                      init_std=0.02, quantization=None, rngs=nnx.Rngs(0))
  assert isinstance(layer, Linear) and layer.weight.shape == (4, 8)


def test_factory_builds_frozen_int8_layers_for_load_in_8bit():
  q = QuantizationConfig(load_in_8bit=True, llm_int8_threshold=5.0)
  layer = make_linear(8, 4, use_bias=False, path="mlp.up_proj",
                      dtype=jnp.bfloat16, param_dtype=jnp.float32,
                      init_std=0.02, quantization=q, rngs=nnx.Rngs(0))
  assert type(layer).__name__ == "Linear8bitLt"
  assert layer.threshold == 5.0 and not layer.has_fp16_weights
  assert not jax.tree.leaves(nnx.state(layer, nnx.Param))  # frozen, no bias
  skipped = make_linear(8, 4, use_bias=False, path="lm_head",
                        dtype=jnp.float32, param_dtype=jnp.float32,
                        init_std=0.02, quantization=q, rngs=nnx.Rngs(0))
  assert type(skipped).__name__ == "Linear"


def test_users_can_still_ask_for_tf32():
  layer = Linear(8, 4, use_bias=False, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std=0.5, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def f(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jnp.ones((2, 8))
  assert all("HIGHEST" in p for p in _dot_precisions(f, state, x))
  with jax.default_matmul_precision("tensorfloat32"):
    assert not any("HIGHEST" in p for p in _dot_precisions(f, state, x))
