"""RoPE scaling of a GGUF file as a Hugging Face `rope_scaling` dict.

llama.cpp's converter writes a Llama 3.x model's RoPE scaling not as
metadata but as the tensor `rope_freqs.weight`: one divisor per rotary
frequency (`inv_freq / rope_freqs` is what llama.cpp rotates with), computed
from HF's `rope_type: "llama3"` parameters. `llama3_from_factors` recovers
those parameters from the tensor, so the model rotates as llama.cpp does
(and as the original HF model did); `yarn_extras` reads the YaRN keys the
converter writes beside `rope.scaling.type = "yarn"`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["llama3_factors", "llama3_from_factors", "yarn_extras"]

# Relative agreement required between the file's factors and the ones the
# recovered parameters give (the file stores float32).
_RTOL = 1e-5


def llama3_factors(params: dict[str, Any], theta: float,
                   rotary_dim: int) -> np.ndarray:
  """llama.cpp's `rope_freqs` for HF `llama3` parameters (float64).

  The divisor of each rotary frequency: 1 for short wavelengths, `factor`
  for long ones, `1 / ((1 - s) / factor + s)` in between, with `s` linear
  in 1 / wavelength (`LlamaModel.generate_extra_tensors` in llama.cpp's
  `convert_hf_to_gguf.py`).

  Examples:
    >>> p = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    ...      "original_max_position_embeddings": 8192}
    >>> f = llama3_factors(p, 500000.0, 128)
    >>> float(f[0]), float(f[-1])
    (1.0, 8.0)
  """
  factor = params["factor"]
  low, high = params["low_freq_factor"], params["high_freq_factor"]
  old_len = params["original_max_position_embeddings"]
  inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
  wavelen = 2 * math.pi / inv_freq
  smooth = (old_len / wavelen - low) / (high - low)
  return np.where(wavelen < old_len / high, 1.0,
                  np.where(wavelen > old_len / low, factor,
                           1.0 / ((1 - smooth) / factor + smooth)))


def llama3_from_factors(factors: np.ndarray, theta: float, rotary_dim: int,
                        original_context: int | None, where: str
                        ) -> dict[str, Any]:
  """The HF `llama3` `rope_scaling` whose factors are `factors`.

  `factor` is the largest divisor; the band in between (divisors strictly
  between 1 and `factor`) fixes the two wavelengths where the band starts
  and ends. Those are all the rotation depends on, so `low_freq_factor` is
  taken as 1 (Llama 3.x's) and `original_max_position_embeddings` and
  `high_freq_factor` follow; with fewer than two divisors in the band,
  Llama 3.x's factors 1 and 4 are taken, with the file's
  `rope.scaling.original_context_length`, the length the one divisor in
  the band gives, or 8192. Either way the result must reproduce `factors`.

  Args:
    factors: the `rope_freqs.weight` tensor, `[rotary_dim // 2]`.
    theta: `rope.freq_base`.
    rotary_dim: `rope.dimension_count` (the head dimension).
    original_context: `rope.scaling.original_context_length`, if any.
    where: the file and tensor, for error messages.

  Returns:
    `{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}`.

  Raises:
    ValueError: the factors have the wrong length or follow no `llama3`
      scaling.
  """
  factors = np.asarray(factors, np.float64).reshape(-1)
  if factors.shape[0] != rotary_dim // 2 or not np.all(factors > 0):
    raise ValueError(
        f"{where}: expected {rotary_dim // 2} positive rotary frequency "
        f"factors (rope.dimension_count {rotary_dim} / 2), got "
        f"{factors.shape[0]} values (min {factors.min():g}).")
  factor = float(np.float32(factors.max()))
  inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
  band = (factors > 1 + _RTOL) & (factors < factor * (1 - _RTOL))
  candidates = []
  if band.sum() >= 2 and factor > 1:
    # s = (1 / r - 1 / factor) / (1 - 1 / factor) = a / wavelen + b with
    # a = old_len / (high - low), b = -low / (high - low); low = 1.
    s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(inv_freq[band] / (2 * math.pi), s, 1)
    if b < 0:
      high = 1 - 1 / b
      candidates.append({"factor": factor, "low_freq_factor": 1.0,
                         "high_freq_factor": float(f"{high:.6g}"),
                         "original_max_position_embeddings":
                             int(round(a * (high - 1)))})
  # Llama 3.x's band factors 1 and 4; the original context from the file,
  # else from the one divisor in the band, else 8192.
  lengths = [original_context] if original_context else []
  wavelen = 2 * math.pi / inv_freq
  if band.sum() == 1 and factor > 1:
    s = (1 / factors[band][0] - 1 / factor) / (1 - 1 / factor)
    lengths.append(int(round((3 * s + 1) * wavelen[band][0])))
  lengths.append(8192)
  for old_len in lengths:
    candidates.append({"factor": factor, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0,
                       "original_max_position_embeddings": int(old_len)})
  if band.sum() <= 1 and factor > 1:
    candidates += _sparse_band_candidates(factors, factor, wavelen, band)
  for params in candidates:
    want = llama3_factors(params, theta, rotary_dim)
    if np.allclose(factors, want, rtol=_RTOL, atol=0):
      return {"rope_type": "llama3", **params}
  raise ValueError(
      f"{where}: the rotary frequency factors follow no Llama 3 RoPE "
      f"scaling (factors {np.round(factors[:4], 4).tolist()} ... "
      f"{np.round(factors[-4:], 4).tolist()}); jaxbnb cannot rotate as "
      "llama.cpp would with them.")


def _sparse_band_candidates(factors, factor, wavelen, band
                            ) -> list[dict[str, Any]]:
  """Parameters for factors with at most one divisor inside the band,
  other band ratios than Llama 3.x's 4 (the converter's formula with, e.g.,
  low 2 and high 4): many parameters give such factors, all the same
  rotation. For each whole original length between the last wavelength
  left unscaled and the first one fully scaled, `high_freq_factor` (with
  `low_freq_factor` 1) is the one that puts the band's divisor where it
  is, or puts the band's lower edge just past the unscaled wavelengths."""
  ones = wavelen[~band & (factors < factor * (1 - _RTOL))]
  fulls = wavelen[~band & (factors >= factor * (1 - _RTOL))]
  w1 = float(ones.max()) if ones.size else 0.0
  lo = float(wavelen[band][0]) if band.any() else w1
  hi = float(fulls.min()) if fulls.size else 2 * float(wavelen.max())
  out = []
  first, last = int(math.floor(lo)) + 1, int(math.ceil(hi)) - 1
  if last < first:
    return []
  # 64 lengths spread over the range (the middle ones are the least
  # sensitive to the rounding of high_freq_factor)
  lengths = sorted({int(round(v)) for v in np.geomspace(first, last, 64)},
                   key=lambda v: abs(math.log(v / math.sqrt(first * last))))
  for old_len in lengths:
    if band.any():  # s = (old / wb - 1) / (high - 1) at the band's divisor
      s = (1 / factors[band][0] - 1 / factor) / (1 - 1 / factor)
      if not 0 < s < 1:
        return []
      high = 1 + (old_len / lo - 1) / s
    else:  # the band's lower edge old / high just above w1
      high = old_len / (w1 * (1 + 1e-4)) if w1 else 4.0
    if high > 1 and old_len / high > w1:
      out.append({"factor": factor, "low_freq_factor": 1.0,
                  "high_freq_factor": float(f"{high:.9g}"),
                  "original_max_position_embeddings": old_len})
  return out


def yarn_extras(meta: Callable[[str], Any]) -> dict[str, Any]:
  """HF YaRN fields from llama.cpp's `rope.scaling.yarn_*` keys.

  `beta_fast` and `beta_slow` (the converter writes HF's values under
  `yarn_beta_fast` / `yarn_beta_slow`); absent keys are left out, so HF's
  defaults (32 and 1) apply.
  """
  out = {}
  for key, hf in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                  ("rope.scaling.yarn_beta_slow", "beta_slow")):
    value = meta(key)
    if value is not None:
      out[hf] = float(value)
  return out
