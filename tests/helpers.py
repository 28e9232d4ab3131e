"""Shared test helpers (not collected: the name does not end in _test)."""

from __future__ import annotations

import json
import os

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
