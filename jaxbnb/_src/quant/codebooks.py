"""Quantization code books (lookup tables), built as bitsandbytes builds them.

All tables are float32 numpy arrays computed with the same float32 arithmetic
that bitsandbytes uses through PyTorch, so they are bit-identical to the
tables stored in bitsandbytes checkpoints (`weight.quant_map`,
`weight.nested_quant_map`) and optimizer states (`qmap1`, `qmap2`). Nothing
here traces: the tables become constants or array inputs of the ops.
"""

from __future__ import annotations

import fractions
import functools
import itertools

import numpy as np

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "NF4_THRESHOLDS",
    "FP4_THRESHOLDS",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
    "get_4bit_type",
    "code_for",
]

_F32 = np.float32

# NF4 values for nibbles 0..15 (the CUDA `nf4_dequantization_lut`).
NF4_CODE = np.asarray(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    _F32,
)

def _float_literal(text: str) -> np.float32:
  """The float32 a C compiler makes of the literal `text` + "f".

  The decimal is rounded once, straight to float32. Rounding it to float64
  first (`np.float32(float(text))`) is a double rounding that lands one ulp
  off for 4 of the 15 NF4 thresholds.
  """
  exact = fractions.Fraction(text)
  near = np.float32(float(text))
  candidates = (np.nextafter(near, _F32(-np.inf)), near,
                np.nextafter(near, _F32(np.inf)))
  return min(candidates, key=lambda c: abs(fractions.Fraction(float(c)) - exact))


# The literals of bitsandbytes' CUDA NF4 decision tree (`dQuantizeNF4`), the
# midpoints of neighbouring codes: nibble n is chosen when t[n-1] < x <= t[n].
# They are `float` literals (an `f` suffix): the tree compares the fp32 value
# against each literal's float32 rounding with a strict `>`, so a value
# exactly on a threshold goes to the lower code.
NF4_THRESHOLDS = np.asarray(
    [
        _float_literal(t)
        for t in (
            "-0.8480964004993439",
            "-0.6106329262256622",
            "-0.4599952697753906",
            "-0.33967943489551544",
            "-0.23460740596055984",
            "-0.13791173323988914",
            "-0.045525018125772476",
            "0.03979014977812767",
            "0.1202552504837513",
            "0.2035212516784668",
            "0.2920137718319893",
            "0.3893125355243683",
            "0.5016634166240692",
            "0.6427869200706482",
            "0.8614784181118011",
        )
    ],
    _F32,
)

# FP4 (e2m1) magnitudes for the three low bits (the CUDA
# `fp4_dequantization_lut`); bit 3 is the sign.
_FP4_MAGNITUDE = np.asarray(
    [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25],
    _F32,
)
FP4_CODE = np.concatenate([_FP4_MAGNITUDE, -_FP4_MAGNITUDE]).astype(_F32)

# Decision thresholds of the CUDA FP4 quantizer on |x| (strict `>`).
FP4_THRESHOLDS = {
    "t1": _F32(0.29166667),
    "t2": _F32(0.583333),
    "t3": _F32(0.8333333),
    "t4": _F32(0.4166667),
    "t5": _F32(0.0859375),
    "t6": _F32(0.20833333),
    "t7": _F32(0.00260417),
}


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """float32 `torch.linspace` as torch's CPU kernel computes it.

  The step is a float32 quotient; each element is a fused multiply-add from
  the nearer end (emulated exactly enough in float64, then rounded once).
  """
  if steps == 1:
    return np.asarray([start], _F32)
  start32, end32 = _F32(start), _F32(end)
  step = np.float64(_F32((end32 - start32) / _F32(steps - 1)))
  idx = np.arange(steps, dtype=np.float64)
  out = np.where(
      idx < steps // 2,
      np.float64(start32) + step * idx,
      np.float64(end32) - step * (steps - 1 - idx),
  )
  return out.astype(_F32)


