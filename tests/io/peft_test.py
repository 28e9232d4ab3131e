"""PEFT adapter folders: save_adapter / load_adapter.

Two groups:

* fixture-free: jaxbnb round trips (save -> load), the exact layout PEFT
  uses (keys, shapes, dtypes, metadata, config fields) and every error;
* golden: adapters saved by PEFT itself (tests/golden/peft/<case>/, made by
  tests/golden/make_peft_golden.py with torch + transformers + peft) loaded
  onto the same base checkpoints (tests/golden/llama/<base>): logits,
  adapter gradients and merged logits match PEFT's, and re-saving gives
  PEFT's files back. A missing fixture FAILS with the command that makes
  it, whatever VERSIONS.txt says: every case is committed (made on a GPU),
  so a "skipped" line there (--skip-4bit) must not turn a test off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

from jaxbnb import convert
from jaxbnb import models
from jaxbnb._src.io import peft as peft_io
from jaxbnb.lora import LoRAConfig
from jaxbnb.lora import LoRALinear
from jaxbnb.lora import adapter_state_dict
from jaxbnb.lora import apply_lora
from jaxbnb.lora import find_targets
from jaxbnb.lora import load_adapter
from jaxbnb.lora import merge_lora
from jaxbnb.lora import read_adapter
from jaxbnb.lora import save_adapter
from jaxbnb.nnx import Linear4bit

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden"
PEFT_GOLDEN = GOLDEN / "peft"
SCRIPT = "tests/golden/make_peft_golden.py"
Q4 = models.QuantizationConfig.nf4(compute_dtype="float32")
CFG = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
IDS = jnp.array([[5, 3, 9, 1, 7, 2], [4, 4, 8, 6, 1, 3]], jnp.int32)


def tiny(quantization=None, seed=0, cfg=CFG):
  return models.LlamaForCausalLM(cfg, quantization=quantization,
                                 rngs=nnx.Rngs(seed))


def adapted(quantization=None, **kw):
  kw.setdefault("r", 4)
  kw.setdefault("init_lora_weights", False)
  return apply_lora(tiny(quantization), LoRAConfig(**kw), rngs=nnx.Rngs(7))


def _logits(model, ids=IDS):
  return np.asarray(model(jnp.asarray(ids, jnp.int32))[0])


def _close(actual, expected, rel):
  """|actual - expected| <= rel * max|expected| (+ 1e-6), elementwise."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  err = float(np.max(np.abs(actual - expected)))
  scale = float(np.max(np.abs(expected)))
  assert err <= rel * scale + 1e-6, f"max abs diff {err} (scale {scale})"


# ---------------------------------------------------------------------------
# fixture-free: layout and round trips


@pytest.mark.parametrize("quantization", [None, Q4], ids=["float", "nf4"])
@pytest.mark.parametrize("dora", [False, True])
def test_save_load_round_trip(tmp_path, quantization, dora):
  model = adapted(quantization, use_dora=dora, target_modules="all-linear",
                  lora_alpha=16, use_rslora=True)
  if dora:  # move the magnitudes away from their initial norms
    for _, layer in nnx.iter_graph(model):
      if isinstance(layer, LoRALinear):
        m = layer.lora_magnitude_vector
        m[...] = m[...] * 1.25
  want = _logits(model)
  save_adapter(model, tmp_path / "adapter")
  fresh = load_adapter(tiny(quantization), tmp_path / "adapter")
  assert type(fresh.model.layers[0].mlp.up_proj.base_layer) is type(
      model.model.layers[0].mlp.up_proj.base_layer)
  np.testing.assert_array_equal(_logits(fresh), want)
  a, b = adapter_state_dict(model), adapter_state_dict(fresh)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  got = fresh.model.layers[1].self_attn.q_proj.config
  want_cfg = model.model.layers[1].self_attn.q_proj.config
  assert len(got.target_modules) == 14  # "all-linear" saved as names
  assert dataclasses.replace(got, target_modules="all-linear") == want_cfg


