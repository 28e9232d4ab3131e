"""LLM.int8 checkpoints: quantize on load, the bitsandbytes 8-bit format
(reference section 3.2), pre-quantized loading, and orbax round trips of
int8 linears and quantized embeddings.

The tiny random Llama is tests/golden/bnb_llama/orig (2 layers, hidden 128,
intermediate 256, vocab 128, untied head, bf16).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbnb import functional as F
from jaxbnb._src.io import convert
from jaxbnb._src.io import orbax_io
from jaxbnb._src.io.checkpoint_source import write_safetensors
from jaxbnb._src.layers.common import QuantizedWeight
from jaxbnb._src.layers.embedding import Embedding4bit
from jaxbnb._src.layers.embedding import Embedding8bit
from jaxbnb._src.layers.embedding import quantize_embeddings
from jaxbnb._src.layers.linear8bit import Linear8bitLt
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.quant.weights import Int8Params
from tests.io import common

INT8 = QuantizationConfig(load_in_8bit=True)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]

# What transformers' BitsAndBytesConfig(load_in_8bit=True).to_dict() writes.
HF_INT8_CONFIG = {
    "_load_in_4bit": False,
    "_load_in_8bit": True,
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "fp4",
    "bnb_4bit_use_double_quant": False,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": False,
    "load_in_8bit": True,
    "quant_method": "bitsandbytes",
}


def _int8_model(**kw):
  return common.load("orig", quantization=INT8, **kw)


def _float_tensors():
  return common.read_all(common.golden("orig"))


# -- quantize on load ---------------------------------------------------------


def test_quantize_on_load_equals_quantize_int8_weight():
  model = _int8_model()
  floats = _float_tensors()
  variables = dict(model.iter_variables())
  assert sorted(n for n, v in variables.items()
                if isinstance(v, QuantizedWeight)) == sorted(
                    n + ".weight" for n in LINEARS)
  for name in LINEARS:
    got = variables[name + ".weight"].get_value()
    want = F.quantize_int8_weight(jnp.asarray(floats[name + ".weight"]))
    assert isinstance(got, Int8Params) and got.dtype == "bfloat16"
    assert np.asarray(got.CB).tobytes() == np.asarray(want.CB).tobytes()
    assert np.asarray(got.SCB).tobytes() == np.asarray(want.SCB).tobytes()
    layer = model.model.layers[int(name.split(".")[2])]
    for part in name.split(".")[3:]:
      layer = getattr(layer, part)
    assert isinstance(layer, Linear8bitLt) and layer.threshold == 6.0
  # lm_head stays float (transformers' default skip list), bit for bit.
  head = np.asarray(variables["lm_head.weight"].get_value())
  assert head.tobytes() == floats["lm_head.weight"].tobytes()


def test_skip_modules_and_threshold():
  q = QuantizationConfig(load_in_8bit=True, llm_int8_threshold=2.5,
                         llm_int8_skip_modules=["lm_head", "down_proj"])
  model = common.load("orig", quantization=q)
  mlp = model.model.layers[1].mlp
  assert not isinstance(mlp.down_proj, Linear8bitLt)
  assert isinstance(mlp.up_proj, Linear8bitLt)
  assert mlp.up_proj.threshold == 2.5


# -- the saved format ---------------------------------------------------------


def test_saved_tensors_are_bitsandbytes_8bit_format(tmp_path):
  model = _int8_model()
  convert.save_pretrained(model, tmp_path / "m", progress=False)
  saved = common.read_all(tmp_path / "m")
  floats = _float_tensors()
  want_keys = set(floats)
  for name in LINEARS:
    want_keys |= {name + ".SCB", name + ".weight_format"}
  assert set(saved) == want_keys
  for name in LINEARS:
    n, k = floats[name + ".weight"].shape
    w, scb, fmt = (saved[name + s] for s in (".weight", ".SCB",
                                             ".weight_format"))
    assert (w.dtype, w.shape) == (np.int8, (n, k))
    assert (scb.dtype, scb.shape) == (np.float32, (n,))
    assert (fmt.dtype, fmt.shape, int(fmt)) == (np.uint8, (), 0)
    # SCB is the row absmax of the float16-cast weight (fp16-representable).
    absmax = np.abs(floats[name + ".weight"].astype(np.float16)).max(1)
    assert scb.tobytes() == absmax.astype(np.float32).tobytes()
  for name in set(floats) - {n + ".weight" for n in LINEARS}:
    assert saved[name].dtype == floats[name].dtype, name
    assert saved[name].tobytes() == floats[name].tobytes(), name
  cfg = common.read_config(tmp_path / "m")
  assert cfg["quantization_config"] == HF_INT8_CONFIG
  assert cfg["dtype"] == "bfloat16"


def test_save_load_round_trip_bit_identical(tmp_path):
  model = _int8_model()
  convert.save_pretrained(model, tmp_path / "a", progress=False)
  again = convert.from_pretrained(tmp_path / "a", progress=False)
  assert again.quantization == model.quantization == INT8
  assert again.param_dtype == model.param_dtype
  common.assert_states_identical(model, again)
  for (_, a), (_, b) in zip(model.iter_variables(), again.iter_variables()):
    a, b = a.get_value(), b.get_value()
    if isinstance(a, Int8Params):
      assert isinstance(b, Int8Params) and a.dtype == b.dtype
  convert.save_pretrained(again, tmp_path / "b", progress=False)
  common.assert_same_bytes(common.read_all(tmp_path / "b"),
                           common.read_all(tmp_path / "a"))
  assert (common.read_config(tmp_path / "b")
          == common.read_config(tmp_path / "a"))
  # Passing the same config (another threshold allowed) works too; a 4-bit
  # one conflicts.
  q = QuantizationConfig(load_in_8bit=True, llm_int8_threshold=3.0)
  other = convert.from_pretrained(tmp_path / "a", quantization=q,
                                  progress=False)
  assert other.model.layers[0].mlp.up_proj.threshold == 3.0
  common.assert_states_identical(model, other)
  with pytest.raises(ValueError, match=r"asks for 4-bit nf4 \(load_in_4bit\)"
                     r" but .* is a bitsandbytes LLM.int8 \(load_in_8bit\) "
                     "checkpoint"):
    convert.from_pretrained(tmp_path / "a",
                            quantization=QuantizationConfig.nf4(),
                            progress=False)


def test_checkpoint_info(tmp_path):
  model = _int8_model()
  convert.save_pretrained(model, tmp_path / "m", progress=False)
  info = convert.checkpoint_info(tmp_path / "m")
  assert info["quantization"] == {"method": "bitsandbytes", "bits": 8,
                                  "quantized_linears": 14, "threshold": 6.0}
  assert info["num_parameters"] == model.num_parameters()
  assert info["tensors_by_dtype"]["int8"] == 14
  assert info["tensors_by_dtype"]["uint8"] == 14


# -- checkpoints written by transformers + bitsandbytes ------------------------


def _transformers_style(folder, *, weight_format=0, threshold=4.0,
                        config=True, torch_dtype="float16"):
  """An 8-bit folder as transformers' save_pretrained writes it (section
  3.2): int8 `weight`, fp32 `SCB`, uint8 scalar `weight_format` per linear,
  float16 elsewhere, config with `quantization_config` and `torch_dtype`.

  CB and SCB are random, not any quantization of a float weight, so only a
  loader that takes them as stored reproduces them.
  """
  rng = np.random.default_rng(7)
  tensors = {}
  for name, arr in _float_tensors().items():
    if name[:-len(".weight")] in LINEARS:
      n, k = arr.shape
      tensors[name] = rng.integers(-127, 128, (n, k), dtype=np.int8)
      scb = rng.uniform(0.01, 0.2, n).astype(np.float16)
      tensors[name[:-len("weight")] + "SCB"] = scb.astype(np.float32)
      tensors[name[:-len("weight")] + "weight_format"] = np.asarray(
          weight_format, np.uint8)
    else:
      tensors[name] = arr.astype(np.float16)
  cfg = common.read_config(common.golden("orig"))
  del cfg["dtype"]
  cfg["torch_dtype"] = torch_dtype
  if config:
    cfg["quantization_config"] = dict(HF_INT8_CONFIG,
                                      llm_int8_threshold=threshold)
  os.makedirs(folder)
  write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  return tensors


@pytest.mark.parametrize("config", [True, False])
def test_transformers_checkpoint_loads_without_requantizing(tmp_path, config):
  folder = str(tmp_path / "hf")
  tensors = _transformers_style(folder, config=config)
  model = convert.from_pretrained(folder, progress=False)
  assert model.quantization.load_in_8bit
  assert model.param_dtype == jnp.float16
  want_threshold = 4.0 if config else 6.0  # none in config: HF's default
  variables = dict(model.iter_variables())
  for name in LINEARS:
    got = variables[name + ".weight"].get_value()
    assert isinstance(got, Int8Params) and got.dtype == "float16"
    assert np.asarray(got.CB).tobytes() == tensors[name + ".weight"].tobytes()
    assert np.asarray(got.SCB).tobytes() == tensors[name + ".SCB"].tobytes()
  assert model.model.layers[0].self_attn.q_proj.threshold == want_threshold
  out = common.logits(model, [[1, 2, 3, 4]])
  assert out.shape == (1, 4, 128) and np.isfinite(out).all()
  # ... and saves back the same tensors.
  convert.save_pretrained(model, tmp_path / "again", progress=False)
  common.assert_same_bytes(common.read_all(tmp_path / "again"), tensors)


def test_checkpoint_dtype_is_not_taken_from_scb(tmp_path):
  """Without a dtype in config.json the float tensors decide, not SCB."""
  folder = str(tmp_path / "hf")
  _transformers_style(folder, torch_dtype=None)
  cfg = common.read_config(folder)
  del cfg["torch_dtype"]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  assert convert.from_pretrained(folder, progress=False).param_dtype == (
      jnp.float16)


@pytest.mark.parametrize("value,label", [(1, "col32"), (2, "col_turing"),
                                         (3, "col_ampere")])
def test_tiled_weight_format_refused(tmp_path, value, label):
  folder = str(tmp_path / "hf")
  _transformers_style(folder, weight_format=value)
  with pytest.raises(ValueError,
                     match=rf"model.safetensors:model\.layers\.\d\.\w+\.\w+"
                     rf"\.weight_format is weight_format {value} "
                     rf"\('{label}'\); only 0 \('row'\)"):
    convert.from_pretrained(folder, progress=False)


def test_config_says_8bit_without_scb(tmp_path):
  folder = common.copy_checkpoint("orig", tmp_path / "c")
  cfg = common.read_config(folder)
  cfg["quantization_config"] = HF_INT8_CONFIG
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="load_in_8bit but no tensor has an "
                     "`SCB`"):
    convert.from_pretrained(folder, progress=False)


# -- logits -------------------------------------------------------------------


def test_int8_logits_close_to_float_and_scb_matters():
  """The int8 model's logits are within the row-quantization error.

  Each linear rounds its weight rows and its activation rows to int8 with a
  step of absmax/127: a uniform error of variance step^2/12 per element,
  so a row with absmax/rms ratio r adds a relative output error of
  r / (127 * sqrt(12)) per quantized operand. With the weights' measured r
  (about 2.8 for these Gaussian rows) and the same r assumed for the
  activations, one linear's relative error is delta = sqrt(2) * r / 440
  (about 0.009). The logits carry a few of these through the 2-layer
  residual stream (measured: about 1.7 delta); the tolerance is 3 delta.
  A wrong SCB is not within it: scaling every SCB by 1.03 already doubles
  the error, and shifted rows or a 1/127 convention are far off.
  """
  fmodel = common.load("orig", param_dtype="float32")
  qmodel = common.load("orig", quantization=INT8, param_dtype="float32")
  ratios = []
  for name, arr in _float_tensors().items():
    if name[:-len(".weight")] in LINEARS:
      w = arr.astype(np.float32)
      ratios.append(np.abs(w).max(1) / np.sqrt((w ** 2).mean(1)))
  delta = np.sqrt(2) * np.mean(np.concatenate(ratios)) / (127 * np.sqrt(12))
  tol = 3 * delta
  ids = np.random.default_rng(0).integers(0, 128, (4, 32))
  want = common.logits(fmodel, ids)

  def rel_err(model):
    got = common.logits(model, ids)
    centred = want - want.mean(-1, keepdims=True)
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(centred ** 2)))

  assert 0.005 < delta < 0.015
  err = rel_err(qmodel)
  assert 0 < err < tol, (err, tol)

  def with_scb(fn):
    graphdef, state = nnx.split(qmodel)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for _, var in model.iter_variables():
      if isinstance(var, QuantizedWeight):
        w = var.get_value()
        var.set_value(Int8Params(w.CB, fn(w.SCB), w.dtype))
    return model

  for wrong in (lambda s: s * 1.03, lambda s: s / 1.03,
                lambda s: jnp.roll(s, 1), lambda s: s / 127):
    assert rel_err(with_scb(wrong)) > tol


# -- orbax --------------------------------------------------------------------


def _roundtrip(model, path):
  orbax_io.save_checkpoint(model, path)
  restored = orbax_io.restore_checkpoint(path)
  common.assert_states_identical(model, restored)
  assert restored.quantization == model.quantization
  ids = [[3, 1, 4, 1, 5]]
  assert common.logits(restored, ids).tobytes() == common.logits(
      model, ids).tobytes()
  return restored


def test_orbax_int8_linears(tmp_path):
  q = QuantizationConfig(load_in_8bit=True, llm_int8_threshold=2.0)
  model = common.load("orig", quantization=q)
  restored = _roundtrip(model, tmp_path / "ckpt")
  layer = restored.model.layers[1].mlp.down_proj
  assert isinstance(layer, Linear8bitLt) and layer.threshold == 2.0
  w = layer.weight.get_value()
  assert isinstance(w, Int8Params) and w.dtype == "bfloat16"


def _fresh(quantization=None):
  return convert.from_pretrained(common.golden("orig"), progress=False,
                                 quantization=quantization)


@pytest.mark.parametrize("bits,kwargs", [
    (8, {}),
    (8, {"dtype": jnp.float32}),
    (4, {"quant_type": "nf4", "blocksize": 64, "compress_statistics": True,
         "quant_storage": jnp.bfloat16}),
    (4, {"blocksize": 128}),
])
def test_orbax_quantized_embeddings(tmp_path, bits, kwargs):
  model = quantize_embeddings(_fresh(), bits, **kwargs)
  restored = _roundtrip(model, tmp_path / "ckpt")
  emb, want = restored.model.embed_tokens, model.model.embed_tokens
  assert type(emb) is (Embedding8bit if bits == 8 else Embedding4bit)
  assert emb.dtype == want.dtype
  if bits == 4:
    a, b = emb.weight.get_value(), want.weight.get_value()
    assert (a.quant_state.quant_type, a.quant_state.blocksize,
            a.quant_state.nested, a.data.dtype) == (
                b.quant_state.quant_type, b.quant_state.blocksize,
                b.quant_state.nested, b.data.dtype)


def test_orbax_int8_linears_and_embeddings(tmp_path):
  model = quantize_embeddings(_fresh(INT8), 8)
  restored = _roundtrip(model, tmp_path / "ckpt")
  assert isinstance(restored.model.embed_tokens, Embedding8bit)
  assert isinstance(restored.model.layers[0].self_attn.q_proj, Linear8bitLt)


def test_orbax_embeddings_without_recorded_dtype(tmp_path):
  """Metadata without `quantized_embeddings`: the layout alone suffices."""
  model = quantize_embeddings(_fresh(), 8)
  path = tmp_path / "ckpt"
  orbax_io.save_checkpoint(model, path)
  meta_path = path / "jaxbnb_model.json"
  meta = json.loads(meta_path.read_text())
  assert meta["quantized_embeddings"] == {
      "model.embed_tokens": {"bits": 8, "dtype": "bfloat16"}}
  del meta["quantized_embeddings"]
  meta_path.write_text(json.dumps(meta))
  common.assert_states_identical(orbax_io.restore_checkpoint(path), model)


def test_orbax_layouts_that_fit_no_model(tmp_path):
  model = _fresh(INT8)
  path = tmp_path / "ckpt"
  orbax_io.save_checkpoint(model, path)
  meta_path = path / "jaxbnb_model.json"
  meta = json.loads(meta_path.read_text())
  meta["quantization"] = None  # a float model has no quantized linears
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="not an embedding format|do not "
                     "match"):
    orbax_io.restore_checkpoint(path)


# -- transformers + bitsandbytes load our folder (GPU machine) -----------------


@pytest.mark.gpu
def test_transformers_and_bitsandbytes_load_our_int8_folder(tmp_path):
  """transformers + bitsandbytes (CUDA) read jaxbnb's saved int8 folder into
  `Linear8bitLt` layers holding our CB/SCB, and compute our logits."""
  torch = pytest.importorskip("torch")
  bnb = pytest.importorskip("bitsandbytes")
  transformers = pytest.importorskip("transformers")
  model = _int8_model(param_dtype="float32")
  out = tmp_path / "int8"
  convert.save_pretrained(model, out)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      out, device_map="cuda", dtype=torch.float32)
  ours = model.model.layers[0].self_attn.q_proj.weight.get_value()
  theirs = hf.model.layers[0].self_attn.q_proj
  assert isinstance(theirs, bnb.nn.Linear8bitLt)
  np.testing.assert_array_equal(theirs.weight.data.cpu().numpy(),
                                np.asarray(ours.CB))
  np.testing.assert_array_equal(theirs.state.SCB.cpu().numpy()
                                if theirs.state.SCB is not None
                                else theirs.weight.SCB.cpu().numpy(),
                                np.asarray(ours.SCB))
  ids = np.random.default_rng(0).integers(0, 128, (2, 16))
  want = common.logits(model, ids)
  with torch.no_grad():
    got = hf(torch.from_numpy(ids).cuda()).logits.float().cpu().numpy()
  # Same int8 numerics on both sides; the float parts (attention, norms,
  # the float32 head) differ in summation order, which can move an
  # activation across an int8 rounding boundary now and then (one code of
  # absmax/127 on one input of a row). 2% of the logit scale covers a few
  # such flips; a wrong SCB, a transposed CB or no outlier handling moves
  # the logits by more (tests above: 3% SCB scaling doubles the error).
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < 0.02 * scale
