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


@pytest.mark.parametrize("splits,row0,n,dtype", [
    (56, 0, 128, jnp.bfloat16),   # the down projection's K = 14336
    (16, 64, 96, jnp.float16),    # a weight's rows after another's
    (7, 0, 64, jnp.float32),      # an odd count: rows set aside
    (1, 32, 32, jnp.bfloat16),
])
def test_add_splits_is_the_reference_bit_for_bit(splits, row0, n, dtype):
  """The kernel (interpreted) sums in `sum_splits`' order, rounds to the
  residual's dtype, adds in fp32 and rounds once: `residual + y` as XLA
  computes a 16-bit add."""
  rng = np.random.default_rng(splits + row0)
  part = jnp.asarray(3 * rng.standard_normal((splits, row0 + n + 32)),
                     jnp.float32)
  residual = jnp.asarray(5 * rng.standard_normal((1, n)), dtype)
  got = split_sum.add_splits(part, residual, row0=row0, interpret=True)
  want = split_sum.add_reference(part, residual, row0)
  assert got.shape == (1, n) and got.dtype == dtype
  helpers.assert_bits_equal(np.asarray(got), np.asarray(want))
  # and the reference is the model's `x + mlp(x)`
  y = part[:, row0:row0 + n].astype(np.float64).sum(0)
  exact = np.asarray(residual, np.float64)[0] + y
  # the fp32 sum's error, then two roundings to the dtype (of y, then of
  # the sum), each within half a unit
  tol = (splits * np.finfo(np.float32).eps * np.abs(part).sum(0).max()
         + (np.abs(y) + np.abs(exact)) * float(jnp.finfo(dtype).eps))
  assert np.all(np.abs(np.asarray(got, np.float64)[0] - exact) <= tol)


@pytest.mark.parametrize("kw,match", [
    (dict(part=jnp.zeros((4, 64), jnp.bfloat16)),
     r"part: needs float32 \[splits >= 1, cols\], got bfloat16 \(4, 64\)"),
    (dict(part=jnp.zeros((64,), jnp.float32)), r"part: needs float32"),
    (dict(residual=jnp.zeros((2, 32), jnp.bfloat16)),
     r"residual: needs a float \[1, n\], got bfloat16 \(2, 32\)"),
    (dict(residual=jnp.zeros((1, 40), jnp.bfloat16)),
     r"residual: n must be a positive multiple of 32, got 40"),
    (dict(row0=48), r"row0: columns 48..80 must lie in part's 64, got "
                    r"row0=48"),
])
def test_add_splits_names_the_bad_argument(kw, match):
  args = dict(part=jnp.zeros((4, 64), jnp.float32),
              residual=jnp.zeros((1, 32), jnp.bfloat16), row0=0)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    split_sum.add_splits(args["part"], args["residual"], row0=args["row0"],
                         interpret=True)


def test_add_splits_docstring_example():
  helpers.assert_docstring_examples_pass(split_sum.add_splits, "add_splits")


@pytest.mark.gpu
@pytest.mark.parametrize("splits,row0,n,dtype", [
    (56, 0, 4096, jnp.bfloat16),  # Llama-3-8B's down at one row
    (43, 0, 4096, jnp.bfloat16),  # Llama-2-7B's (K = 11008)
    (74, 256, 3584, jnp.float16),
])
def test_gpu_add_splits(splits, row0, n, dtype):
  """Compiled (Triton): the reference's bits."""
  rng = np.random.default_rng(splits)
  part = jnp.asarray(rng.standard_normal((splits, row0 + n)), jnp.float32)
  residual = jnp.asarray(4 * rng.standard_normal((1, n)), dtype)
  got = split_sum.add_splits(part, residual, row0=row0)
  helpers.assert_bits_equal(
      np.asarray(got), np.asarray(split_sum.add_reference(part, residual,
                                                          row0)))
