"""LoRAConfig's `bias` ("all", "lora_only"): the model's biases trained
beside the adapters, saved and loaded under PEFT's names, frozen again by
merge and unload. PEFT's own files for both options are the golden cases
`qwen2_bias_*` of tests/io/peft_test.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx

from jaxbnb import models
from jaxbnb.lora import LoRABias
from jaxbnb.lora import LoRAConfig
from jaxbnb.lora import adapter_state_dict
from jaxbnb.lora import apply_lora
from jaxbnb.lora import load_adapter
from jaxbnb.lora import merge_lora
from jaxbnb.lora import save_adapter
from jaxbnb.lora import unload_lora

# Llama with biases on q/k/v/o and on the MLP's three linears.
CFG = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False,
                         attention_bias=True, mlp_bias=True)
Q4 = models.QuantizationConfig.nf4(compute_dtype="float32")
IDS = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])
BIASED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = ("q_proj", "up_proj")


def tiny(quantization=None):
  model = models.LlamaForCausalLM(CFG, quantization=quantization,
                                  rngs=nnx.Rngs(0))
  for i, layer in enumerate(model.model.layers):  # non-zero biases
    for j, name in enumerate(BIASED):
      lin = getattr(getattr(layer, name.split(".")[0]), name.split(".")[1])
      lin.bias[...] = 0.1 * jax.random.normal(jax.random.key(10 * i + j),
                                              lin.bias.shape)
  return model


def expected_keys(bias):
  """PEFT's keys for the trained biases (`_get_learnable_bias_state_dict`)."""
  keys = []
  for i in range(CFG.num_hidden_layers):
    for name in BIASED:
      adapted = name.rsplit(".", 1)[1] in TARGETS
      if bias == "all" or adapted:
        keys.append(f"base_model.model.model.layers.{i}.{name}."
                    + ("base_layer.bias" if adapted else "bias"))
  return sorted(keys)


def _loss(model):
  logits, _ = model(IDS)
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, IDS[:, 1:, None], axis=-1))