@functools.cache
def _dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int):
  data = []
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  i = 0
  for i in range(max_exponent_bits):
    if signed:
      fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
    else:
      fraction_items = int(
          2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
      )
    boundaries = _torch_linspace(0.1, 1.0, fraction_items)
    means = ((boundaries[:-1] + boundaries[1:]) / _F32(2.0)).astype(_F32)
    scale = _F32(10 ** (-(max_exponent_bits - 1) + i))
    data += (scale * means).astype(_F32).tolist()
    if signed:
      data += (-scale * means).astype(_F32).tolist()
  if additional_items > 0:
    boundaries = _torch_linspace(0.1, 1.0, additional_items + 1)
    means = ((boundaries[:-1] + boundaries[1:]) / _F32(2.0)).astype(_F32)
    scale = _F32(10 ** (-(max_exponent_bits - 1) + i))
    data += (scale * means).astype(_F32).tolist()
    if signed:
      data += (-scale * means).astype(_F32).tolist()
  data.append(0.0)
  data.append(1.0)
  if len(data) != 2**total_bits:
    raise ValueError(
        "create_dynamic_map: the arguments give "
        f"{len(data)} values, expected 2**total_bits={2**total_bits}; got "
        f"{signed=}, {max_exponent_bits=}, {total_bits=}."
    )
  data += [0.0] * (256 - len(data))
  out = np.sort(np.asarray(data, _F32))
  out.setflags(write=False)
  return out


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
  """The 8-bit dynamic-exponent code book of bitsandbytes.

  Args:
    signed: whether the map covers [-1, 1] (True) or [0, 1] (False).
    max_exponent_bits: the largest number of exponent bits.
    total_bits: bits per code.

  Returns:
    A sorted float32 array of 256 values, bit-identical to
    `bitsandbytes.functional.create_dynamic_map`.

  Examples:
    >>> from jaxbnb.functional import create_dynamic_map
    >>> code = create_dynamic_map()
    >>> code.shape, code.dtype, float(code[127]), float(code[255])
    ((256,), dtype('float32'), 0.0, 1.0)
  """
  return _dynamic_map(bool(signed), int(max_exponent_bits), int(total_bits))


def create_linear_map(
    signed: bool = True, total_bits: int = 8, add_zero: bool = True
) -> np.ndarray:
  """A linear code book, as `bitsandbytes.functional.create_linear_map`.

  Args:
    signed: range [-1, 1] (True) or [0, 1] (False).
    total_bits: bits per code; fewer than 8 pads the table with zeros.
    add_zero: keep an exact zero in a signed map (one fewer level).

  Returns:
    A float32 array of 256 values (more than 8 bits: `2**total_bits`, less
    one when signed, as bitsandbytes returns).

  Examples:
    >>> from jaxbnb.functional import create_linear_map
    >>> create_linear_map(signed=False)[:3]
    array([0.        , 0.00392157, 0.00784314], dtype=float32)
  """
  sign = -1.0 if signed else 0.0
  total_values = 2**total_bits
  if add_zero or total_bits < 8:
    total_values = 2**total_bits if not signed else 2**total_bits - 1
  values = _torch_linspace(sign, 1.0, total_values)
  gap = 256 - values.size
  if gap == 0:
    return values
  half = values.size // 2
  # More than 8 bits: more than 256 values and no padding (as bnb, whose
  # `[0] * gap` is empty for a negative gap).
  return np.concatenate(
      [values[:half], np.zeros(max(gap, 0), _F32), values[half:]]
  ).astype(_F32)


def create_normal_map(
    offset: float = 0.9677083, use_extra_value: bool = True
) -> np.ndarray:
  """The NormalFloat code book (NF4 in its first 16 non-padding entries).

  Needs scipy (a dependency of jax). `get_4bit_type("nf4")` holds the
  canonical 16 values without scipy.

  Args:
    offset: the outermost normal quantile.
    use_extra_value: asymmetric type with 8 positive and 7 negative values.

  Returns:
    A sorted float32 array of 256 values normalised to [-1, 1].

  Examples:
    >>> from jaxbnb.functional import create_normal_map
    >>> create_normal_map().shape
    (256,)
  """
  from scipy.stats import norm  # pylint: disable=g-import-not-at-top

  if use_extra_value:
    v1 = norm.ppf(_torch_linspace(offset, 0.5, 9)[:-1].astype(np.float64))
    v2 = [0.0] * (256 - 15)
    v3 = -norm.ppf(_torch_linspace(offset, 0.5, 8)[:-1].astype(np.float64))
  else:
    v1 = norm.ppf(_torch_linspace(offset, 0.5, 8)[:-1].astype(np.float64))
    v2 = [0.0] * (256 - 14)
    v3 = -norm.ppf(_torch_linspace(offset, 0.5, 8)[:-1].astype(np.float64))
  values = np.sort(np.asarray(list(v1) + v2 + list(v3), _F32))
  return (values / values.max()).astype(_F32)


