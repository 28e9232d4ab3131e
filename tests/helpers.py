"""Shared test helpers (not collected: the name does not end in _test)."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
NP_DTYPES = {"float32": np.float32, "float16": np.float16,
             "bfloat16": ml_dtypes.bfloat16}


def load_golden(name: str):
  return np.load(os.path.join(GOLDEN, name))


def golden_array(raw: np.ndarray, dtype_name: str) -> np.ndarray:
  """Golden arrays store bf16 as raw uint16 bits."""
  if dtype_name == "bfloat16":
    return raw.view(ml_dtypes.bfloat16)
  return raw.astype(NP_DTYPES[dtype_name], copy=False)


def case_meta(npz, name: str) -> dict:
  return json.loads(bytes(npz[name + "/meta"]).decode())


def bits(a) -> np.ndarray:
  """Raw bits of a float array as unsigned ints (for exact comparison)."""
  a = np.asarray(a)
  return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(actual, expected, nan_equal=True, err_msg=""):
  """Bit-exact equality of float arrays; all NaNs compare equal."""
  actual = np.asarray(actual).reshape(-1)
  expected = np.asarray(expected).reshape(-1)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  a, e = bits(actual), bits(expected.astype(actual.dtype, copy=False))
  diff = a != e
  if nan_equal:
    both_nan = np.isnan(actual.astype(np.float32)) & np.isnan(
        expected.astype(np.float32))
    diff &= ~both_nan
  bad = np.flatnonzero(diff)
  assert bad.size == 0, (
      f"{err_msg}: {bad.size} of {a.size} elements differ; first at "
      f"{bad[:5]}: {actual[bad[:5]]} vs {expected[bad[:5]]}")


def error_stats(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  err = np.abs(a - b)
  rel = err / (np.abs(a) + 1e-8)
  return err.mean(), rel.mean()


# --------------------------------------------------------------------------
# Honest error bounds for float32-accumulated products (derived, not tuned)
# --------------------------------------------------------------------------

F32_EPS = float(np.finfo(np.float32).eps)


def ulp(x, dtype) -> np.ndarray:
  """One unit in the last place of `dtype` at magnitude |x| (elementwise)."""
  nmant = {np.dtype(np.float32): 23, np.dtype(np.float16): 10,
           np.dtype(ml_dtypes.bfloat16): 7}[np.dtype(dtype)]
  tiny = {23: 2.0 ** -126, 10: 2.0 ** -14, 7: 2.0 ** -126}[nmant]
  a = np.maximum(np.abs(np.asarray(x, np.float64)), tiny)
  return 2.0 ** (np.floor(np.log2(a)) - nmant)


def matmul_bound(x, w, out_dtype, *, weight_rel=0.0, bias=None):
  """(exact, bound): `x @ w.T (+ bias)` in float64 and the largest honest
  |y - exact| for any `y` accumulated in float32 in any order and rounded
  once to `out_dtype`.

  * float32 accumulation of K products: each product and each of the K - 1
    additions rounds once, so |acc - exact| <= K * u * sum|x||w| <= K * eps
    / 2 * sum|x||w| (Higham's gamma_K); two such results differ by at most
    twice that, hence the bound uses K * eps (independent of order).
  * `weight_rel`: a documented relative rounding of each weight on one side
    (e.g. a bf16 code table, 2**-8), adds weight_rel * sum|x||w|.
  * a bias added in float32 rounds once more (eps * |result|).
  * the final rounding to a 16-bit `out_dtype` moves the value by up to one
    ulp there (two results straddling a rounding midpoint).
  """
  x64 = np.asarray(np.asarray(x).astype(np.float32), np.float64)
  w64 = np.asarray(np.asarray(w).astype(np.float32), np.float64)
  k = x64.shape[-1]
  exact = x64 @ w64.T
  mag = np.abs(x64) @ np.abs(w64).T
  bound = (k * F32_EPS + weight_rel) * mag
  if bias is not None:
    exact = exact + np.asarray(np.asarray(bias).astype(np.float32),
                               np.float64)
    bound = bound + F32_EPS * np.abs(exact)
  if np.dtype(out_dtype) != np.float32:
    bound = bound + ulp(np.abs(exact) + bound, out_dtype)
  return exact, bound


def assert_within(actual, exact, bound, err_msg=""):
  """|actual - exact| <= bound elementwise, reporting the worst element."""
  actual = np.asarray(np.asarray(actual).astype(np.float32), np.float64)
  exact = np.broadcast_to(np.asarray(exact, np.float64), actual.shape)
  bound = np.broadcast_to(np.asarray(bound, np.float64), actual.shape)
  err = np.abs(actual - exact)
  bad = ~(err <= bound)
  if bad.any():
    i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)),
                         err.shape)
    raise AssertionError(
        f"{err_msg}: {int(bad.sum())} of {err.size} elements beyond the "
        f"bound; worst at {i}: |{actual[i]} - {exact[i]}| = {err[i]:.3g} > "
        f"{bound[i]:.3g}")


def sum_bound(a, axis):
  """Largest honest difference of two float32 sums of `a` along `axis`
  (any order): (n - 1) additions, each side within (n - 1) * u * sum|a|."""
  a = np.asarray(np.asarray(a).astype(np.float32), np.float64)
  n = a.shape[axis]
  return max(n - 1, 0) * F32_EPS * np.abs(a).sum(axis)


def lowered_for_h200(fn, *args, **kwargs) -> str:
  """`jax.jit(fn)` lowered for CUDA on an abstract H200 (no GPU needed):
  the StableHLO text, with any Pallas kernel lowered to Triton. Skips the
  test on a JAX without abstract GPU devices."""
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    from jax._src.mesh import AbstractDevice  # pylint: disable=g-import-not-at-top
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=AbstractDevice(
        device_kind="NVIDIA H200", platform="gpu", num_cores=132))
  except (ImportError, TypeError) as e:
    pytest.skip(f"no abstract GPU device in this JAX: {e}")
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args, **kwargs).lower(
        lowering_platforms=("cuda",)).as_text()



def assert_docstring_examples_pass(obj, name: str) -> None:
  """Runs the examples in `obj`'s docstring as doctests: at least one, none
  failing (their printed results must match)."""
  import doctest  # pylint: disable=g-import-not-at-top
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  for test in doctest.DocTestFinder().find(obj, name):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.attempted > 0 and result.failed == 0, result


def _leaf_pairs(a, b):
  """The leaves of `a` and `b` as numpy pairs, after checking the same
  structure (None where None), dtypes and shapes."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, (ta, tb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype)
    yield x, y


def assert_trees_bitwise_equal(a, b):
  """Same structure (None where None), same dtypes, shapes and bytes."""
  for x, y in _leaf_pairs(a, b):
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8),
                                  y.reshape(-1).view(np.uint8))