def _trained(bias, quantization):
  model = apply_lora(tiny(quantization),
                     LoRAConfig(r=4, target_modules=list(TARGETS),
                                bias=bias, init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
  grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  opt.update(model, grads)
  return model


def _bias_paths(model):
  return sorted(".".join(map(str, p)) for p, v in nnx.iter_graph(model)
                if isinstance(v, LoRABias))


def test_config_takes_peft_s_bias_values():
  for bias in ("none", "all", "lora_only"):
    cfg = LoRAConfig(bias=bias)
    assert cfg.to_dict()["bias"] == bias
    assert LoRAConfig.from_dict(cfg.to_dict()).bias == bias
  with pytest.raises(ValueError, match="`bias` must be 'none', 'all' or "
                     "'lora_only', got 'some'"):
    LoRAConfig(bias="some")


@pytest.mark.parametrize("quantization", [None, Q4], ids=["float", "nf4"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_step_trains_the_selected_biases_and_nothing_else(bias,
                                                            quantization):
  before = tiny(quantization)
  model = _trained(bias, quantization)
  want = [k[len("base_model.model."):] for k in expected_keys(bias)]
  assert _bias_paths(model) == want
  flat = dict(nnx.to_flat_state(nnx.state(before)))
  for path, var in nnx.to_flat_state(nnx.state(model)):
    dotted = ".".join(map(str, path))
    if "lora_" in dotted:
      continue
    key = tuple(p for p in path if p != "base_layer")
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(flat[key].get_value()),
        jax.tree.leaves(var.get_value()), strict=True))
    assert same != (dotted in want), dotted  # the biases moved, only they
  sd = adapter_state_dict(model)
  assert sorted(k for k in sd if k.endswith(".bias")) == expected_keys(bias)


def test_none_trains_no_bias():
  model = apply_lora(tiny(), LoRAConfig(r=4, target_modules=list(TARGETS)),
                     rngs=nnx.Rngs(1))
  assert not _bias_paths(model)
  assert not [k for k in adapter_state_dict(model) if k.endswith(".bias")]


@pytest.mark.parametrize("quantization", [None, Q4], ids=["float", "nf4"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_save_then_load_onto_the_base_gives_the_trained_model(
    bias, quantization, tmp_path):
  model = _trained(bias, quantization)
  out = save_adapter(model, tmp_path / "a")
  assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())[
      "bias"] == bias
  loaded = load_adapter(tiny(quantization), out)
  assert _bias_paths(loaded) == _bias_paths(model)
  np.testing.assert_array_equal(np.asarray(loaded(IDS)[0]),
                                np.asarray(model(IDS)[0]))
  saved = safetensors.numpy.load_file(tmp_path / "a" /
                                      "adapter_model.safetensors")
  for key, value in adapter_state_dict(loaded).items():
    assert saved[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("undo", [merge_lora, unload_lora])
def test_merge_and_unload_keep_the_trained_biases_as_params(undo):
  model = _trained("all", None)
  trained = {p: np.asarray(v.get_value()) for p, v in nnx.iter_graph(model)
             if isinstance(v, LoRABias)}
  logits = np.asarray(model(IDS)[0])
  undo(model)
  assert not _bias_paths(model)
  values = {".".join(map(str, p)): v for p, v in nnx.iter_graph(model)}
  for path, value in trained.items():
    plain = ".".join(map(str, path)).replace(".base_layer", "")
    assert type(values[plain]) is nnx.Param, plain  # pylint: disable=unidiomatic-typecheck
    np.testing.assert_array_equal(np.asarray(values[plain].get_value()),
                                  value)
  if undo is merge_lora:
    np.testing.assert_allclose(np.asarray(model(IDS)[0]), logits, rtol=1e-5,
                               atol=1e-5)


def test_load_checks_the_bias_keys(tmp_path):
  model = _trained("all", None)
  out = tmp_path / "a"
  save_adapter(model, out)
  path = out / "adapter_model.safetensors"
  tensors = safetensors.numpy.load_file(path)
  key = "base_model.model.model.layers.0.self_attn.k_proj.bias"
  # a bias the model does not have
  extra = dict(tensors)
  extra["base_model.model.model.layers.0.input_layernorm.bias"] = np.zeros(
      32, np.float32)
  safetensors.numpy.save_file(extra, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="input_layernorm.bias.*has no bias"):
    load_adapter(tiny(), out)
  # a bias of the wrong shape
  bad = dict(tensors)
  bad[key] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(bad, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="k_proj.bias.*shape \\[3\\]"):
    load_adapter(tiny(), out)
  # a bias key in an adapter that trains none
  cfg = json.loads((out / "adapter_config.json").read_text())
  (out / "adapter_config.json").write_text(json.dumps({**cfg,
                                                       "bias": "none"}))
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="bias.*bias='all' only.*"
                     "bias='none'"):
    load_adapter(tiny(), out)


def test_peft_s_wrapper_biases_of_a_module_to_save_are_skipped(tmp_path):
  """bias="all" with a module to save that has a bias: PEFT's file also
  holds that bias inside its wrapper twice (the copy's, the original's);
  the copy's own key gives the value."""
  model = apply_lora(tiny(), LoRAConfig(r=4, target_modules=["k_proj"],
                                        modules_to_save=["q_proj"],
                                        bias="all", init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  q = model.model.layers[0].self_attn.q_proj
  assert type(q.bias) is nnx.LoRAParam  # pylint: disable=unidiomatic-typecheck
  q.bias[...] = q.bias[...] + 1.0
  out = tmp_path / "a"
  save_adapter(model, out)
  path = out / "adapter_model.safetensors"
  tensors = safetensors.numpy.load_file(path)
  key = "base_model.model.model.layers.0.self_attn.q_proj"
  assert f"{key}.bias" in tensors
  tensors[f"{key}.modules_to_save.bias"] = tensors[f"{key}.bias"]
  tensors[f"{key}.original_module.bias"] = np.zeros_like(
      tensors[f"{key}.bias"])
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  loaded = load_adapter(tiny(), out)
  np.testing.assert_array_equal(
      np.asarray(loaded.model.layers[0].self_attn.q_proj.bias[...]),
      np.asarray(q.bias[...]))
  np.testing.assert_array_equal(np.asarray(loaded(IDS)[0]),
                                np.asarray(model(IDS)[0]))
