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


def reference(model, ids, window, stride, spreads=None):
  """Plain loop, one exact-length window at a time, float64 log-softmax.

  `spreads`, if a list, receives max - min of the logits at every scored
  position; `reference.max_logit` holds the largest |logit| seen.
  """
  total, count, prev_end, begin = 0.0, 0, 0, 0
  reference.max_logit = 0.0
  while True:
    end = min(begin + window, len(ids))
    logits = _forward(model, np.asarray(ids[begin:end])[None].astype(np.int32))
    logits = np.asarray(jax.device_get(logits[0]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True))
                           .sum(-1, keepdims=True)) - logits.max(
                               -1, keepdims=True)
    reference.max_logit = max(reference.max_logit, np.abs(logits).max())
    for pos in range(max(prev_end, begin + 1), end):
      total -= logp[pos - begin - 1, ids[pos]]
      count += 1
      if spreads is not None:
        row = logits[pos - begin - 1]
        spreads.append(row.max() - row.min())
    prev_end = end
    if end == len(ids):
      return total, count
    begin += stride


def _nll_bound(count, window):
  """How far perplexity()'s float32 NLL sum may honestly be from the float64
  reference: per scored token, 32 float32 roundings of the magnitudes
  involved (max|logit| + log V): the log-softmax over V = 97 (max, shift,
  exp, a 97-term sum, log) and the logits themselves, which the padded,
  batched forward may round differently by a few ulp; plus the float32 sum
  of up to `window` per-token NLLs (each at most max|logit| + log V ... x2).
  """
  per_token = 2 * reference.max_logit + math.log(97)
  eps = float(np.finfo(np.float32).eps)
  return count * per_token * eps * (32 + window)


@pytest.mark.parametrize("window,stride,batch", [
    (32, None, 3), (40, 16, 2)])
def test_matches_reference(model, ids, window, stride, batch):
  r = perplexity(model, ids, window=window, stride=stride, batch_size=batch,
                 progress=False)
  nll, count = reference(model, ids, window, stride or window)
  assert r.num_tokens == count
  assert r.num_windows == len(window_spans(len(ids), window, stride or window))
  bound = _nll_bound(count, window)
  # Not vacuous: one token scored twice, or one missing, moves the sum by a
  # whole token's NLL (about log V = 4.6 nats here).
  assert bound < 0.01 * math.log(97), bound
  assert abs(r.nll_sum - nll) <= bound, (r.nll_sum, nll, bound)
  assert abs(r.perplexity - math.exp(nll / count)) <= (
      math.exp(nll / count) * math.expm1(bound / count) * 1.01)
  assert r.nll == r.nll_sum / r.num_tokens


def test_counts_follow_hf_convention():
  # Non-overlapping: every window but its first token.
  assert sum(e - f for _, e, f in window_spans(16384, 1024, 1024)) == 16368
  # Strided: every token after the first exactly once.
  spans = window_spans(1000, 256, 100)
  scored = [p for _, e, f in spans for p in range(f, e)]
  assert scored == list(range(1, 1000))
  assert all(e - b <= 256 for b, e, _ in spans)


def test_random_model_is_near_uniform(model, ids):
  # Against an independent computation: the float64 log-softmax of the
  # model's own logits, window by window (reference above) ...
  r = perplexity(model, ids, window=32, batch_size=3, progress=False)
  spreads = []
  nll, count = reference(model, ids, 32, 32, spreads)
  assert r.num_tokens == count
  want = math.exp(nll / count)
  assert abs(math.log(r.perplexity) - math.log(want)) <= (
      _nll_bound(count, 32) / count), (r.perplexity, want)
  # ... and near uniform for the reason that makes it so: with the logits of
  # a position within [lo, hi], -log p of any token is within log V +- (hi -
  # lo), so the perplexity is within V * exp(+-mean(hi - lo)) of V = 97.
  spread = float(np.mean(spreads))
  assert spread < 2.0, spread  # random weights: small logits
  assert 97 * math.exp(-spread) <= r.perplexity <= 97 * math.exp(spread), (
      r.perplexity, spread)


def test_errors(model):
  with pytest.raises(ValueError, match="at least 2 tokens"):
    perplexity(model, [1], progress=False)
  with pytest.raises(ValueError, match="stride"):
    perplexity(model, [1, 2, 3], window=4, stride=5, progress=False)
  with pytest.raises(ValueError, match="token ids must be in"):
    perplexity(model, [1, 2, 500], progress=False)
  with pytest.raises(ValueError, match="1-D"):
    perplexity(model, [[1, 2]], progress=False)
  for kw in (dict(stride=2.5), dict(batch_size=1.5), dict(window=4.5),
             dict(window=True), dict(pad_token_id=None)):
    name = next(iter(kw))
    with pytest.raises(TypeError, match=f"`{name}` must be an int, got "):
      perplexity(model, [1, 2, 3], progress=False, **kw)
  vocab = model.config.vocab_size
  # A pad id the embedding cannot look up made the result NaN.
  with pytest.raises(ValueError, match=f"`pad_token_id` must be a token id "
                     f"in 0..{vocab - 1}, got {vocab}"):
    perplexity(model, [1, 2, 3], window=2, pad_token_id=vocab,
               progress=False)


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
  # The same token ids through the same compiled function: identical.
  assert r.nll_sum == direct.nll_sum and r.num_tokens == 96
  assert r.perplexity == direct.perplexity
