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
