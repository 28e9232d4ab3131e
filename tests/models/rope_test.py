"""RoPE inverse frequencies vs transformers (tests/golden/llama/rope.npz)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb._src.models import rope
from jaxbnb.models import LlamaConfig

GOLDEN = pathlib.Path(__file__).parent.parent / "golden" / "llama"
_ROPE = np.load(GOLDEN / "rope.npz")  # a missing fixture fails collection
_KEYS = sorted({k.split("/")[0] for k in _ROPE.files})
# Not silently fewer: every rope type make_llama_golden.py records.
assert {"default", "linear", "yarn", "llama3"} <= set(_KEYS), _KEYS
# transformers computes inv_freq = 1 / base**(arange(0, d, 2) / d) in
# float32 (and the scaled variants from it); jaxbnb's float32 pow/exp may
# round differently: two float32 roundings, relative.
RTOL = 2 * float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("key", _KEYS)
def test_inverse_frequencies_match_transformers(key):
  cfg = LlamaConfig.from_hf(json.loads(str(_ROPE[key + "/config"])))
  inv, factor = rope.inverse_frequencies(cfg)
  assert inv.dtype == np.float32 and inv.shape == (cfg.head_dim // 2,)
  np.testing.assert_allclose(inv, _ROPE[key + "/inv_freq"], rtol=RTOL)
  np.testing.assert_allclose(factor, _ROPE[key + "/attention_factor"],
                             rtol=RTOL)


def test_scaled_types_really_differ_from_default():
  # Guards against a fixture where every type collapses to plain RoPE.
  base = _ROPE["default/inv_freq"]
  for key in ("linear", "yarn"):
    assert not np.allclose(_ROPE[key + "/inv_freq"], base)
  assert _ROPE["yarn/attention_factor"] > 1.0


@pytest.mark.parametrize("name", ["llama3", "qwen2", "mistral"])
def test_model_fixture_frequencies(name):
  cfg = LlamaConfig.from_hf(json.loads((GOLDEN / name / "config.json")
                                       .read_text()))
  expected = np.load(GOLDEN / name / "expected.npz")
  inv, factor = rope.inverse_frequencies(cfg)
  np.testing.assert_allclose(inv, expected["inv_freq"], rtol=RTOL)
  np.testing.assert_allclose(factor, float(expected["attention_scaling"]),
                             rtol=RTOL)


def test_rope_scores_depend_only_on_relative_position():
  cfg = LlamaConfig(vocab_size=8, hidden_size=64, intermediate_size=8,
                    num_hidden_layers=1, num_attention_heads=2)
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 32))

  def score(pq, pk):
    pos = jnp.array([[pq, pk]])
    cos, sin = rope.rope_cos_sin(cfg, pos, jnp.float32)
    x = jnp.concatenate([q, k], axis=1)
    r = rope.apply_rope(x, cos, sin)
    return float(jnp.sum(r[0, 0] * r[0, 1]))

  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4, abs=1e-5)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


def test_unsupported_rope_type():
  with pytest.raises(NotImplementedError, match="longrope"):
    LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=2,
                rope_scaling={"rope_type": "longrope", "factor": 2.0})