def assert_trees_equal_but_fma(a, b, *, ulps: int = 2, codes: float = 0.05):
  """`assert_trees_bitwise_equal` for two XLA:CPU programs of the same
  float32 arithmetic, which XLA may contract into fused multiply-adds
  apart (JAX 0.12.1 decides per fusion: the same `s * b1 + (1 - b1) * g`
  rounds once in one program and twice in the other). Same structure,
  dtypes and shapes; integer arrays but uint8 identical; floats within
  `ulps` units in the last place of their dtype; uint8 (8-bit state codes)
  identical but for at most a fraction `codes` of elements, each one code
  off (a value a unit away landing past a code midpoint)."""
  for x, y in _leaf_pairs(a, b):
    if x.dtype == np.uint8:
      d = (x.astype(np.int64) - y.astype(np.int64)) % 256
      d = np.minimum(d, 256 - d)
      assert d.max(initial=0) <= 1 and (d > 0).mean() <= codes, (
          d.max(initial=0), (d > 0).mean())
    elif np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16:
      x32, y32 = x.astype(np.float32), y.astype(np.float32)
      same = (x32 == y32) | (np.isnan(x32) & np.isnan(y32))
      bound = ulps * ulp(np.maximum(np.abs(x32), np.abs(y32)), x.dtype)
      bad = ~same & ~(np.abs(x32 - y32) <= bound)
      assert not bad.any(), (x.dtype, x32[bad][:4], y32[bad][:4])
    else:
      np.testing.assert_array_equal(x, y)
