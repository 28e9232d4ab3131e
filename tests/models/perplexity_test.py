"""perplexity() against a direct per-window computation on a tiny model."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxbnb._src.models.perplexity import evaluate_text
from jaxbnb._src.models.perplexity import perplexity
from jaxbnb._src.models.perplexity import window_spans
from jaxbnb.models import LlamaConfig
from jaxbnb.models import LlamaForCausalLM


@pytest.fixture(scope="module")
def model():
  cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
  return LlamaForCausalLM(cfg, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(0).integers(0, 97, size=150)


@nnx.jit
def _forward(model, x):
  return model(x)[0]


def reference(model, ids, window, stride):
  """Plain loop, one exact-length window at a time, float64 log-softmax."""
  total, count, prev_end, begin = 0.0, 0, 0, 0
  while True:
    end = min(begin + window, len(ids))
    logits = _forward(model, np.asarray(ids[begin:end])[None].astype(np.int32))
    logits = np.asarray(jax.device_get(logits[0]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True))
                           .sum(-1, keepdims=True)) - logits.max(
                               -1, keepdims=True)
    for pos in range(max(prev_end, begin + 1), end):
      total -= logp[pos - begin - 1, ids[pos]]
      count += 1
    prev_end = end
    if end == len(ids):
      return total, count
    begin += stride


@pytest.mark.parametrize("window,stride,batch", [
    (32, None, 3), (40, 16, 2)])
def test_matches_reference(model, ids, window, stride, batch):
  r = perplexity(model, ids, window=window, stride=stride, batch_size=batch,
                 progress=False)
  nll, count = reference(model, ids, window, stride or window)
  assert r.num_tokens == count
  assert r.num_windows == len(window_spans(len(ids), window, stride or window))
  np.testing.assert_allclose(r.nll_sum, nll, rtol=2e-5)
  np.testing.assert_allclose(r.perplexity, math.exp(nll / count), rtol=2e-5)
  assert r.nll == pytest.approx(r.nll_sum / r.num_tokens)


def test_counts_follow_hf_convention():
  # Non-overlapping: every window but its first token.
  assert sum(e - f for _, e, f in window_spans(16384, 1024, 1024)) == 16368
  # Strided: every token after the first exactly once.
  spans = window_spans(1000, 256, 100)
  scored = [p for _, e, f in spans for p in range(f, e)]
  assert scored == list(range(1, 1000))
  assert all(e - b <= 256 for b, e, _ in spans)


def test_random_model_is_near_uniform(model, ids):
  r = perplexity(model, ids, window=32, batch_size=3, progress=False)
  assert 40 < r.perplexity < 250  # vocab 97, random weights


def test_errors(model):
  with pytest.raises(ValueError, match="at least 2 tokens"):
    perplexity(model, [1], progress=False)
  with pytest.raises(ValueError, match="stride"):
    perplexity(model, [1, 2, 3], window=4, stride=5, progress=False)
  with pytest.raises(ValueError, match="token ids must be in"):
    perplexity(model, [1, 2, 500], progress=False)
  with pytest.raises(ValueError, match="1-D"):
    perplexity(model, [[1, 2]], progress=False)


def test_evaluate_text(model):
  class Tok:
    def __call__(self, text, add_special_tokens):
      assert not add_special_tokens
      return {"input_ids": [ord(c) % 97 for c in text]}

  text = ("It is a truth universally acknowledged, that a single man in "
          "possession of a good fortune, must be in want of a wife.")
  r = evaluate_text(model, Tok(), text, max_tokens=100, window=32,
                    batch_size=3, progress=False)
  direct = perplexity(model, [ord(c) % 97 for c in text[:100]], window=32,
                      batch_size=3, progress=False)
  assert r.nll_sum == pytest.approx(direct.nll_sum) and r.num_tokens == 96
