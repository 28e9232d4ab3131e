"""LLM.int8 against bitsandbytes' own `Linear8bitLt` on CUDA.

Fixture: tests/golden/bnb_int8/matmul.npz, written by
tests/golden/make_bnb_int8_golden.py (bitsandbytes 0.50.2, torch 2.11,
NVIDIA H200; tests/golden/bnb_int8/VERSIONS.txt). Per case (fp16 and bf16
activations, M = 1, 5, 16, 40 rows, K = 256 -> N = 96, a bias, four planted
outlier columns): the inputs `A`, `W` (fp16), `bias`, bitsandbytes' int8
weight `CB` / `SCB`, the outlier columns of `int8_vectorwise_quant(A, 6)`
and the layer outputs at thresholds 0 and 6.

What must hold, and the measured exceptions (every one has a cause named
here; nothing is loosened to hide a difference):

* Row quantization. bitsandbytes' CUDA kernel scales by
  `__fdividef(127, absmax)`, an approximate division, so a value whose
  scaled magnitude `|x| * 127 / absmax` lies within a few float32 ulps of a
  rounding tie `k + 0.5` can round to the other integer. jaxbnb divides
  exactly. Measured: `SCB` bit-identical; `CB` identical except 3 of 24576
  elements, each one code apart at 63.499996 / 63.500004; activations: rows
  4 and 33 of `bfloat16_m40` each hold such an element (63.499996 and an
  exact 63.5), which moves that whole output row by one code's worth.
* Threshold 0, rows without a tie element: bit-identical, except that
  bitsandbytes adds an fp16 bias with one `fmaf` (a single rounding) where
  jaxbnb rounds the product and the sum separately: at most one fp16 ulp
  (measured: 1 element of 1536 in `float16_m16`). Rows with a tie element
  must equal bitsandbytes' row (up to that fp16-bias ulp) once the tie
  codes are rounded the other way (checked by recomputing the int8 path in
  numpy).
* Threshold 6: bitsandbytes adds the outlier columns with a cuBLAS 16-bit
  `addmm` (float32 accumulation, one rounding); jaxbnb's XLA path and the
  int8 GEMM kernel do the same sum in another order: within the float32
  summation bound plus one ulp of the dtype (measured: bit-identical on
  every row without a tie element). The decode kernel (M <= 16, interpret
  mode here) multiplies the outliers with the *unrounded* dequantized
  weight as three int8 digits of 2**-20 of the row's outlier absmax
  (pallas_kernels/int8_matmul.py, "limbs"), where bitsandbytes rounds
  `CB * SCB / 127` to the dtype first: the bound adds that rounding (one
  unit `u` of the dtype per outlier term) and the digits' truncation
  (measured: up to 0.0625 in bf16 and 0.0078 in fp16, at most 0.98 of the
  bound, in `bfloat16_m16`; the XLA path and the int8 GEMM (M = 40) are
  bit-identical there).
"""

from __future__ import annotations

import itertools
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxbnb
from jaxbnb import functional as F
from jaxbnb.nnx import Linear8bitLt
from tests import helpers

PATH = os.path.join(helpers.GOLDEN, "bnb_int8", "matmul.npz")
assert os.path.exists(PATH), (
    "golden fixture bnb_int8/matmul.npz is missing "
    "(tests/golden/make_bnb_int8_golden.py)")
G = np.load(PATH)
CASES = [f"{dt}_m{m}" for dt in ("float16", "bfloat16")
         for m in (1, 5, 16, 40)]
assert sorted({k.split("/")[0] for k in G.files}) == sorted(CASES)
DT = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
PLANTED = [3, 70, 71, 200]  # the script's OUTLIER_COLS
EPS = helpers.F32_EPS
U = {np.dtype(np.float16): 2.0 ** -11, np.dtype(ml_dtypes.bfloat16): 2.0 ** -8}
C = np.float32(6.200012e-05)  # bitsandbytes' epilogue constant (1/127^2)


def _case(key):
  dt = DT[key.split("_")[0]]
  a = G[key + "/A"].astype(dt)
  # The fixture stores the 16-bit values as float32: exact round trips.
  assert np.array_equal(a.astype(np.float32), G[key + "/A"])
  bias = G[key + "/bias"].astype(dt)
  weight = F.Int8Params(jnp.asarray(G[key + "/CB"]),
                        jnp.asarray(G[key + "/SCB"]))
  return dt, a, bias, weight


