"""Tests for `jaxbnb._src.models.sampling` against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxbnb._src.models import sampling


def np_top_k(logits, k):
  """Reference: the k highest logits, lower id first among ties."""
  if k == 0:
    return np.ones_like(logits, bool)
  keep = np.zeros_like(logits, bool)
  for r, row in enumerate(logits):
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    keep[r, order[:k]] = True
  return keep


def np_top_p(logits, p):
  """Reference: grow the nucleus until its mass reaches p."""
  keep = np.zeros_like(logits, bool)
  for r, row in enumerate(logits.astype(np.float64)):
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    mass = 0.0
    for i in order:
      keep[r, i] = True
      mass += probs[i]
      if mass >= p:
        break
  return keep


@pytest.mark.parametrize("k", [0, 1, 3, 7, 16])
def test_top_k_matches_numpy(k):
  rng = np.random.default_rng(k)
  logits = rng.normal(size=(5, 16)).astype(np.float32)
  logits[0, [2, 5, 9]] = 3.0  # ties: lower ids win
  got = np.asarray(sampling.top_k_mask(jnp.asarray(logits), k))
  np.testing.assert_array_equal(got, np_top_k(logits, k))
  if k:
    assert (got.sum(-1) == k).all()


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_numpy(p):
  rng = np.random.default_rng(int(p * 1000))
  # Well-separated probabilities so float rounding cannot move the boundary.
  logits = (rng.permutation(12)[None, :] * 0.37
            + rng.normal(size=(6, 1))).astype(np.float32)
  logits = np.concatenate([logits, rng.normal(size=(6, 12)) * 2], 0)
  got = np.asarray(sampling.top_p_mask(jnp.asarray(logits), p))
  want = np_top_p(logits, p) if p < 1 else np.ones_like(got)
  np.testing.assert_array_equal(got, want)
  assert got.any(-1).all()  # the top token always survives


def test_process_logits_order_temperature_topk_topp():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 20)).astype(np.float32) * 3
  t, k, p = 0.7, 8, 0.6
  scaled = logits / t
  keep_k = np_top_k(scaled, k)
  # HF: top-p runs on the top-k-filtered distribution.
  keep = keep_k & np_top_p(np.where(keep_k, scaled, -np.inf), p)
  got = np.asarray(sampling.process_logits(jnp.asarray(logits), temperature=t,
                                           top_k=k, top_p=p))
  np.testing.assert_array_equal(np.isfinite(got), keep)
  # logits / t in float32: XLA may divide as a multiply by the rounded
  # reciprocal (two roundings, within 2 ulp) where numpy divides exactly.
  np.testing.assert_allclose(got[keep], scaled[keep],
                             rtol=2 * np.finfo(np.float32).eps)


def _draw(logits_row, n, seed, **kw):
  logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32),
                            (n, len(logits_row)))
  keys = sampling.row_keys(seed, n)
  return np.asarray(jax.jit(
      lambda l, k: sampling.sample(l, k, **kw))(logits, keys))


@pytest.mark.parametrize("kw,expected", [
    (dict(), [0.4, 0.3, 0.15, 0.1, 0.05]),
    (dict(top_k=3), [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
    (dict(top_p=0.8), [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
    (dict(top_p=0.7), [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0]),
])
def test_sampling_frequencies(kw, expected):
  probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
  n = 40_000
  tokens = _draw(np.log(probs), n, seed=1, **kw)
  counts = np.bincount(tokens, minlength=5)
  expected = np.asarray(expected)
  assert (counts[expected == 0] == 0).all()
  nz = expected > 0
  chi2 = (((counts[nz] - n * expected[nz]) ** 2) / (n * expected[nz])).sum()
  # Seeded, so deterministic; the bound is the 1e-4 tail for a fair draw.
  assert chi2 < stats.chi2.ppf(1 - 1e-4, df=nz.sum() - 1), (counts, chi2)


def test_temperature_flattens_and_sharpens():
  logits = np.log([0.7, 0.2, 0.1])
  hot = np.bincount(_draw(logits, 20_000, 3, temperature=4.0), minlength=3)
  cold = np.bincount(_draw(logits, 20_000, 3, temperature=0.25), minlength=3)
  assert hot[0] < 0.5 * 20_000 < cold[0]


def test_temperature_to_zero_is_greedy():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(64, 50)), jnp.float32)
  keys = sampling.row_keys(9, 64)
  got = jax.jit(lambda l, k: sampling.sample(l, k, temperature=1e-4))(
      logits, keys)
  np.testing.assert_array_equal(got, sampling.greedy(logits))
  np.testing.assert_array_equal(sampling.sample(logits, do_sample=False),
                                np.argmax(np.asarray(logits), -1))


def test_seed_reproducible_and_rows_independent_of_batch():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(8, 100)), jnp.float32)
  draw = jax.jit(lambda l, seed, step: sampling.sample(
      l, sampling.step_keys(sampling.row_keys(seed, l.shape[0]), step)))
  a, b, c = draw(logits, 7, 0), draw(logits, 7, 0), draw(logits, 8, 0)
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()
  # Row i's key does not depend on the batch size.
  np.testing.assert_array_equal(a[:3], draw(logits[:3], 7, 0))
  # Step keys differ per step.
  assert (np.asarray(a) != np.asarray(draw(logits, 7, 1))).any()


def test_traced_parameters_do_not_recompile():
  traces = []

  @jax.jit
  def f(logits, keys, t, k, p):
    traces.append(1)
    return sampling.sample(logits, keys, temperature=t, top_k=k, top_p=p)

  logits = jnp.zeros((2, 10))
  keys = sampling.row_keys(0, 2)
  f(logits, keys, 1.0, 0, 1.0)
  f(logits, keys, 0.5, 3, 0.9)
  assert len(traces) == 1


def test_repetition_penalty_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 10)).astype(np.float32)
  seen = rng.random((3, 10)) < 0.4
  want = np.where(seen, np.where(logits > 0, logits / 1.3, logits * 1.3),
                  logits)
  got = sampling.apply_repetition_penalty(jnp.asarray(logits),
                                          jnp.asarray(seen), 1.3)
  # One float32 multiply or divide (a divide possibly as reciprocal-multiply:
  # within 2 ulp).
  np.testing.assert_allclose(got, want, rtol=2 * np.finfo(np.float32).eps)


def test_sample_without_keys_raises():
  with pytest.raises(ValueError, match="keys"):
    sampling.sample(jnp.zeros((1, 3)))