def test_saved_layout_is_peft_s(tmp_path):
  model = adapted(target_modules=["q_proj", "down_proj"], use_dora=True,
                  lora_alpha=8, lora_dropout=0.05)
  out = save_adapter(model, tmp_path / "a",
                     base_model_name_or_path="org/base-model")
  assert out == str((tmp_path / "a").resolve())
  assert sorted(os.listdir(out)) == ["adapter_config.json",
                                     "adapter_model.safetensors"]
  with safetensors.safe_open(os.path.join(out, "adapter_model.safetensors"),
                             "numpy") as f:
    assert f.metadata() == {"format": "pt"}
  tensors = safetensors.numpy.load_file(
      os.path.join(out, "adapter_model.safetensors"))
  want = {}
  for i in range(2):
    for path, n_in, n_out in ((f"model.layers.{i}.self_attn.q_proj", 32, 32),
                              (f"model.layers.{i}.mlp.down_proj", 64, 32)):
      p = "base_model.model." + path
      want[p + ".lora_A.weight"] = (4, n_in)
      want[p + ".lora_B.weight"] = (n_out, 4)
      want[p + ".lora_magnitude_vector"] = (n_out,)
  assert {k: v.shape for k, v in tensors.items()} == want
  assert {v.dtype for v in tensors.values()} == {np.dtype(np.float32)}
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  expect = dict(peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8,
                lora_dropout=0.05, target_modules=["q_proj", "down_proj"],
                use_dora=True, use_rslora=False, bias="none",
                init_lora_weights=False, fan_in_fan_out=False,
                modules_to_save=None, inference_mode=True, rank_pattern={},
                alpha_pattern={}, layers_to_transform=None,
                layers_pattern=None, lora_bias=False, exclude_modules=None,
                base_model_name_or_path="org/base-model")
  for key, value in expect.items():
    assert cfg[key] == value, key


def test_all_linear_is_saved_as_module_names(tmp_path):
  model = adapted(target_modules="all-linear")
  save_adapter(model, tmp_path / "a")
  config, _ = read_adapter(tmp_path / "a")
  assert len(config.target_modules) == 14
  assert "model.layers.1.mlp.up_proj" in config.target_modules
  # PEFT condenses 20 and more names to suffixes.
  cfg3 = models.LlamaConfig(vocab_size=64, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2)
  big = apply_lora(tiny(cfg=cfg3), LoRAConfig(r=2, target_modules="all-linear"),
                   rngs=nnx.Rngs(0))
  save_adapter(big, tmp_path / "b")
  config, _ = read_adapter(tmp_path / "b")
  assert config.target_modules == ("down_proj", "gate_proj", "k_proj",
                                   "o_proj", "q_proj", "up_proj", "v_proj")
  fresh = load_adapter(tiny(cfg=cfg3), tmp_path / "b")
  np.testing.assert_array_equal(_logits(fresh), _logits(big))