def _near_tie(x, absmax):
  """Elements whose `|x| * 127 / absmax` lies within 4 float32 ulps of a
  rounding tie: where `__fdividef`'s error (2 ulp of the scale, one more
  for the product) can decide differently from an exact division."""
  with np.errstate(divide="ignore", invalid="ignore"):
    v = np.abs(np.asarray(x, np.float32)
               * (np.float32(127) / np.asarray(absmax, np.float32))[:, None])
  return np.abs(v - np.floor(v) - np.float32(0.5)) <= 4 * np.spacing(v)


# --------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------


def test_weight_quantization_matches_bnb():
  w = G["float16_m1/W"]
  for key in CASES:  # one weight for every case (the script's seed 0)
    assert np.array_equal(G[key + "/W"], w), key
    for name in ("CB", "SCB"):
      assert np.array_equal(G[key + "/" + name], G[f"float16_m1/{name}"])
  cb_ref, scb_ref = G["float16_m1/CB"], G["float16_m1/SCB"]
  for q in (F.quantize_int8_weight(jnp.asarray(w)),
            F.Int8Params.from_float(jnp.asarray(w))):
    assert q.CB.dtype == jnp.int8 and q.SCB.dtype == jnp.float32
    helpers.assert_bits_equal(q.SCB, scb_ref, err_msg="SCB")
    cb = np.asarray(q.CB, np.int32)
    diff = cb - cb_ref.astype(np.int32)
    assert np.abs(diff).max() <= 1
    bad = diff != 0
    tie = _near_tie(w, scb_ref)
    assert not (bad & ~tie).any(), np.argwhere(bad & ~tie)
    assert bad.sum() == 3, np.argwhere(bad)  # measured (module docstring)
  # The functional quantizer gives the same rows and statistics.
  ca, stats, cols = F.int8_vectorwise_quant(jnp.asarray(w))
  assert cols is None
  assert np.array_equal(np.asarray(ca), np.asarray(q.CB))
  helpers.assert_bits_equal(stats, scb_ref, err_msg="row stats")


@pytest.mark.parametrize("key", CASES)
def test_outlier_columns_match_bnb(key):
  _, a, _, _ = _case(key)
  a16 = jnp.asarray(a.astype(np.float16))
  _, _, cols = F.int8_vectorwise_quant(a16, threshold=6.0)
  ref = G[key + "/cols"]
  assert cols.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(cols), ref)
  assert ref.tolist() == PLANTED
  mask = F.int8_vectorwise_quant_mask(a16, threshold=6.0)[2]
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(mask)), ref)
  assert F.int8_vectorwise_quant(a16, threshold=0.0)[2] is None
  # Below every planted magnitude no column is an outlier; above the
  # largest (|a| = 23) none either.
  assert F.int8_vectorwise_quant(a16, threshold=24.0)[2].size == 0


# --------------------------------------------------------------------------
# matmul_8bit
# --------------------------------------------------------------------------


def _int8_path(ca, sca, cb, scb, bias, dt):
  """bitsandbytes' int8 product and fp16 epilogue in numpy, on given codes
  (`fmaf` for an fp16 bias, emulated in float64; otherwise fp16 rounding,
  then the bias added in float32 and rounded to fp16), cast to `dt`."""
  acc = np.asarray(ca, np.int64) @ np.asarray(cb, np.int64).T
  prod = (acc.astype(np.float32) * np.asarray(sca, np.float32)[:, None]
          * np.asarray(scb, np.float32)[None, :])
  if bias.dtype == np.float16:
    out = (prod.astype(np.float64) * np.float64(C)
           + bias.astype(np.float64)).astype(np.float32).astype(np.float16)
  else:
    out = (prod * C).astype(np.float16)
    out = (out.astype(np.float32) + bias.astype(np.float32)).astype(
        np.float16)
  return out.astype(dt)


def _bound(y, a, weight, cols, dt, limbs):
  """The largest honest |y - bnb| on rows without a tie element.

  With no outlier column: 0 (plus the fp16-bias slack added by the
  caller). With outliers: both sides add n = #cols + 1 terms (the outlier
  products and the rounded int8 result) in float32 in their own order,
  each within n * u32 * T of the exact sum (T: the terms' magnitudes),
  then round once to the dtype (half an ulp each). `limbs`: the decode
  kernel's unrounded weight (u of the dtype per outlier term) and its
  digits' truncation (2**-20 of the row's outlier absmax per weight).
  """
  if not cols.any():
    return np.zeros(y.shape)
  x_out = np.where(cols[None, :], a.astype(np.float64), 0.0)
  w = (np.asarray(weight.CB, np.float32)
       * np.asarray(weight.SCB, np.float32)[:, None]) * np.float32(
           7.874015718698502e-3)
  wx = np.abs(x_out) @ np.abs(w.astype(np.float64)).T
  # |int8 result| <= |y| + |outlier sum|, so T <= |y| + 2 |x_out| |w|.
  terms = np.abs(np.asarray(y, np.float64)) + 2 * wx
  bound = 2 * (cols.sum() + 1) * EPS * terms
  if limbs:
    amax = np.abs(x_out).max(axis=1, keepdims=True)
    digits = 2.0 ** -20 * amax * (np.abs(w) @ cols.astype(np.float64))[None]
    bound = bound + U[np.dtype(dt)] * wx + digits
  return bound + helpers.ulp(np.abs(np.asarray(y, np.float64)) + bound, dt)


