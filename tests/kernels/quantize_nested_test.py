"""The nested-step kernel of double quantization against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import reference
from pallas_kernels import code_tables
from pallas_kernels import quantize_nested as nk
from tests.kernels import _util

_MAP = codebooks.create_dynamic_map(signed=True)


def _reference(a, offset):
  """The reference on the CPU (XLA:GPU's float32 division is not always
  correctly rounded; the kernel's and bitsandbytes' are)."""
  with jax.default_device(jax.devices("cpu")[0]):
    q, am = reference.quantize_blockwise(
        jnp.asarray(a) - np.float32(offset), jnp.asarray(_MAP, jnp.float32),
        256)
    return np.asarray(q), np.asarray(am)


def _absmax(n, seed):
  """Positive fp32 absmax like a 4-bit quantization's, with a NaN, a block
  equal to its offset (its nested absmax is 0) and a few outliers."""
  rng = np.random.default_rng(seed)
  a = np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(0.05)
  a[rng.integers(0, n, 5)] *= np.float32(40.0)
  a[3] = np.nan
  return a


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize("n,block_rows", [(256 * 40, 2), (256 * 33 + 77, 8),
                                          (100, 16)])
def test_matches_the_reference_search(mode, n, block_rows):
  """Codes and nested absmax of `absmax - offset` are bit-identical to the
  reference's binary search (bitsandbytes' `dQuantize<0>`), partial last
  block, NaN, a block of NaNs and an all-equal block included."""
  a = _absmax(n, n)
  offset = np.float32(np.nanmean(a))
  if n > 600:
    a[512:768] = offset  # (a - offset) == 0 across a whole block
  if n > 1100:
    a[768:1024] = np.nan  # its nested absmax is -FLT_MAX
  lo, aux = (jnp.asarray(t) for t in code_tables.quantize_tables(_MAP))
  q, am = nk.quantize_nested(jnp.asarray(a), jnp.float32(offset), lo, aux,
                             block_rows=block_rows,
                             interpret=mode == "interpret")
  ref_q, ref_am = _reference(a, offset)
  np.testing.assert_array_equal(np.asarray(am), ref_am)
  np.testing.assert_array_equal(np.asarray(q), ref_q)
  assert q.shape == (n,) and q.dtype == jnp.uint8


def test_the_offset_is_subtracted_inside():
  """A nonzero offset changes the codes (the kernel subtracts it)."""
  a = _absmax(256 * 4, 1)
  a[3] = 0.01
  lo, aux = (jnp.asarray(t) for t in code_tables.quantize_tables(_MAP))
  q0, _ = nk.quantize_nested(jnp.asarray(a), jnp.float32(0), lo, aux,
                             interpret=True)
  q1, am1 = nk.quantize_nested(jnp.asarray(a), jnp.float32(a.mean()), lo,
                               aux, interpret=True)
  assert np.mean(np.asarray(q0) != np.asarray(q1)) > 0.5
  ref_q, ref_am = _reference(a, a.mean())
  np.testing.assert_array_equal(np.asarray(q1), ref_q)
  np.testing.assert_array_equal(np.asarray(am1), ref_am)


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize("n", [256 * 16, 256 * 33 + 77])
def test_the_mean_made_inside(mode, n):
  """With `count`, the kernel takes the sum and returns the mean as XLA
  makes it (`sum * float32(1 / count)`, rounded once, which for
  a count like 8525 is not always the correctly rounded quotient), and
  quantizes against it: the same bytes as with that offset given."""
  a = _absmax(n, 5)
  a[3] = 0.02
  total = np.float32(np.sum(a, dtype=np.float64))
  lo, aux = (jnp.asarray(t) for t in code_tables.quantize_tables(_MAP))
  q, am, off = nk.quantize_nested(jnp.asarray(a), jnp.float32(total), lo,
                                  aux, count=n, interpret=mode == "interpret")
  want_off = total * (np.float32(1) / np.float32(n))
  assert np.asarray(off).dtype == np.float32 and np.asarray(off).shape == ()
  assert np.asarray(off) == want_off
  with jax.default_device(jax.devices("cpu")[0]):
    assert np.asarray(jax.jit(lambda t: t / np.float32(n))(total)) == want_off
  ref_q, ref_am = _reference(a, want_off)
  np.testing.assert_array_equal(np.asarray(q), ref_q)
  np.testing.assert_array_equal(np.asarray(am), ref_am)