def test_load_onto_a_checkpoint_and_save_protects_it(tmp_path):
  base = GOLDEN / "llama" / "qwen2"
  model = convert.from_pretrained(base, progress=False)
  apply_lora(model, LoRAConfig(r=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="checkpoint the model was loaded"):
    save_adapter(model, base / "adapter")
  save_adapter(model, tmp_path / "a")
  config, _ = read_adapter(tmp_path / "a")
  assert config.base_model_name_or_path == str(base.resolve())


def test_overwrite_and_atomic_write(tmp_path, monkeypatch):
  model = adapted()
  target = tmp_path / "a"
  save_adapter(model, target)
  (target / "README.md").write_text("model card")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_adapter(model, target)
  other = adapted(r=2)
  save_adapter(other, target, overwrite=True)
  assert (target / "README.md").read_text() == "model card"
  assert read_adapter(target)[0].r == 2

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(peft_io, "write_safetensors", boom)
  with pytest.raises(OSError, match="disk full"):
    save_adapter(model, tmp_path / "b")
  with pytest.raises(OSError, match="disk full"):
    save_adapter(model, target, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary left behind
  assert read_adapter(target)[0].r == 2


def test_save_errors(tmp_path):
  with pytest.raises(ValueError, match="no LoRA adapters"):
    save_adapter(tiny(), tmp_path / "a")
  model = adapted(target_modules=["q_proj"])
  layer = model.model.layers[0].self_attn.v_proj
  model.model.layers[0].self_attn.v_proj = LoRALinear(
      layer, LoRAConfig(r=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="other hyperparameters"):
    save_adapter(model, tmp_path / "a")


def _write(folder, config, tensors):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "adapter_config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(
      {k: np.asarray(v) for k, v in tensors.items()},
      str(folder / "adapter_model.safetensors"), {"format": "pt"})
  return folder


def _peft_like(tmp_path, **config_kw):
  """A valid adapter folder (q_proj, v_proj; r=4) and its parts."""
  model = adapted(target_modules=["q_proj", "v_proj"])
  tensors = adapter_state_dict(model)
  config = model.model.layers[0].self_attn.q_proj.config.to_dict()
  config.update(config_kw)
  return config, tensors


def test_load_errors(tmp_path):
  config, tensors = _peft_like(tmp_path)
  key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

  def load(name, cfg=config, ten=tensors, model=None):
    return load_adapter(model or tiny(), _write(tmp_path / name, cfg, ten))

  with pytest.raises(ValueError,
                     match=r"q_proj.lora_A.weight.*\[4, 16\].*\[4, 32\]"):
    load("shape", ten={**tensors, key: np.zeros((4, 16), np.float32)})
  with pytest.raises(ValueError, match="another architecture"):
    load("arch", ten={**tensors, key.replace("layers.0", "layers.9"):
                      tensors[key]})
  b_key = key.replace("lora_A", "lora_B")
  with pytest.raises(ValueError, match="no lora_B for 'model.layers.0"):
    load("missing", ten={k: v for k, v in tensors.items() if k != b_key})
  with pytest.raises(ValueError, match="does not select"):
    load("untargeted", cfg={**config, "target_modules": ["q_proj"]})
  with pytest.raises(ValueError, match="random"):
    load("partial", cfg={**config, "target_modules": ["q_proj", "v_proj",
                                                      "k_proj"]})
  with pytest.raises(ValueError, match="use_dora=False"):
    load("dora", ten={**tensors, key.replace(
        "lora_A.weight", "lora_magnitude_vector"): np.ones(32, np.float32)})
  with pytest.raises(ValueError, match="no lora_magnitude_vector"):
    load("nodora", cfg={**config, "use_dora": True})
  with pytest.raises(ValueError, match="lora_B.bias' but the config has "
                     "lora_bias=False"):
    load("bias", ten={**tensors, b_key.replace("weight", "bias"):
                      np.zeros(32, np.float32)})
  with pytest.raises(ValueError, match="no lora_B_bias for"):
    load("nobias", cfg={**config, "lora_bias": True})
  # the pattern's rank applies: the saved r=4 tensors do not fit it
  with pytest.raises(ValueError, match=r"q_proj.lora_A.weight.*\[4, 32\], "
                     r"the model needs \[2, 32\] \(r=2"):
    load("pattern", cfg={**config, "rank_pattern": {"q_proj": 2}})
  # a whole module's tensor that the config's modules_to_save does not name
  with pytest.raises(NotImplementedError, match="modules_to_save selects"):
    load("save", ten={**tensors, "base_model.model.lm_head.weight":
                      np.zeros((4, 4), np.float32)})
  with pytest.raises(ValueError, match="peft_type"):
    load("ia3", cfg={**config, "peft_type": "IA3"})
  with pytest.raises(ValueError, match="not start with"):
    load("prefix", ten={k.replace("base_model.model.", ""): v
                        for k, v in tensors.items()})
  model = adapted()
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    load("twice", model=model)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_adapter(tiny(), tmp_path / "nothing")
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(config))
  (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
  with pytest.raises(FileNotFoundError, match="adapter_model.bin"):
    load_adapter(tiny(), tmp_path / "bin")
  assert isinstance(load("ok"), models.LlamaForCausalLM)


def test_load_accepts_peft_s_full_config_and_old_dora_key(tmp_path):
  model = adapted(target_modules=["q_proj", "v_proj"], use_dora=True)
  tensors = adapter_state_dict(model)
  old = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v
         for k, v in tensors.items()}
  # the fields peft 0.18 writes (asdict of LoraConfig, runtime_config
  # removed), at their defaults
  config = model.model.layers[0].self_attn.q_proj.config.to_dict()
  config.update({
      "auto_mapping": None, "peft_version": "0.18.1", "revision": None,
      "megatron_config": None, "megatron_core": "megatron.core",
      "trainable_token_indices": None, "loftq_config": {},
      "eva_config": None, "corda_config": None, "lora_ga_config": None,
      "velora_config": None, "alora_invocation_tokens": None,
      "use_qalora": False, "qalora_group_size": 16,
      "monteclora_config": None, "layer_replication": None,
      "target_parameters": None, "use_bdlora": None, "arrow_config": None,
      "kasa_config": None, "ensure_weight_tying": False,
      "inference_mode": True, "target_modules": ["v_proj", "q_proj"]})
  fresh = load_adapter(tiny(), _write(tmp_path / "a", config, old))
  np.testing.assert_array_equal(_logits(fresh), _logits(model))
  save_adapter(fresh, tmp_path / "b")
  with open(tmp_path / "b" / "adapter_config.json") as f:
    assert json.load(f) == config
  assert sorted(read_adapter(tmp_path / "b")[1]) == sorted(tensors)


def test_bf16_adapters_load_as_float32_and_keep_dtype_on_save(tmp_path):
  model = adapted(lora_alpha=4)
  config = model.model.layers[0].self_attn.q_proj.config.to_dict()
  tensors = {k: v.astype(jnp.bfloat16)
             for k, v in adapter_state_dict(model).items()}
  fresh = load_adapter(tiny(), _write(tmp_path / "a", config, tensors))
  layer = fresh.model.layers[0].self_attn.q_proj
  assert layer.lora_A[...].dtype == jnp.float32
  bf = load_adapter(tiny(), tmp_path / "a", lora_dtype=jnp.bfloat16)
  save_adapter(bf, tmp_path / "b")
  assert {v.dtype.name for v in read_adapter(tmp_path / "b")[1].values()} == {
      "bfloat16"}


# ---------------------------------------------------------------------------
# golden: adapters saved by PEFT

# case -> (base folder under tests/golden/llama, quantization)
CASES = {
    "qwen2_r4_all_linear": ("qwen2", None),
    "llama3_r8_rslora_qv": ("llama3", None),
    "mistral_dora_regex": ("mistral", None),
    "llama3_nf4_dora": ("llama3", Q4),
    "llama3_patterns_layers": ("llama3", None),
    "mistral_rslora_patterns": ("mistral", None),
    "llama3_modules_to_save": ("llama3", None),
    "mistral_modules_to_save_embed_mlp": ("mistral", None),
    "qwen2_tied_head_to_save": ("qwen2", None),
    "qwen2_tied_embed_to_save": ("qwen2", None),
    "llama3_all_linear_mlp_saved": ("llama3", None),
    "qwen2_bias_all": ("qwen2", None),
    "qwen2_bias_lora_only": ("qwen2", None),
    "qwen2_lora_bias": ("qwen2", None),
}
# Logits: the float base models match transformers to 1e-5 of the largest
# logit (tests/models/llama_test.py); the adapters add float32 matmuls of
# the same size, so the same bound holds. The nf4 fixture ran on a GPU
# (bitsandbytes' CUDA dequantization, cuBLAS float32): 1e-4, as the
# fp32-compute bitsandbytes fixtures of tests/io/convert_test.py. Gradients:
# a backward pass roughly doubles the float32 rounding path and divides by
# small numbers in log_softmax: 1e-4 of each tensor's largest entry.
LOGITS_REL = {None: 1e-5, Q4: 1e-4}
GRAD_REL = 1e-4


def _fixture(case: str) -> pathlib.Path:
  folder = PEFT_GOLDEN / case
  files = ("adapter_config.json", "adapter_model.safetensors",
           "expected.npz")
  if all((folder / f).is_file() for f in files):
    return folder
  pytest.fail(
      f"missing golden fixture {folder} (needs {', '.join(files)}): "
      f"generate it with `python {SCRIPT}` from the repository root "
      "(needs torch, transformers and peft; the nf4 case bitsandbytes on a "
      "CUDA GPU, or pass --skip-4bit to record it as skipped).",
      pytrace=False)


def _golden_model(case):
  folder = _fixture(case)
  base, quantization = CASES[case]
  model = convert.from_pretrained(GOLDEN / "llama" / base,
                                  quantization=quantization, progress=False)
  model = load_adapter(model, folder)
  return model, np.load(folder / "expected.npz"), quantization


@pytest.mark.parametrize("case", list(CASES))
def test_golden_logits_match_peft(case):
  model, exp, q = _golden_model(case)
  if q is not None:
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer,
                      Linear4bit)
  _close(_logits(model, exp["ids"]), exp["logits"], LOGITS_REL[q])


