"""QuantizationConfig: HF BitsAndBytesConfig fields, dict round trip, skips."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb._src.layers.quant_config import QuantizationConfig

# What transformers 5 writes for BitsAndBytesConfig(load_in_4bit=True,
# bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
# bnb_4bit_compute_dtype=torch.bfloat16).to_dict(), key order included.
HF_NF4_DQ = json.loads("""{
  "quant_method": "bitsandbytes", "_load_in_8bit": false,
  "_load_in_4bit": true, "llm_int8_threshold": 6.0,
  "llm_int8_skip_modules": null, "llm_int8_enable_fp32_cpu_offload": false,
  "llm_int8_has_fp16_weight": false, "bnb_4bit_quant_type": "nf4",
  "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16",
  "bnb_4bit_quant_storage": "uint8", "load_in_4bit": true,
  "load_in_8bit": false}""")


def test_defaults_follow_transformers():
  q = QuantizationConfig(load_in_4bit=True)
  assert q.bnb_4bit_quant_type == "fp4"
  assert not q.bnb_4bit_use_double_quant
  assert q.compute_dtype == jnp.float32
  assert q.quant_storage == jnp.uint8
  assert q.bnb_4bit_blocksize == 64


def test_to_dict_matches_hf_exactly():
  q = QuantizationConfig.nf4(double_quant=True, compute_dtype=jnp.bfloat16)
  d = q.to_dict()
  assert d == HF_NF4_DQ
  assert list(d) == list(HF_NF4_DQ)


def test_from_dict_round_trip_and_unknown_keys():
  q = QuantizationConfig.from_dict({**HF_NF4_DQ, "something_new": 1})
  assert q == QuantizationConfig.nf4()
  q2 = QuantizationConfig(load_in_4bit=True, bnb_4bit_blocksize=128,
                          bnb_4bit_quant_storage="bfloat16",
                          llm_int8_skip_modules=["lm_head", "mlp.down_proj"])
  assert QuantizationConfig.from_dict(q2.to_dict()) == q2
  assert q2.to_dict()["bnb_4bit_blocksize"] == 128
  assert q2.llm_int8_skip_modules == ("lm_head", "mlp.down_proj")


def test_dtype_spellings():
  for spelling in ("bfloat16", "torch.bfloat16", jnp.bfloat16):
    q = QuantizationConfig(load_in_4bit=True,
                           bnb_4bit_compute_dtype=spelling)
    assert q.bnb_4bit_compute_dtype == "bfloat16"


def test_skips():
  q = QuantizationConfig.nf4()
  assert q.skips("lm_head") and q.skip_modules == ("lm_head",)
  assert not q.skips("model.layers.0.self_attn.q_proj")
  q = QuantizationConfig.nf4(llm_int8_skip_modules=["mlp.down_proj", "o_proj"])
  assert q.skips("model.layers.3.mlp.down_proj")
  assert q.skips("model.layers.3.self_attn.o_proj")
  assert not q.skips("model.layers.3.mlp.up_proj")
  assert not q.skips("lm_head")  # an explicit list replaces the default
  assert QuantizationConfig().skips("model.layers.0.mlp.up_proj")
  # A glob of an earlier jaxbnb save (no regular expression) still reads.
  assert QuantizationConfig.nf4(
      llm_int8_skip_modules=["*embed*"]).skips("model.embed_proj")


# transformers 5.25's `should_convert_module`, run on these paths and single
# entries (transformers 5.25.0, Python-only, no torch model needed): the
# modules each entry keeps in full precision.
_PATHS = [f"model.layers.{i}.{m}" for i in (1, 11)
          for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj",
                    "mlp.down_proj")] + ["lm_head"]
_L1 = [p for p in _PATHS if p.startswith("model.layers.1.")]
_L11 = [p for p in _PATHS if p.startswith("model.layers.11.")]
_TRANSFORMERS_SKIPS = {
    "mlp": [], "self_attn": [], "layers.1": [], "o_*": [],
    "proj": _PATHS[:-1],
    "q_proj": [_PATHS[0], _PATHS[4]],
    "model.layers.1": _L1,
    "mlp.down_proj": [_PATHS[3], _PATHS[7]],
    "model.layers.*.self_attn": [p for p in _PATHS if "self_attn" in p],
    r"model\.layers\.1\d\..*": _L11,
    "lm_head": ["lm_head"], "head": ["lm_head"],
}


@pytest.mark.parametrize("entry", sorted(_TRANSFORMERS_SKIPS))
def test_skips_reads_entries_as_transformers_5(entry):
  q = QuantizationConfig.nf4(llm_int8_skip_modules=[entry])
  assert [p for p in _PATHS if q.skips(p)] == _TRANSFORMERS_SKIPS[entry]


@pytest.mark.parametrize("kwargs, match", [
    (dict(load_in_4bit=True, load_in_8bit=True), "cannot both"),
    (dict(load_in_4bit=1), "load_in_4bit"),
    (dict(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type"),
    (dict(bnb_4bit_blocksize=48), "bnb_4bit_blocksize"),
    (dict(bnb_4bit_compute_dtype="float64"), "bnb_4bit_compute_dtype"),
    (dict(bnb_4bit_quant_storage="int4"), "bnb_4bit_quant_storage"),
    (dict(llm_int8_threshold=-1.0), "llm_int8_threshold"),
    (dict(llm_int8_skip_modules="lm_head"), "llm_int8_skip_modules"),
])
def test_bad_values(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    QuantizationConfig(**kwargs)


def test_from_dict_rejects_other_methods():
  with pytest.raises(ValueError, match="quant_method"):
    QuantizationConfig.from_dict({"quant_method": "gptq"})


def test_compute_dtype_none_is_transformers_default_float32():
  """`BitsAndBytesConfig(bnb_4bit_compute_dtype=None)` computes in float32;
  the same argument is accepted here, and from a config.json's null."""
  cfg = QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=None)
  assert cfg.bnb_4bit_compute_dtype == "float32"
  assert cfg == QuantizationConfig(load_in_4bit=True)
  assert QuantizationConfig.from_dict(
      {"load_in_4bit": True, "bnb_4bit_compute_dtype": None}) == cfg


def test_threshold_takes_numpy_scalars_and_refuses_nan():
  q = QuantizationConfig(load_in_8bit=True, llm_int8_threshold=np.float32(4))
  assert q.llm_int8_threshold == 4.0 and type(q.llm_int8_threshold) is float
  with pytest.raises(ValueError, match="`llm_int8_threshold` must be a float "
                     ">= 0, got nan"):
    QuantizationConfig(load_in_8bit=True, llm_int8_threshold=float("nan"))
