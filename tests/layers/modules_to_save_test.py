"""LoRAConfig.modules_to_save: whole modules trained beside the adapters
(PEFT's ModulesToSaveWrapper); the PEFT golden files are in
tests/io/peft_test.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxbnb import models
from jaxbnb import train
from jaxbnb.lora import LoRAConfig
from jaxbnb.lora import apply_lora
from jaxbnb.lora import load_adapter
from jaxbnb.lora import merge_lora
from jaxbnb.lora import save_adapter
from jaxbnb.lora import unload_lora

CFG = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
Q4 = models.QuantizationConfig.nf4(compute_dtype="float32")
IDS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % CFG.vocab_size


def tiny(quantization=Q4, config=CFG):
  return models.LlamaForCausalLM(config, quantization=quantization,
                                 rngs=nnx.Rngs(0))


def lora(**kw):
  kw.setdefault("target_modules", ["q_proj", "v_proj"])
  return LoRAConfig(r=4, lora_alpha=8, **kw)


def loss(model):
  logits, _ = model(IDS)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])


def kinds(model):
  return {".".join(map(str, p)): type(v).__name__
          for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)
          and p[-1] == "weight"}


def test_selected_params_become_lora_params_with_peft_s_suffix_rule():
  # "norm" ends every *_layernorm path too (PEFT: key.endswith(name)).
  model = apply_lora(tiny(), lora(modules_to_save=["lm_head", "norm"]),
                     rngs=nnx.Rngs(1))
  k = kinds(model)
  trained = sorted(p for p, t in k.items() if t == "LoRAParam")
  assert trained == sorted(
      ["lm_head.weight", "model.norm.weight"]
      + [f"model.layers.{i}.{n}.weight" for i in range(2)
         for n in ("input_layernorm", "post_attention_layernorm")])
  assert k["model.embed_tokens.weight"] == "Param"
  assert k["model.layers.0.mlp.up_proj.weight"] == "QuantizedWeight"


def test_an_optimizer_trains_the_modules_and_adapters_only():
  model = apply_lora(tiny(), lora(modules_to_save=["lm_head"]),
                     rngs=nnx.Rngs(1))
  frozen = nnx.clone(nnx.state(model, nnx.Not(nnx.LoRAParam)))
  head = np.asarray(model.lm_head.weight[...])
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  opt.update(model, grads)
  assert np.abs(np.asarray(model.lm_head.weight[...]) - head).max() > 1e-3
  after = nnx.state(model, nnx.Not(nnx.LoRAParam))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_step_updates_a_saved_module():
  model = apply_lora(tiny(), lora(modules_to_save=["model.norm"]),
                     rngs=nnx.Rngs(1))
  opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.LoRAParam)
  before = np.asarray(model.model.norm.weight[...])
  ones = jnp.ones((1, 2, 8), jnp.int32)
  out = train.train_step(model, opt, {"input_ids": IDS[None],
                                      "attention_mask": ones,
                                      "loss_mask": ones})
  assert np.isfinite(float(out["loss"]))
  assert np.abs(np.asarray(model.model.norm.weight[...]) - before).max() > 0


def test_save_load_round_trip_and_config(tmp_path):
  # a float mlp is needed to train it whole: build the model in float
  model = apply_lora(
      tiny(None), lora(modules_to_save=["lm_head", "layers.1.mlp"],
                       target_modules=["q_proj"]), rngs=nnx.Rngs(1))
  model.lm_head.weight[...] *= 1.5
  model.model.layers[1].mlp.up_proj.weight[...] *= -1.0
  save_adapter(model, tmp_path / "a")
  cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert cfg["modules_to_save"] == ["lm_head", "layers.1.mlp"]
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  keys = sorted(load_file(tmp_path / "a" / "adapter_model.safetensors"))
  assert "base_model.model.lm_head.weight" in keys
  assert "base_model.model.model.layers.1.mlp.up_proj.weight" in keys
  assert not any("layers.0.mlp" in k for k in keys)
  fresh = load_adapter(tiny(None), tmp_path / "a")
  np.testing.assert_array_equal(fresh(IDS)[0], model(IDS)[0])
  assert kinds(fresh)["lm_head.weight"] == "LoRAParam"
  assert kinds(fresh)["model.layers.0.mlp.up_proj.weight"] == "Param"


@pytest.mark.parametrize("fold", [merge_lora, unload_lora])
def test_merge_and_unload_keep_the_trained_module(fold):
  model = apply_lora(tiny(), lora(modules_to_save=["lm_head"]),
                     rngs=nnx.Rngs(1))
  model.lm_head.weight[...] += 1.0
  trained = np.asarray(model.lm_head.weight[...])
  fold(model)
  assert kinds(model)["lm_head.weight"] == "Param"  # PEFT keeps the copy
  np.testing.assert_array_equal(model.lm_head.weight[...], trained)
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))


def test_config_round_trip_and_peft_dict():
  cfg = lora(modules_to_save=["lm_head", "embed_tokens"])
  d = cfg.to_dict()
  assert d["modules_to_save"] == ["lm_head", "embed_tokens"]
  assert LoRAConfig.from_dict(d) == cfg
  assert lora(modules_to_save=[]).modules_to_save is None
  assert lora().to_dict()["modules_to_save"] is None


@pytest.mark.parametrize("value, match", [
    ("lm_head", "must be a list of module names"),
    (["lm_head", ""], "non-empty strings"),
    ([3], "non-empty strings"),
])
def test_config_refuses_bad_values(value, match):
  with pytest.raises(ValueError, match=match):
    lora(modules_to_save=value)


@pytest.mark.parametrize("names, quantization, error, match", [
    (["lm_hed"], Q4, ValueError, r"\['lm_hed'\] select no module"),
    # kept out of LoRA (PEFT's rule), trained whole: a 4-bit one cannot be
    (["q_proj"], Q4, ValueError, "a Linear4bit with weight.*only float"),
    (["mlp"], Q4, ValueError, "a MLP with .*QuantizedWeight.*only float"),
    (["up_proj"], Q4, ValueError, "a Linear4bit with weight.*only float"),
])
def test_apply_refuses(names, quantization, error, match):
  with pytest.raises(error, match=match):
    apply_lora(tiny(quantization), lora(modules_to_save=names),
               rngs=nnx.Rngs(1))


@pytest.mark.parametrize("names", [["lm_head"], ["embed_tokens"],
                                   ["lm_head", "embed_tokens"]])
def test_a_tied_pair_is_untied_as_peft_s_copy_unties_it(names):
  # PEFT trains a copy of the selected side; the other keeps the original.
  import dataclasses  # pylint: disable=g-import-not-at-top
  tied = tiny(Q4, dataclasses.replace(CFG, tie_word_embeddings=True))
  assert tied.lm_head is None
  before = tied(IDS)[0]
  emb = np.asarray(tied.model.embed_tokens.weight[...])
  model = apply_lora(tied, lora(modules_to_save=names), rngs=nnx.Rngs(1))
  assert not model.config.tie_word_embeddings
  assert not model.model.config.tie_word_embeddings
  np.testing.assert_array_equal(model.lm_head.weight[...], emb)
  np.testing.assert_array_equal(model(IDS)[0], before)  # B = 0: unchanged
  k = kinds(model)
  assert k["lm_head.weight"] == ("LoRAParam" if "lm_head" in names
                                 else "Param")
  assert k["model.embed_tokens.weight"] == ("LoRAParam"
                                            if "embed_tokens" in names
                                            else "Param")
  opt = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.LoRAParam)
  opt.update(model, nnx.grad(
      loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))
  moved = {n: bool(np.abs(np.asarray(w) - emb).max() > 0) for n, w in (
      ("lm_head", model.lm_head.weight[...]),
      ("embed_tokens", model.model.embed_tokens.weight[...]))}
  assert moved == {n: n in names for n in moved}


def test_load_checks_a_saved_module_tensor(tmp_path):
  model = apply_lora(tiny(), lora(modules_to_save=["lm_head"]),
                     rngs=nnx.Rngs(1))
  save_adapter(model, tmp_path / "a")
  import dataclasses  # pylint: disable=g-import-not-at-top
  other = tiny(Q4, dataclasses.replace(CFG, vocab_size=80))
  with pytest.raises(ValueError,
                     match=r"lm_head.weight.*\[64, 32\].*\[80, 32\]"):
    load_adapter(other, tmp_path / "a")
  # nothing was changed by the failed load
  assert not jax.tree.leaves(nnx.state(other, nnx.LoRAParam))


@pytest.mark.parametrize("names, adapted, whole", [
    (["q_proj"], ["layers.0.self_attn.v_proj", "layers.1.self_attn.v_proj"],
     ["layers.0.self_attn.q_proj.weight", "layers.1.self_attn.q_proj.weight"]),
    (["layers.0.self_attn"],
     ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"],
     [f"layers.0.self_attn.{n}_proj.weight" for n in "qkvo"]),
])
def test_a_module_to_save_gets_no_adapter_as_in_peft(names, adapted, whole):
  # PEFT's check_target_module_exists: no LoRA on or inside a module an
  # entry names (between "." boundaries); that module is trained whole.
  from jaxbnb._src.layers.lora import lora_layers  # pylint: disable=g-import-not-at-top
  model = apply_lora(tiny(None), lora(modules_to_save=names),
                     rngs=nnx.Rngs(1))
  assert sorted(p.removeprefix("model.") for p, _ in lora_layers(model)) == (
      adapted)
  trained = sorted(p.removeprefix("model.") for p, t in kinds(model).items()
                   if t == "LoRAParam")
  assert trained == sorted(whole)


def test_every_target_inside_modules_to_save_leaves_nothing_to_adapt():
  with pytest.raises(ValueError, match="matches no linear layer"):
    apply_lora(tiny(None), lora(modules_to_save=["self_attn"]),
               rngs=nnx.Rngs(1))


def test_load_ignores_an_entry_that_selects_nothing_as_peft(tmp_path):
  model = apply_lora(tiny(), lora(modules_to_save=["lm_head"]),
                     rngs=nnx.Rngs(1))
  save_adapter(model, tmp_path / "a")
  cfg_path = tmp_path / "a" / "adapter_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["modules_to_save"] = ["nonexistent", "lm_head"]
  cfg_path.write_text(json.dumps(cfg))
  with pytest.warns(UserWarning, match=r"\['nonexistent'\] select no module"):
    fresh = load_adapter(tiny(), tmp_path / "a")
  np.testing.assert_array_equal(fresh(IDS)[0], model(IDS)[0])
  with pytest.raises(ValueError, match="select no module"):  # but applying
    apply_lora(tiny(), lora(modules_to_save=["nonexistent"]),
               rngs=nnx.Rngs(1))