@pytest.mark.parametrize("case", list(CASES))
def test_golden_gradients_match_peft(case):
  model, exp, _ = _golden_model(case)
  ids = jnp.asarray(exp["ids"], jnp.int32)
  targets = jnp.asarray(exp["targets"], jnp.int32)

  def loss(model):
    logits, _ = model(ids)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  value, grads = nnx.value_and_grad(
      loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  _close(value, exp["loss"], 1e-5)
  holder = nnx.clone(model)
  nnx.update(holder, grads)
  got = adapter_state_dict(holder)
  want = {k[len("grad/"):]: exp[k] for k in exp.files if k.startswith("grad/")}
  assert sorted(got) == sorted(want)
  for key in want:
    try:
      _close(got[key], want[key], GRAD_REL)
    except AssertionError as e:
      raise AssertionError(f"{key}: {e}") from None


@pytest.mark.parametrize("case", list(CASES))
def test_golden_resave_gives_peft_s_files(case, tmp_path):
  folder = _fixture(case)
  model, _, _ = _golden_model(case)
  out = pathlib.Path(save_adapter(model, tmp_path / "a"))
  peft_t = safetensors.numpy.load_file(folder / "adapter_model.safetensors")
  ours = safetensors.numpy.load_file(out / "adapter_model.safetensors")
  assert sorted(ours) == sorted(peft_t)
  for k, v in peft_t.items():
    assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
    assert ours[k].tobytes() == v.tobytes(), k
  for f in (folder, out):
    with safetensors.safe_open(f / "adapter_model.safetensors", "numpy") as h:
      assert h.metadata() == {"format": "pt"}
  want = json.loads((folder / "adapter_config.json").read_text())
  got = json.loads((out / "adapter_config.json").read_text())
  assert sorted(got) == sorted(want)
  for key in want:
    if key == "target_modules" and isinstance(want[key], list):
      assert sorted(got[key]) == sorted(want[key])
    else:
      assert got[key] == want[key], key


@pytest.mark.parametrize("case", list(CASES))
def test_golden_merged_equals_unmerged(case):
  model, exp, q = _golden_model(case)
  ids = exp["ids"]
  rel = LOGITS_REL[q]
  if q is None:
    merge_lora(model)
    got = _logits(model, ids)
    _close(got, exp["logits"], rel)
    _close(got, exp["merged_logits"], rel)
    return
  float_merged = merge_lora(nnx.clone(model), requantize=False)
  _close(_logits(float_merged, ids), exp["logits"], rel)
  merge_lora(model, requantize=True)
  # Both sides re-quantize W + delta to NF4; a float32 rounding difference
  # can move an element across a code boundary, so this is looser.
  _close(_logits(model, ids), exp["merged_logits"], 1e-3)


@pytest.mark.parametrize("save", ["save_pretrained", "save_checkpoint"])
def test_full_checkpoints_refuse_a_model_with_adapters(tmp_path, save):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxbnb import convert, lora, models  # pylint: disable=g-import-not-at-top
  cfg = models.LlamaConfig(vocab_size=32, hidden_size=16,
                           intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
  model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=["q_proj"]),
                  rngs=nnx.Rngs(1))
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="save_adapter.*merge_lora"):
    getattr(convert, save)(model, out)
  assert not out.exists()


