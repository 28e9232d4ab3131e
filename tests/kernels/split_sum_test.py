"""`pallas_kernels.split_sum.sum_splits`: the kernels' K-split partials
summed as adds (no reduction op, so XLA fuses the sum into its consumer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import split_sum
from tests import helpers


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 8, 16, 56, 113])
def test_equals_the_sum(splits):
  part = np.random.default_rng(splits).standard_normal(
      (splits, 3, 40)).astype(np.float32)
  got = np.asarray(split_sum.sum_splits(jnp.asarray(part)))
  want = part.astype(np.float64).sum(0)
  bound = splits * np.finfo(np.float32).eps * np.abs(part).sum(0)
  assert got.shape == (3, 40) and got.dtype == np.float32
  assert np.all(np.abs(got - want) <= bound)


def test_has_no_reduction():
  """Only slices and adds: XLA gives a reduction its own kernel."""
  jaxpr = jax.make_jaxpr(split_sum.sum_splits)(jnp.zeros((56, 4096)))
  prims = {e.primitive.name for e in jaxpr.eqns}
  assert not any(p.startswith("reduce") for p in prims), prims
  assert "add" in prims


def test_one_split_is_the_row():
  part = jnp.arange(6.0).reshape(1, 6)
  np.testing.assert_array_equal(split_sum.sum_splits(part), part[0])


def test_names_the_bad_argument():
  with pytest.raises(ValueError, match=r"part: needs a leading axis of >= 1 "
                     r"splits, got shape \(\)"):
    split_sum.sum_splits(jnp.float32(1.0))
  with pytest.raises(ValueError, match=r"got shape \(0, 4\)"):
    split_sum.sum_splits(jnp.zeros((0, 4)))


def test_docstring_example():
  helpers.assert_docstring_examples_pass(split_sum.sum_splits, "sum_splits")


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 7, 16, 56, 113])
def test_rows_sum_in_the_same_order(splits):
  """`sum_rows` of the rows is `sum_splits` of their stack, bit for bit
  (random values of mixed scale, where another order of adds differs)."""
  rng = np.random.default_rng(splits + 100)
  part = (rng.standard_normal((splits, 2, 300))
          * 10.0 ** rng.integers(-6, 6, (splits, 2, 300))).astype(np.float32)
  rows = [jnp.asarray(r) for r in part]
  got = np.asarray(split_sum.sum_rows(rows))
  np.testing.assert_array_equal(
      got, np.asarray(split_sum.sum_splits(jnp.asarray(part))))
  if splits >= 5:  # the order shows: a left-to-right sum differs somewhere
    ahead = part[0]
    for r in part[1:]:
      ahead = ahead + r
    assert np.any(ahead != got)


def test_rows_names_the_bad_argument():
  with pytest.raises(ValueError, match=r"rows: needs >= 1 row, got none"):
    split_sum.sum_rows([])


def test_rows_docstring_example():
  helpers.assert_docstring_examples_pass(split_sum.sum_rows, "sum_rows")
