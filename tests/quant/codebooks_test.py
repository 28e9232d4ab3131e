"""The NF4 decision thresholds: bitsandbytes' `float` literals, ties low."""

import decimal

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks

# The literals of bitsandbytes' `dQuantizeNF4` (csrc/kernels.cu), as written.
_LITERALS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906",
    "-0.33967943489551544", "-0.23460740596055984", "-0.13791173323988914",
    "-0.045525018125772476", "0.03979014977812767", "0.1202552504837513",
    "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011")


def _nearest_f32(text: str) -> np.float32:
  """The float32 nearest the decimal `text`, by exact decimal arithmetic."""
  exact = decimal.Decimal(text)
  f = np.float32(text)
  cands = [f]
  for _ in range(2):
    cands += [np.nextafter(cands[0], np.float32(-2)),
              np.nextafter(cands[-1], np.float32(2))]
  return min(cands, key=lambda c: abs(decimal.Decimal(float(c)) - exact))


def test_thresholds_are_the_literals_rounded_once_to_float32():
  want = np.asarray([_nearest_f32(t) for t in _LITERALS], np.float32)
  np.testing.assert_array_equal(codebooks.NF4_THRESHOLDS, want)
  # Rounding through float64 would move 4 of them by one ulp.
  through_f64 = np.asarray([float(t) for t in _LITERALS], np.float32)
  assert int((through_f64 != want).sum()) == 4


@pytest.mark.parametrize("i", range(15))
def test_value_on_a_threshold_takes_the_lower_code(i):
  t = _nearest_f32(_LITERALS[i])
  below, above = np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2))
  # absmax 1 (the first element) keeps every scaled value exact.
  x = jnp.asarray([1.0, below, t, above], jnp.float32)
  packed, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
  p = np.asarray(packed).reshape(-1)
  codes = [int(p[0]) & 15, int(p[1]) >> 4, int(p[1]) & 15]
  assert codes == [i, i, i + 1]