# -- an adapted lm_head saved with its base weight ----------------------------
# PEFT's default save_embedding_layers="auto" stores an adapted (untied)
# lm_head's own weight as `base_model.model.lm_head.base_layer.weight`, and
# set_peft_model_state_dict loads it over the base layer's.
_HEAD_KEY = "base_model.model.lm_head.base_layer.weight"


def _head_model(quantization=None):
  return convert.from_pretrained(GOLDEN / "llama" / "llama3",
                                 quantization=quantization, progress=False)


def _head_copy(tmp_path, change):
  """The llama3_lm_head_auto fixture with its tensors edited by `change`."""
  src = _fixture("llama3_lm_head_auto")
  dst = tmp_path / "adapter"
  dst.mkdir()
  (dst / "adapter_config.json").write_text(
      (src / "adapter_config.json").read_text())
  tensors = safetensors.numpy.load_file(src / "adapter_model.safetensors")
  change(tensors)
  safetensors.numpy.save_file(tensors, dst / "adapter_model.safetensors",
                              {"format": "pt"})
  return dst


def test_golden_lm_head_adapter_with_base_weight_matches_peft():
  folder = _fixture("llama3_lm_head_auto")
  saved = safetensors.numpy.load_file(folder / "adapter_model.safetensors")
  assert _HEAD_KEY in saved  # what this fixture is about
  exp = np.load(folder / "expected.npz")
  model = load_adapter(_head_model(), folder)
  assert isinstance(model.lm_head, LoRALinear)
  np.testing.assert_array_equal(model.lm_head.base_layer.weight[...],
                                saved[_HEAD_KEY])
  _close(_logits(model, exp["ids"]), exp["logits"], LOGITS_REL[None])
  merge_lora(model)
  _close(_logits(model, exp["ids"]), exp["merged_logits"], LOGITS_REL[None])