def create_fp8_map(
    signed: bool = True,
    exponent_bits: int = 5,
    precision_bits: int = 2,
    total_bits: int = 8,
) -> np.ndarray:
  """A small floating-point code book, as bitsandbytes' `create_fp8_map`.

  Args:
    signed: whether the format has a sign bit.
    exponent_bits: exponent bits.
    precision_bits: mantissa bits.
    total_bits: total bits; must equal sign + exponent + precision bits.

  Returns:
    A sorted float32 array of 256 values normalised by the maximum.

  Raises:
    ValueError: if the bit counts do not add up.

  Examples:
    >>> from jaxbnb.functional import create_fp8_map
    >>> fp4 = create_fp8_map(True, 2, 1, 4)  # the FP4 values, sorted
    >>> float(fp4[0]), float(fp4[-1])
    (-1.0, 1.0)
  """
  has_sign = 1 if signed else 0
  if exponent_bits + precision_bits != total_bits - has_sign:
    raise ValueError(
        "create_fp8_map: exponent_bits + precision_bits must equal "
        f"total_bits - {has_sign} (sign), got {exponent_bits=}, "
        f"{precision_bits=}, {total_bits=}."
    )
  values = []
  patterns = list(itertools.product([0, 1], repeat=precision_bits))
  bias = 2 ** (exponent_bits - 1)
  for evalue in range(2**exponent_bits):
    for bit_pattern in patterns:
      value = 1 if evalue != 0 else 0
      for i, pval in enumerate(bit_pattern):
        value += pval * (2 ** -(i + 1))
      if evalue == 0:
        value = value * 2**-bias
      else:
        value = value * 2 ** -(evalue - bias - 1)
      values.append(value)
      if signed:
        values.append(-value)
  values.sort()
  if total_bits < 8:
    values += [0] * (256 - len(values))
  values.sort()
  code = np.asarray(values, _F32)
  return (code / code.max()).astype(_F32)


_AF4 = [
    -1.0,
    -0.69441008,
    -0.51243739,
    -0.3736951,
    -0.25607552,
    -0.14982478,
    -0.04934812,
    0.0,
    0.04273164,
    0.12934483,
    0.21961274,
    0.31675666,
    0.42563882,
    0.55496234,
    0.72424863,
    1.0,
][::-1]


def get_4bit_type(typename: str, blocksize: int = 64) -> np.ndarray:
  """The 16-value table of a 4-bit type, in nibble order.

  Args:
    typename: "nf4", "fp4" or "af4" (af4 only for blocksize 64). Only nf4
      and fp4 can be used by `quantize_4bit`.
    blocksize: the blocksize, used only by "af4".

  Returns:
    A float32 array of 16 values normalised by the largest magnitude,
    identical to `bitsandbytes.functional.get_4bit_type` (and to the
    `weight.quant_map` of bitsandbytes checkpoints).

  Raises:
    NotImplementedError: for an unknown type or af4 with another blocksize.

  Examples:
    >>> from jaxbnb.functional import get_4bit_type
    >>> get_4bit_type("nf4")[[0, 7, 15]]
    array([-1.,  0.,  1.], dtype=float32)
  """
  if typename == "nf4":
    data = NF4_CODE.tolist()
  elif typename == "fp4":
    data = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    data = data + [-v for v in data]
  elif typename == "af4":
    if blocksize != 64:
      raise NotImplementedError(
          f"get_4bit_type: 'af4' supports only blocksize=64, got {blocksize}."
      )
    data = _AF4
  else:
    raise NotImplementedError(
        "get_4bit_type: typename must be one of 'nf4', 'fp4', 'af4', got "
        f"{typename!r}."
    )
  table = np.asarray(data, _F32)
  return (table / np.abs(table).max()).astype(_F32)


def code_for(quant_type: str) -> np.ndarray:
  """The dequantization table the CUDA kernels use for a 4-bit type."""
  return NF4_CODE if quant_type == "nf4" else FP4_CODE