def _check_against_bnb(y, key, threshold, mode):
  dt, a, bias, weight = _case(key)
  ref = G[f"{key}/out_t{threshold:g}"].astype(dt)
  assert np.array_equal(ref.astype(np.float32),
                        G[f"{key}/out_t{threshold:g}"])
  y = np.asarray(y)
  assert y.dtype == dt and y.shape == ref.shape, (y.dtype, y.shape)
  a16 = a.astype(np.float16)
  ca, sca, cols = F.int8_vectorwise_quant_mask(jnp.asarray(a16),
                                               threshold=threshold)
  cols = (np.zeros(a.shape[1], bool) if cols is None
          else np.asarray(cols))
  # Tie elements of the int8 path (outlier columns never reach it).
  tie = _near_tie(a16, sca) & ~cols[None, :]
  tie_rows = tie.any(1)
  m = a.shape[0]
  limbs = mode == "interpret" and m <= 16 and cols.any()
  bound = _bound(y, a, weight, cols, dt, limbs)
  if bias.dtype == np.float16:
    bound = bound + helpers.ulp(ref, np.float16)  # fmaf vs two roundings
  err = np.abs(y.astype(np.float64) - ref.astype(np.float64))
  ok = err <= bound
  assert ok[~tie_rows].all(), (
      f"{key} t{threshold:g} {mode}: {int((~ok[~tie_rows]).sum())} "
      f"elements beyond the bound, worst "
      f"{(err - bound)[~tie_rows].max():.3g}")
  if not cols.any():
    # Bit-identical but for the fp16 bias' fused rounding, which is rare.
    same = helpers.bits(y)[~tie_rows] == helpers.bits(ref)[~tie_rows]
    assert same.mean() >= 0.99, same.mean()
  if not tie_rows.any():
    return err, bound
  # A tie row must be bitsandbytes' exactly once its tie codes round the
  # other way (each flip moves the int32 sum by a whole column of CB).
  cb, scb = np.asarray(weight.CB), np.asarray(weight.SCB)
  ca = np.asarray(ca, np.int32)
  v = np.asarray(a16, np.float32) * (np.float32(127) / np.asarray(sca))[:, None]
  for r in np.flatnonzero(tie_rows):
    ks = np.flatnonzero(tie[r])
    assert len(ks) <= 4, (key, r, ks)
    ours = _int8_path(ca[r:r + 1], sca[r:r + 1], cb, scb, bias, dt)
    if not cols.any():
      # The numpy int8 path is jaxbnb's row (up to the fp16-bias slack).
      np.testing.assert_array_less(
          np.abs(ours[0].astype(np.float64) - y[r].astype(np.float64)),
          bound[r] + 1e-30)
    found = False
    for flips in itertools.product((False, True), repeat=len(ks)):
      row = ca[r].copy()
      for k, f in zip(ks, flips):
        if f:  # the other integer next to the tie
          row[k] = int(np.floor(v[r, k])) + int(np.ceil(v[r, k])) - row[k]
      alt = _int8_path(row[None], sca[r:r + 1], cb, scb, bias, dt)[0]
      if cols.any():
        # The outlier stream is the same on both sides: compare with the
        # summation bound around bitsandbytes' row.
        alt = alt.astype(np.float64) + (y[r].astype(np.float64) - ours[0])
        found |= bool(np.all(np.abs(alt - ref[r]) <= bound[r]))
      else:
        found |= bool(np.all(np.abs(alt.astype(np.float64) - ref[r])
                             <= bound[r]))
    assert found, (key, threshold, mode, r, ks, v[r, ks])
  return err, bound