def test_lm_head_base_weight_replaces_the_models_as_peft_does(tmp_path):
  # A different (float16) saved head: PEFT copies it over the base layer,
  # cast to the parameter's dtype; so does jaxbnb.
  new = (np.random.default_rng(0).normal(size=(128, 64)) * 0.1).astype(
      np.float16)
  folder = _head_copy(tmp_path, lambda t: t.update({_HEAD_KEY: new}))
  model = load_adapter(_head_model(), folder)
  w = model.lm_head.base_layer.weight[...]
  assert w.dtype == jnp.float32
  np.testing.assert_array_equal(w, new.astype(np.float32))


@pytest.mark.parametrize("change, error, match", [
    (lambda t: t.update({_HEAD_KEY: t[_HEAD_KEY][:100]}), ValueError,
     r"lm_head.base_layer.weight.*\[100, 64\].*\[128, 64\]"),
    (lambda t: t.update({_HEAD_KEY: t[_HEAD_KEY].astype(np.int32)}),
     ValueError, "lm_head.base_layer.weight.*int32"),
    (lambda t: [t.pop(k) for k in list(t) if "lm_head.lora_" in k],
     ValueError, "base_layer tensors for 'lm_head' but no lora_A"),
])
def test_lm_head_base_weight_checked(tmp_path, change, error, match):
  folder = _head_copy(tmp_path, change)
  model = _head_model()
  before = np.asarray(model.lm_head.weight[...])
  with pytest.raises(error, match=match):
    load_adapter(model, folder)
  assert not lora_layers_of(model)  # refused before any change
  np.testing.assert_array_equal(model.lm_head.weight[...], before)


def test_lm_head_base_weight_over_a_quantized_head_is_refused():
  q = dataclasses.replace(Q4, llm_int8_skip_modules=())  # lm_head 4-bit too
  model = _head_model(q)
  assert isinstance(model.lm_head, Linear4bit)
  with pytest.raises(NotImplementedError,
                     match=r"lm_head.base_layer.weight.*Linear4bit.*quantized"):
    load_adapter(model, _fixture("llama3_lm_head_auto"))


def lora_layers_of(model):
  return [p for p, node in nnx.iter_graph(model)
          if isinstance(node, LoRALinear)]


def test_overlapping_patterns_keep_their_order_through_a_save(tmp_path):
  """The first matching pattern key applies (PEFT's get_pattern_key), so
  save_adapter writes the pattern dicts in their order (PEFT's own
  save_pretrained sorts them, which changes the model it loads back)."""
  cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                   alpha_pattern={"self_attn.*": 2, "q_proj": 32},
                   rank_pattern={"v_proj|q_proj": 2, "q_proj": 6},
                   init_lora_weights=False)
  model = apply_lora(tiny(), cfg, rngs=nnx.Rngs(0))
  q = model.model.layers[0].self_attn.q_proj
  assert (q.r, q.scaling) == (2, 1.0)
  out = pathlib.Path(save_adapter(model, tmp_path / "a"))
  text = (out / "adapter_config.json").read_text()
  assert text.index('"self_attn.*"') < text.index('"q_proj": 32')
  assert text.index('"v_proj|q_proj"') < text.index('"q_proj": 6')
  keys = list(json.loads(text))
  assert keys == sorted(keys)  # the rest sorted, as PEFT writes it
  again = load_adapter(tiny(), out)
  q2 = again.model.layers[0].self_attn.q_proj
  assert (q2.r, q2.scaling) == (2, 1.0)


def test_layer_options_as_peft_reads_them():
  # PEFT accepts an empty layers_to_transform beside a layers_pattern
  # (no layer filter) and refuses it beside a target_modules string.
  cfg = LoRAConfig(target_modules=["v_proj"], layers_to_transform=[],
                   layers_pattern="layers")
  assert sorted(find_targets(tiny(), cfg)) == [
      "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
  with pytest.raises(ValueError, match="`layers_to_transform` cannot be used"):
    LoRAConfig(target_modules="all-linear", layers_to_transform=[])
  with pytest.raises(ValueError, match=r"matches no linear layer of "
                     r"LlamaForCausalLM in the layers layers_to_transform="
                     r"\(5,\) \(layers_pattern='layers'\) selects"):
    apply_lora(tiny(), LoRAConfig(target_modules=["v_proj"],
                                  layers_to_transform=[5],
                                  layers_pattern="layers"),
               rngs=nnx.Rngs(0))
