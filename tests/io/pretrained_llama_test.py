"""from_pretrained / save_pretrained on the transformers-made Qwen2 and Mistral
folders of tests/golden/llama (tiny random models, float32, with the logits
transformers computed in expected.npz), and `.bin` checkpoints."""

import importlib.util
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb._src.io import convert
from jaxbnb._src.io.checkpoint_source import write_safetensors
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.quant.weights import Params4bit
from tests.io import common

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden",
                      "llama")
NAMES = ("qwen2", "mistral")
# float32 jaxbnb vs float32 transformers: the derivation of
# tests/models/llama_test.py (REL_FP32): <= 2 layers, K <= 128, ~12 float32
# stages, 1e-5 of the largest |logit| (observed ~1e-6). RoPE off, a dropped
# or negated q/k/v bias (qwen2) or swapped layers move the logits by O(1e-1).
REL_FP32 = 1e-5
Q4 = QuantizationConfig.nf4(compute_dtype="float32")


def _folder(name):
  return os.path.join(GOLDEN, name)


def _expected(name):
  return np.load(os.path.join(_folder(name), "expected.npz"))


def _close(actual, expected, rel=REL_FP32):
  err = float(np.abs(actual - expected).max())
  scale = float(np.abs(expected).max())
  assert err <= rel * scale, (err, scale, rel)


@pytest.mark.parametrize("name", NAMES)
def test_float_load_matches_transformers(name):
  model = convert.from_pretrained(_folder(name), progress=False)
  assert model.quantization is None
  assert model.model.embed_tokens.weight[...].dtype == jnp.float32
  got = common.model_tensors(model)
  want = common.read_all(_folder(name))
  if model.config.tie_word_embeddings:
    want.pop("lm_head.weight", None)
  common.assert_same_bytes(got, want)
  exp = _expected(name)
  _close(common.logits(model, exp["ids"].astype(np.int32)), exp["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_nf4_load_equals_dequantized_float(name, tmp_path):
  """NF4 on load: the 4-bit logits equal those of the float model whose
  weights are the dequantized NF4 weights (same float32 math), and differ
  from transformers' float logits (4-bit really changed the weights)."""
  m4 = convert.from_pretrained(_folder(name), quantization=Q4,
                               progress=False)
  tensors = common.read_all(_folder(name))
  n4 = 0
  for lname, module in m4.named_linears():
    value = module.weight.get_value()
    if isinstance(value, Params4bit):
      tensors[lname + ".weight"] = np.asarray(value.dequantize()).astype(
          tensors[lname + ".weight"].dtype)
      n4 += 1
  assert n4 == 7 * m4.config.num_hidden_layers
  dq = tmp_path / "dequantized"
  shutil.copytree(_folder(name), dq)
  write_safetensors(str(dq / "model.safetensors"), tensors)
  mf = convert.from_pretrained(dq, progress=False)
  exp = _expected(name)
  ids = exp["ids"].astype(np.int32)
  l4, lf = common.logits(m4, ids), common.logits(mf, ids)
  _close(l4, lf)
  assert not np.allclose(l4, exp["logits"], atol=1e-3)
  # Within the float model's reach: NF4 moves each weight by at most half a
  # code gap (<= 0.16 of the block absmax), so the logits stay correlated.
  assert np.corrcoef(l4.ravel(), exp["logits"].ravel())[0, 1] > 0.9


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quantization", [None, Q4], ids=["float", "nf4"])
def test_save_pretrained_reload_identical(name, quantization, tmp_path):
  model = convert.from_pretrained(_folder(name), quantization=quantization,
                                  progress=False)
  out = tmp_path / "saved"
  convert.save_pretrained(model, out, progress=False)
  again = convert.from_pretrained(out, progress=False)
  assert again.quantization == model.quantization
  assert again.config == model.config
  common.assert_states_identical(model, again)
  common.assert_same_bytes(common.model_tensors(again),
                           common.model_tensors(model))
  ids = _expected(name)["ids"].astype(np.int32)
  np.testing.assert_array_equal(common.logits(again, ids),
                                common.logits(model, ids))


# -- .bin checkpoints (torch) -------------------------------------------------


def test_pytorch_bin_loads_like_safetensors(tmp_path):
  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch not installed: .bin loading needs torch")
  import torch  # pylint: disable=g-import-not-at-top
  src = _folder("qwen2")
  dst = tmp_path / "bin"
  dst.mkdir()
  for f in ("config.json", "generation_config.json"):
    shutil.copy(os.path.join(src, f), dst / f)
  state = {k: torch.from_numpy(np.array(v))
           for k, v in common.read_all(src).items()}
  torch.save(state, dst / "pytorch_model.bin")
  model = convert.from_pretrained(dst, progress=False)
  common.assert_states_identical(
      model, convert.from_pretrained(src, progress=False))
  exp = _expected("qwen2")
  _close(common.logits(model, exp["ids"].astype(np.int32)), exp["logits"])


def test_pytorch_bin_without_torch_says_what_to_do(tmp_path, monkeypatch):
  # Runs with or without torch: a None entry makes `import torch` fail.
  monkeypatch.setitem(sys.modules, "torch", None)
  folder = tmp_path / "bin"
  folder.mkdir()
  (folder / "config.json").write_text(
      open(os.path.join(_folder("qwen2"), "config.json")).read())
  (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
  with pytest.raises(ImportError) as e:
    convert.from_pretrained(folder, progress=False)
  msg = str(e.value)
  assert repr(str(folder / "pytorch_model.bin")) in msg, msg
  assert "pip install torch" in msg and "safetensors" in msg, msg