@pytest.mark.parametrize("mode", ["reference", "interpret"])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("key", CASES)
def test_matmul_8bit_matches_bnb(key, threshold, mode):
  dt, a, bias, weight = _case(key)
  with jaxbnb.kernel_mode(mode):
    y = F.matmul_8bit(jnp.asarray(a), weight, jnp.asarray(bias),
                      threshold=threshold)
  _, bound = _check_against_bnb(y, key, threshold, mode)
  if threshold > 0:
    # Not vacuous: the same call without the outlier stream (threshold 0;
    # the XLA path, bit-identical to the kernels there) is outside the
    # bound on most elements of the rows holding an outlier.
    with jaxbnb.kernel_mode("reference"):
      y0 = np.asarray(F.matmul_8bit(jnp.asarray(a), weight,
                                    jnp.asarray(bias)), np.float64)
    ref = G[f"{key}/out_t6"].astype(np.float64)
    rows = (np.abs(a.astype(np.float32)) >= 6).any(1)
    assert (np.abs(y0 - ref) > bound)[rows].mean() > 0.5


@pytest.mark.parametrize("key", ["float16_m5", "bfloat16_m16",
                                 "bfloat16_m40"])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_linear8bitlt_layer_matches_bnb(key, threshold):
  """The NNX layer built from bitsandbytes' CB / SCB / bias, called as a
  user calls it (3-D input, input dtype kept)."""
  dt, a, bias, weight = _case(key)
  layer = Linear8bitLt(256, 96, has_fp16_weights=False, threshold=threshold,
                       weight=weight, bias=jnp.asarray(bias))
  y = layer(jnp.asarray(a)[None])
  assert y.shape == (1, *a.shape[:1], 96) and y.dtype == dt
  helpers.assert_bits_equal(
      y[0], F.matmul_8bit(jnp.asarray(a), weight, jnp.asarray(bias),
                          threshold=threshold), err_msg=key)
  _check_against_bnb(y[0], key, threshold, "reference")


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
  """Each error names the argument, what it expects and what it got."""
  _, a, bias, w = _case("float16_m5")
  a, bias = jnp.asarray(a), jnp.asarray(bias)
  cases = [
      (lambda: F.matmul_8bit(a.astype(jnp.int32), w), TypeError,
       "matmul_8bit: `A` must have dtype float32, float16 or bfloat16, got "
       "int32"),
      (lambda: F.matmul_8bit(a[:, :200], w), ValueError,
       r"`A` must have shape \[..., in_features=256\], got \(5, 200\)"),
      (lambda: F.matmul_8bit(a, w, bias[:90]), ValueError,
       r"`bias` must have shape \(out_features,\)=\(96,\), got \(90,\)"),
      (lambda: F.matmul_8bit(a, w, bias.astype(jnp.int32)), TypeError,
       "`bias` must have dtype float32, float16 or bfloat16, got int32"),
      (lambda: F.matmul_8bit(a, F.Int8Params(w.CB.astype(jnp.float16),
                                             w.SCB)), TypeError,
       "`weight.CB` must have dtype int8, got float16"),
      (lambda: F.matmul_8bit(a, F.Int8Params(w.CB, w.SCB[:-1])), ValueError,
       r"`weight.SCB` must have shape \(96,\), got \(95,\)"),
      (lambda: F.matmul_8bit(a, w.CB), TypeError,
       "`weight` must be an Int8Params, got ArrayImpl"),
      (lambda: F.matmul_8bit(a, w, threshold=-6.0), ValueError,
       "`threshold` must be >= 0, got -6.0"),
      (lambda: F.matmul_8bit(a, w, threshold="6"), TypeError,
       "`threshold` must be a float >= 0, got '6'"),
      (lambda: F.int8_vectorwise_quant(a.astype(jnp.int32), 6.0), TypeError,
       "int8_vectorwise_quant: `A` must have dtype float32, float16 or "
       "bfloat16, got int32"),
      (lambda: Linear8bitLt(255, 96, has_fp16_weights=False, weight=w,
                            bias=bias), ValueError,
       r"Linear8bitLt: `weight` must have shape \[out_features, "
       r"in_features\]=\[96, 255\], got \[96, 256\]"),
      (lambda: Linear8bitLt(256, 96, weight=w, bias=bias), ValueError,
       "an Int8Params `weight` needs has_fp16_weights=False"),
      (lambda: Linear8bitLt(256, 96, has_fp16_weights=False, weight=w,
                            bias=bias)(a[:, :128]), ValueError,
       r"Linear8bitLt: `inputs` must have shape \[..., in_features\] with "
       r"in_features=256, got shape \(5, 128\)"),
  ]
  for call, error, message in cases:
    with pytest.raises(error, match=message):
      call()
