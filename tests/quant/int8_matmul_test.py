"""LLM.int8 matmul (`matmul_8bit`, `matmul_8bit_fp16_weights`) and the
int8 building blocks (`int8_linear_matmul`, `int8_double_quant`,
`quantize_int8_weight`).

The forward is checked against `_bnb_forward`, a numpy transcription of
bitsandbytes 0.50's CUDA path (reference doc section 2.7), written here
without calling jaxbnb, and against bitsandbytes' own outputs
(tests/golden/bnb_8bit.npz) where they exist (threshold 0). Every tolerance
is derived in a comment beside it; `test_tolerances_catch_broken_forwards`
shows they are tight enough to fail the usual mistakes.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import int8_frozen
from tests import helpers

G8 = helpers.load_golden("bnb_8bit.npz")
EPS = helpers.F32_EPS
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
          "float32": np.float32}
OUTLIER_COLS = (3, 17, 40)


# --------------------------------------------------------------------------
# the independent reference
# --------------------------------------------------------------------------


def _bnb_forward(x, cb, scb, bias, threshold, codes=None):
  """bitsandbytes' `MatMul8bitLt.forward` in numpy (section 2.7).

  Returns `(base, exact, bound)`: `base` is the int8 path in x's dtype
  (bit-exact: integer GEMM and the same float32 operations in the same
  order), `exact` the float64 value of `base + outlier stream` and `bound`
  the largest honest distance of a correct result from `exact` (0 where the
  result must equal `base` bit for bit). `codes`: the activations' int8
  codes to use instead of numpy's (the GPU's, see `_near_tie_codes`).
  """
  x = np.asarray(x)
  dt = x.dtype
  k = x.shape[-1]
  x2 = x.reshape(-1, k)
  xh = x2.astype(np.float16)                       # A.to(torch.float16)
  a = np.abs(xh)
  outliers = np.zeros(a.shape, bool)
  if threshold > 0:
    outliers = a >= np.float16(threshold)          # note: >=
  cols = outliers.any(0)
  absmax = np.where(outliers, np.float16(0), a).max(1).astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    q = np.rint(xh.astype(np.float32) * (np.float32(127) / absmax)[:, None])
  q = np.clip(np.nan_to_num(q), -128, 127).astype(np.int8)
  q[outliers] = 0
  if x2.shape[0] > 1:
    q[:, cols] = 0                                 # whole outlier columns
  if codes is not None:
    _near_tie_codes(codes, q, xh, absmax)
    q = np.asarray(codes, np.int8)
  acc = q.astype(np.int64) @ np.asarray(cb).astype(np.int64).T
  prod = (acc.astype(np.float32) * absmax[:, None]) * np.asarray(
      scb, np.float32)[None, :]
  if bias is not None and np.asarray(bias).dtype == np.float16:
    # fmaf(prod, c, bias): one rounding, emulated in float64 (the product of
    # two float32 is exact there).
    out = (prod.astype(np.float64) * np.float64(np.float32(6.200012e-05))
           + np.asarray(bias, np.float64)).astype(np.float32)
    out = out.astype(np.float16)
  else:
    out = (prod * np.float32(6.200012e-05)).astype(np.float16)
    if bias is not None:                           # out.add_(bias) in fp16
      out = (out.astype(np.float32) + np.asarray(bias).astype(np.float32)
             ).astype(np.float16)
  base = out.astype(dt)                            # .to(A.dtype)
  exact = base.astype(np.float64)
  bound = np.zeros_like(exact)
  if cols.any():
    # out.addmm(A[:, cols], dequant(CB[:, cols]).to(A.dtype).t())
    w = ((np.asarray(cb, np.float32) * np.asarray(scb, np.float32)[:, None])
         * np.float32(7.874015718698502e-3)).astype(dt).astype(np.float64)
    xo = x2[:, cols].astype(np.float64)
    exact = exact + xo @ w[:, cols].T
    # Float32 accumulation of the n = (#cols + 1) terms in any order
    # (Higham: n * eps/2 * sum of magnitudes, doubled for two orders is
    # not needed: one side is exact) and one rounding to x's dtype (half an
    # ulp; one ulp bounds it at a binade edge).
    mag = np.abs(base.astype(np.float64)) + np.abs(xo) @ np.abs(w[:, cols]).T
    acc_err = (cols.sum() + 1) * EPS * mag
    bound = acc_err + helpers.ulp(np.abs(exact) + acc_err, dt)
  shape = (*x.shape[:-1], cb.shape[0])
  return base.reshape(shape), exact.reshape(shape), bound.reshape(shape)


def _near_tie_codes(codes, q, xh, absmax):
  """Asserts that `codes` equal numpy's `q` except at rounding ties.

  XLA:GPU's float32 division is not correctly rounded (measured on the
  H200: `127 / absmax` one ulp off), so `x * (127 / absmax)` can land on
  the other side of a .5 tie, as bitsandbytes' own `__fdividef` does: such
  a code may differ by one; no other may.
  """
  codes = np.asarray(codes).astype(np.int64)
  diff = codes != q
  with np.errstate(divide="ignore", invalid="ignore"):
    v = xh.astype(np.float64) * (127.0 / absmax.astype(np.float64))[:, None]
  tie = np.abs(np.abs(v - np.trunc(v)) - 0.5) <= 1e-5 * np.abs(v)
  assert np.all(np.abs(codes - q)[diff] == 1), "a code off by more than one"
  assert np.all(tie[diff]), "a code off away from a rounding tie"


def _inputs(dtype, lead=(8,), k=64, n=24, seed=0, planted=True):
  """x `[*lead, k]` with planted outlier columns, an Int8Params, a bias."""
  kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
  x = np.array(jax.random.normal(kx, (*lead, k)), np.float32)
  if planted:
    flat = x.reshape(-1, k)
    # Outliers in a few rows of each planted column; the other rows of those
    # columns keep small values (they must leave the int8 path too).
    for j, col in enumerate(OUTLIER_COLS):
      flat[j % flat.shape[0], col] = (-1) ** j * (8.0 + 5 * j)
    x = flat.reshape(x.shape)
  x = x.astype(DTYPES[dtype])
  w = np.asarray(jax.random.normal(kw, (n, k)) / 8, np.float32)
  bias = np.asarray(jax.random.normal(kb, (n,)), np.float32).astype(
      DTYPES[dtype])
  return x, F.quantize_int8_weight(jnp.asarray(w)), bias, w


def _assert_forward(y, x, q, bias, threshold, msg="", codes=None):
  base, exact, bound = _bnb_forward(x, q.CB, q.SCB, bias, threshold, codes)
  y = np.asarray(y)
  assert y.dtype == x.dtype and y.shape == base.shape, (y.dtype, y.shape)
  plain = bound == 0
  if bias is not None and np.asarray(bias).dtype == np.float16:
    # jaxbnb rounds the product and then adds the fp16 bias in float32;
    # bnb's fmaf rounds once: the float16 int8-path results can differ by
    # one float16 ulp (rarely: the golden case has none in 192).
    slack = helpers.ulp(base, np.float16)
    diff = np.abs(y.astype(np.float64) - base.astype(np.float64))
    assert np.all(~plain | (diff <= slack)), msg
    if plain.any():
      same = helpers.bits(y)[plain] == helpers.bits(base)[plain]
      assert same.mean() >= 0.98, (msg, same.mean())
  else:
    slack = 0.0
    helpers.assert_bits_equal(y[plain], base[plain], err_msg=msg)
  helpers.assert_within(y[~plain], exact[~plain], (bound + slack)[~plain], msg)


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------


def test_threshold_0_is_bit_identical_to_bitsandbytes():
  # bitsandbytes 0.50.2 on CUDA: Linear8bitLt forward, fp16, threshold 0.
  a, w = jnp.asarray(G8["mm/A"]), jnp.asarray(G8["mm/W"])
  q = F.quantize_int8_weight(w)
  y = F.matmul_8bit(a, q)
  helpers.assert_bits_equal(y, G8["mm/out"], err_msg="no bias")
  np.testing.assert_array_equal(
      np.asarray(F.int8_linear_matmul(F.int8_vectorwise_quant(a)[0], q.CB)),
      G8["mm/acc"])
  # fp16 bias: bnb fuses it in one fmaf; at most one fp16 ulp apart.
  yb = np.asarray(F.matmul_8bit(a, q, jnp.asarray(G8["mm/bias"])))
  ref = G8["mm/out_bias"]
  diff = np.abs(yb.astype(np.float64) - ref.astype(np.float64))
  assert np.all(diff <= helpers.ulp(ref, np.float16)), diff.max()
  assert (helpers.bits(yb) == helpers.bits(ref)).mean() >= 0.99
  # The numpy transcription reproduces bnb too (so it is a fair judge).
  base, _, _ = _bnb_forward(G8["mm/A"], np.asarray(q.CB), np.asarray(q.SCB),
                            None, 0.0)
  helpers.assert_bits_equal(base, G8["mm/out"], err_msg="numpy reference")


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("lead", [(8,), (1,), (2, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_numpy_transcription(threshold, dtype, lead, with_bias):
  x, q, bias, _ = _inputs(dtype, lead)
  b = bias if with_bias else None
  y = F.matmul_8bit(jnp.asarray(x), q,
                    None if b is None else jnp.asarray(b),
                    threshold=threshold)
  _assert_forward(y, x, q, b, threshold, f"{dtype} {lead} thr={threshold}")


def test_threshold_without_outliers_is_the_plain_int8_path():
  x, q, bias, _ = _inputs("float16", planted=False)
  assert np.abs(x).max() < 6
  helpers.assert_bits_equal(F.matmul_8bit(jnp.asarray(x), q, threshold=6.0),
                            F.matmul_8bit(jnp.asarray(x), q))


def test_outlier_columns_are_exact_up_to_the_weight():
  # With threshold 6 the planted columns skip activation quantization, so
  # the error against the float product x @ W.T comes from (a) the weight's
  # int8 rounding (<= SCB/254 per element, plus the fp16 cast of W, <=
  # 2**-11 |W|), (b) the int8 rounding of the *other* columns of x (<= half
  # a step, absmax_row/254, plus the fp16 cast of x, <= 2**-11 |x|), where
  # absmax_row no longer includes the outliers, and (c) the fp16 epilogue
  # and outlier-sum rounding (_bnb_forward's bound plus 2 fp16 ulps).
  x, q, _, w = _inputs("float32")
  cols = np.zeros(64, bool)
  cols[list(OUTLIER_COLS)] = True
  xf = x.astype(np.float64)
  y6 = np.asarray(F.matmul_8bit(jnp.asarray(x), q, threshold=6.0), np.float64)
  y0 = np.asarray(F.matmul_8bit(jnp.asarray(x), q), np.float64)
  exact = xf @ w.astype(np.float64).T
  w_err = (np.asarray(q.SCB, np.float64)[:, None] / 254
           + 2.0 ** -11 * np.abs(w))
  step = np.where(cols, 0, np.abs(xf)).max(1, keepdims=True) / 254
  x_err = np.where(cols, 0, step + 2.0 ** -11 * np.abs(xf))
  wq = np.abs(np.asarray(F.int8_vectorwise_dequant(q.CB, q.SCB), np.float64))
  bound = (np.abs(xf) @ w_err.T + x_err @ wq.T
           + 2 * helpers.ulp(np.abs(exact) + 1e-3, np.float16))
  helpers.assert_within(y6, exact, bound, "threshold 6")
  # Without the decomposition the outliers (8..18) set their rows' int8
  # step, 3-7x the step of the other values (|x| <~ 2.5): the RMS error of
  # those rows grows accordingly (measured 2.7x; the weight's rounding
  # error, common to both, dilutes the ratio).
  rows = np.abs(xf).max(1) >= 6
  rms0 = np.sqrt(np.mean((y0 - exact)[rows] ** 2))
  rms6 = np.sqrt(np.mean((y6 - exact)[rows] ** 2))
  assert rms0 > 2 * rms6, (rms0, rms6)


def test_tolerances_catch_broken_forwards(monkeypatch):
  """The checks above fail for the usual mistakes (mutations of the code,
  patched into `int8_frozen`, where `matmul_8bit`'s forward lives)."""
  ref = int8_frozen.reference

  def broken(dtype, threshold, **patch):
    x, q, bias, _ = _inputs(dtype)
    with monkeypatch.context() as m:
      for name, fn in patch.items():
        m.setattr(int8_frozen, name, fn)
      y = F.matmul_8bit(jnp.asarray(x), q, jnp.asarray(bias),
                        threshold=threshold)
    with pytest.raises(AssertionError):
      _assert_forward(y, x, q, bias, threshold)

  def reference_with(**fns):
    return types.SimpleNamespace(**{**vars(ref), **fns})

  def quant_no_column_zeroing(a, threshold):
    _, stats, mask = ref.int8_vectorwise_quant(a, threshold)
    q = jnp.round(a.astype(jnp.float32) * (127 / stats)[:, None])
    q = jnp.where(jnp.abs(a) >= threshold, 0, q).astype(jnp.int8)
    return q, stats, mask

  def mm_dequant_default_backend(acc, row, col, bias=None):
    out = acc.astype(jnp.float32) * row[:, None] * col[None, :]
    out = out * jnp.float32(6.200124e-05)  # bnb's default-backend literal
    if bias is not None:
      out = out + bias.astype(jnp.float32)
    return out.astype(jnp.float16)

  # No outlier stream.
  broken("bfloat16", 6.0,
         _dequantized=lambda cb, scb, dt: jnp.zeros(cb.shape, dt))
  # Outlier columns not zeroed in CA (only the outlier elements).
  broken("bfloat16", 6.0, reference=reference_with(
      int8_vectorwise_quant=quant_no_column_zeroing))
  # The default backend's constant (1.8e-5 relative) instead of CUDA's: it
  # flips a few float16 roundings, seen where the check is bit-exact.
  broken("float16", 0.0, reference=reference_with(
      int8_mm_dequant=mm_dequant_default_backend,
      int8_mm_dequant_any_bias=mm_dequant_default_backend))


# --------------------------------------------------------------------------
# transformations: jit, vmap, grad
# --------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_jit_and_vmap(threshold):
  x, q, bias, _ = _inputs("float16", lead=(4, 6))
  xj, bj = jnp.asarray(x), jnp.asarray(bias)
  y = F.matmul_8bit(xj, q, bj, threshold=threshold)
  f = jax.jit(F.matmul_8bit, static_argnames="threshold")
  # Same XLA ops (exact integer GEMM, elementwise float32 epilogue, one
  # float32 dot over the masked outlier columns): bit-identical.
  helpers.assert_bits_equal(f(xj, q, bj, threshold=threshold), y)
  # vmap over the leading axis: each slice is its own batch, so its outlier
  # columns are those of the slice (bnb decides per call, over all rows).
  y_v = jax.vmap(lambda xi: F.matmul_8bit(xi, q, bj, threshold=threshold))(xj)
  y_s = jnp.stack([F.matmul_8bit(xi, q, bj, threshold=threshold) for xi in xj])
  helpers.assert_bits_equal(y_v, y_s)
  if threshold == 0.0:  # rows are independent without outliers
    helpers.assert_bits_equal(y_v, y)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_grad_of_frozen_weight(threshold, dtype):
  x, q, bias, _ = _inputs(dtype, lead=(2, 4))
  g = np.asarray(jax.random.normal(jax.random.key(9), (2, 4, 24))).astype(
      DTYPES[dtype])

  def loss(x, b, w):
    return jnp.sum((F.matmul_8bit(x, w, b, threshold=threshold)
                    * jnp.asarray(g)).astype(jnp.float32))

  dx, db, dw = jax.grad(loss, argnums=(0, 1, 2), allow_int=True)(
      jnp.asarray(x), jnp.asarray(bias), q)
  assert dx.dtype == x.dtype and dx.shape == x.shape and db.dtype == x.dtype
  # bnb: grad_A = g.to(A.dtype) @ (CB.to(A.dtype) * (SCB * (1/127))), the
  # weight rounded to A's dtype. Float32 accumulation of N = 24 products
  # (N * eps * sum|g||W|, helpers.matmul_bound) and one rounding.
  wa = (np.asarray(q.CB, np.float32) * (np.asarray(q.SCB, np.float32)
                                         * np.float32(1 / 127))[:, None]
        ).astype(DTYPES[dtype])
  g2 = g.reshape(-1, 24)
  exact, bound = helpers.matmul_bound(g2, wa.T, DTYPES[dtype])
  helpers.assert_within(np.asarray(dx).reshape(-1, 64), exact, bound, "dx")
  # dbias = sum(g) over 8 rows in float32, rounded to the bias dtype.
  sb = helpers.sum_bound(g2, 0)
  helpers.assert_within(db, g2.astype(np.float64).sum(0),
                        sb + helpers.ulp(np.abs(g2.astype(np.float64).sum(0))
                                         + sb, DTYPES[dtype]), "dbias")
  # The frozen weight gets no gradient.
  assert dw.CB.dtype == jax.dtypes.float0
  assert not np.any(np.asarray(dw.SCB))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fp16_weights_path(threshold, dtype):
  x, _, bias, w = _inputs(dtype, lead=(2, 4))
  wj = jnp.asarray(w)
  # Forward: quantize W.half() row-wise, then the frozen forward.
  q = F.quantize_int8_weight(wj)
  y = F.matmul_8bit_fp16_weights(jnp.asarray(x), wj, jnp.asarray(bias),
                                 threshold=threshold)
  helpers.assert_bits_equal(
      y, F.matmul_8bit(jnp.asarray(x), q, jnp.asarray(bias),
                       threshold=threshold))
  _assert_forward(y, x, q, bias, threshold, "fp16 weights")
  g = jax.random.normal(jax.random.key(3), (2, 4, 24)).astype(dtype)

  def loss(x, w, b):
    y = F.matmul_8bit_fp16_weights(x, w, b, threshold=threshold)
    return jnp.sum((y * g).astype(jnp.float32))

  def float_loss(x, w, b):
    y = jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w,
                   precision=jax.lax.Precision.HIGHEST) + b
    return jnp.sum(y * g.astype(jnp.float32))

  args = (jnp.asarray(x), wj, jnp.asarray(bias))
  dx, dw, db = jax.grad(loss, argnums=(0, 1, 2))(*args)
  _, dw_f, db_f = jax.grad(float_loss, argnums=(0, 1, 2))(*args)
  assert dw.dtype == jnp.float32 and dw.shape == w.shape
  # dW = g.T @ x, the float reference's gradient: both accumulate M = 8
  # products in float32 (helpers.matmul_bound: M * eps * sum|g||x|); the
  # 16-bit g and x are exact in float32.
  g2 = np.asarray(g.astype(jnp.float32)).reshape(-1, 24)
  x2 = np.asarray(x.astype(np.float32)).reshape(-1, 64)
  exact, bound = helpers.matmul_bound(g2.T, x2.T, jnp.float32)
  helpers.assert_within(dw, exact, bound, "dW")
  helpers.assert_within(dw_f, exact, bound, "dW float")
  helpers.assert_within(db, np.asarray(db_f, np.float64),
                        2 * helpers.sum_bound(g2, 0)
                        + helpers.ulp(np.abs(g2).sum(0), DTYPES[dtype]),
                        "dbias")
  # dx goes through the quantized weight (as bnb), not the float one.
  wa = (np.asarray(q.CB, np.float32) * (np.asarray(q.SCB, np.float32)
                                         * np.float32(1 / 127))[:, None]
        ).astype(DTYPES[dtype])
  exact, bound = helpers.matmul_bound(g2, wa.T, DTYPES[dtype])
  helpers.assert_within(np.asarray(dx).reshape(-1, 64), exact, bound, "dx")


# --------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [499, 512])
def test_int8_linear_matmul_is_exact(k):
  # bnb's test_int8_linear_matmul shapes: A [128, K] and [2, 64, K], B [512,
  # K]; K = 499 is where bnb falls back to an fp32 GEMM. Exact here.
  ka, kb = jax.random.split(jax.random.key(k))
  b = jax.random.randint(kb, (512, k), -128, 128, jnp.int32).astype(jnp.int8)
  for shape in ((128, k), (2, 64, k)):
    a = jax.random.randint(ka, shape, -128, 128, jnp.int32).astype(jnp.int8)
    out = F.int8_linear_matmul(a, b)
    assert out.dtype == jnp.int32 and out.shape == (*shape[:-1], 512)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)


@pytest.mark.parametrize("name", ["iv0", "iv1", "iv3", "iv4"])
def test_int8_double_quant(name):
  a = G8[name + "/input"]
  thr = float(G8[name + "/threshold"])
  ca, cat, rs, cs, cols = F.int8_double_quant(jnp.asarray(a), threshold=thr)
  # Row part: bitsandbytes' int8_vectorwise_quant outputs (golden).
  np.testing.assert_array_equal(np.asarray(ca), G8[name + "/CA"])
  helpers.assert_bits_equal(rs, G8[name + "/stats"])
  if thr == 0:
    assert cols is None
  else:
    np.testing.assert_array_equal(np.asarray(cols), G8[name + "/cols"])
  # Column part: bnb's torch code, transcribed (outlier elements zeroed,
  # round(A * 127 in fp16 / col_absmax in fp32), ties to even).
  out = np.abs(a) >= np.float16(thr) if thr > 0 else np.zeros(a.shape, bool)
  a0 = np.where(out, np.float16(0), a)
  col = np.abs(a0).max(0).astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    want = np.rint((a0 * np.float16(127)).astype(np.float32) / col)
  want = np.nan_to_num(want, nan=0, posinf=0, neginf=0).astype(np.int8)
  np.testing.assert_array_equal(np.asarray(cat), want)
  helpers.assert_bits_equal(cs, col)
  assert cat.shape == a.shape and cs.shape == (a.shape[1],)


def test_quantize_int8_weight_is_bnb_int8params():
  # bnb.nn.Int8Params quantizes W.to(float16): golden CB/SCB for fp16 W,
  # and a float32 W gives the bytes of its float16 cast.
  for name in ("iv0", "iv4"):
    q = F.quantize_int8_weight(jnp.asarray(G8[name + "/input"]))
    np.testing.assert_array_equal(np.asarray(q.CB), G8[name + "/CA"])
    helpers.assert_bits_equal(q.SCB, G8[name + "/stats"])
  w = jax.random.normal(jax.random.key(0), (16, 40))
  q = F.quantize_int8_weight(w)
  half = F.Int8Params.from_float(w.astype(jnp.float16))
  assert q.dtype == "float32" and q.CB.shape == (16, 40)
  np.testing.assert_array_equal(np.asarray(q.CB), np.asarray(half.CB))
  helpers.assert_bits_equal(q.SCB, half.SCB)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def test_errors_name_the_argument():
  q = F.quantize_int8_weight(jnp.ones((4, 8)))
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"matmul_8bit: `threshold` must be "
                     r">= 0, got -1.0"):
    F.matmul_8bit(x, q, threshold=-1.0)
  with pytest.raises(ValueError, match="`threshold` must be >= 0, got nan"):
    F.matmul_8bit(x, q, threshold=float("nan"))
  with pytest.raises(TypeError, match="`threshold` must be a float >= 0"):
    F.matmul_8bit(x, q, threshold="6")
  with pytest.raises(TypeError, match="static Python float"):
    jax.jit(lambda t: F.matmul_8bit(x, q, threshold=t))(6.0)
  with pytest.raises(TypeError, match="`weight` must be an Int8Params, got "
                     "ArrayImpl"):
    F.matmul_8bit(x, jnp.ones((4, 8)))
  with pytest.raises(TypeError, match="`A` must have dtype float32, float16 "
                     "or bfloat16, got int32"):
    F.matmul_8bit(jnp.ones((2, 8), jnp.int32), q)
  with pytest.raises(ValueError, match=r"`A` must have shape \[\.\.\., "
                     r"in_features=8\], got \(2, 7\)"):
    F.matmul_8bit(jnp.ones((2, 7)), q)
  with pytest.raises(ValueError, match=r"`bias` must have shape "
                     r"\(out_features,\)=\(4,\), got \(5,\)"):
    F.matmul_8bit(x, q, jnp.ones((5,)))
  with pytest.raises(TypeError, match="`weight.CB` must have dtype int8, got "
                     "int32"):
    F.matmul_8bit(x, F.Int8Params(q.CB.astype(jnp.int32), q.SCB))
  with pytest.raises(ValueError, match=r"`weight.SCB` must have shape \(4,\), "
                     r"got \(3,\)"):
    F.matmul_8bit(x, F.Int8Params(q.CB, q.SCB[:3]))
  fn = "matmul_8bit_fp16_weights"
  with pytest.raises(ValueError, match=fn + r": `weight` must be 2-D"):
    F.matmul_8bit_fp16_weights(x, jnp.ones((8,)))
  with pytest.raises(TypeError, match=fn + ": `weight` must have dtype"):
    F.matmul_8bit_fp16_weights(x, jnp.ones((4, 8), jnp.int8))
  with pytest.raises(ValueError, match=fn + ": `A` must have shape"):
    F.matmul_8bit_fp16_weights(x, jnp.ones((4, 9)))
  a8 = jnp.ones((2, 8), jnp.int8)
  with pytest.raises(TypeError, match="int8_linear_matmul: `A` must have "
                     "dtype int8, got float32"):
    F.int8_linear_matmul(x, a8)
  with pytest.raises(ValueError, match=r"int8_linear_matmul: `B` must be 2-D"):
    F.int8_linear_matmul(a8, a8[None])
  with pytest.raises(ValueError, match=r"`A` must have shape \[\.\.\., 9\]"):
    F.int8_linear_matmul(a8, jnp.ones((3, 9), jnp.int8))
  with pytest.raises(ValueError, match="int8_double_quant: `threshold` must "
                     "be >= 0"):
    F.int8_double_quant(x, threshold=-2.0)
  with pytest.raises(NotImplementedError, match="int8_vectorwise_quant_mask"):
    jax.jit(lambda a: F.int8_double_quant(a, threshold=1.0))(x)
  with pytest.raises(ValueError, match="quantize_int8_weight: `weight` must "
                     "be 2-D"):
    F.quantize_int8_weight(jnp.ones((3,)))


# --------------------------------------------------------------------------
# GPU (run with `pytest -m gpu` on one)
# --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_forward_matches_the_transcription(dtype):
  # cuBLAS int8 GEMM is exact; the epilogue is elementwise float32; the
  # outlier dot may use another summation order: _bnb_forward's bound.
  x, q, bias, _ = _inputs(dtype, lead=(32,), k=256, n=128)
  dev = jax.devices("gpu")[0]
  xj, bj, qj = jax.device_put((jnp.asarray(x), jnp.asarray(bias), q), dev)
  y = jax.jit(F.matmul_8bit, static_argnames="threshold")(xj, qj, bj,
                                                          threshold=6.0)
  # The activation codes the GPU made (near-tie flips checked there).
  codes = jax.jit(lambda a: F.int8_vectorwise_quant_mask(a, 6.0)[0])(
      xj.astype(jnp.float16))
  _assert_forward(np.asarray(y), x, q, bias, 6.0, "gpu", codes)


@pytest.mark.parametrize("n_out", [64, 65, 200])
def test_many_outlier_columns(n_out):
  """Up to 64 outlier columns are gathered, more go through the masked
  product over all of K: both are bnb's sum (the bound of the numpy
  transcription)."""
  rng = np.random.default_rng(n_out)
  k, n = 256, 24
  x = rng.standard_normal((5, k)).astype(np.float32)
  cols = rng.choice(k, n_out, replace=False)
  x[1, cols] = 7.0 + rng.random(n_out)
  x = jnp.asarray(x, jnp.bfloat16)
  q = F.quantize_int8_weight(jnp.asarray(rng.standard_normal((n, k)),
                                         jnp.float32))
  y = F.matmul_8bit(x, q, threshold=6.0)
  _assert_forward(y, np.asarray(x), q, None, 6.0, f"{n_out} outlier columns")
  y0 = F.matmul_8bit(x, q, threshold=0.0)
  assert not np.array_equal(np.asarray(y0), np.asarray(y))


def test_round_to_float16_is_numpys_float16():
  """The rounding that keeps bnb's float16 epilogue on the GPU (XLA may skip
  an f32 -> f16 -> bf16 round trip) equals numpy's float16 cast: normals,
  ties, subnormals (reduce_precision alone flushes them), overflow, signs."""
  from jaxbnb._src.quant import reference
  from pallas_kernels import int8_matmul as ik
  rng = np.random.default_rng(0)
  half = np.float32(2.0**-25)  # half of the smallest subnormal spacing
  x = np.concatenate([
      rng.standard_normal(4000).astype(np.float32) * 10.0 ** rng.integers(
          -9, 5, 4000),
      np.float32([0.0, -0.0, 65504, 65519.99, 65520, -70000, 6e-5, 6.1e-5,
                  2.0**-14, 2.0**-14 - 2.0**-25, 3 * half, 5 * half,
                  1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11)])])
  with np.errstate(over="ignore"):  # 70000 -> -inf on purpose
    want = x.astype(np.float16)
  got = np.asarray(reference.round_to_float16(jnp.asarray(x))).astype(
      np.float16)
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  got_k = np.asarray(ik.round_to_float16(jnp.asarray(x)))
  np.testing.assert_array_equal(got_k.view(np.uint16), want.view(np.uint16))


def test_near_tie_codes_allows_only_tie_flips():
  """The GPU test's code check: a code at an exact .5 tie may flip by one
  (XLA:GPU's division is not correctly rounded); any other may not."""
  xh = np.array([[1.1875, 0.5, -2.375]], np.float16)
  absmax = np.array([2.375], np.float32)
  q = np.array([[63, 27, -127]], np.int64)  # 1.1875 * 127 / 2.375 = 63.5
  _near_tie_codes(np.array([[64, 27, -127]]), q, xh, absmax)
  with pytest.raises(AssertionError, match="away from a rounding tie"):
    _near_tie_codes(np.array([[63, 26, -127]]), q, xh, absmax)
  with pytest.raises(AssertionError, match="more than one"):
    _near_tie_codes(np.array([[65, 27, -127]]), q, xh, absmax)


@pytest.mark.parametrize("x_dtype, bias_dtype", [
    ("bfloat16", "float32"), ("float16", "float32"), ("float16", "bfloat16"),
    ("float32", "float16"), ("bfloat16", "float16")])
def test_a_bias_of_another_dtype_is_taken_as_bnb_matmul_takes_it(
    x_dtype, bias_dtype):
  """`bnb.matmul` does not cast the bias: a float16 bias is fused in the
  epilogue, any other added to the float16 result (`Linear8bitLt` casts
  its bias to the input's dtype first)."""
  x, q, _, _ = _inputs(x_dtype, planted=False)
  rng = np.random.default_rng(3)
  # 1 + 2**-8 + 2**-12 sits past a bfloat16 tie: rounded to bfloat16 first
  # (the old cast) it gives 1 + 2**-7, through float16 1.0
  bias = (rng.choice([1 + 2.0**-8 + 2.0**-12, -3.3, 0.71], 24)
          + rng.standard_normal(24) * 1e-3 * (bias_dtype != "float32"))
  bias = bias.astype(np.float32).astype(DTYPES[bias_dtype])
  y = F.matmul_8bit(jnp.asarray(x), q, jnp.asarray(bias))
  _assert_forward(y, x, q, bias, 0.0)
  cast = bias.astype(DTYPES[x_dtype])
  if x_dtype == "bfloat16" and bias_dtype == "float32":
    assert not np.array_equal(
        np.asarray(y), np.asarray(F.matmul_8bit(jnp.asarray(x), q,
                                                jnp.asarray(cast))))
  # the layer casts first, as bitsandbytes' Linear8bitLt
  from jaxbnb._src.layers.linear8bit import forward_8bit  # pylint: disable=g-import-not-at-top
  _assert_forward(forward_8bit(jnp.asarray(x), q, jnp.asarray(bias), None,
                               0.0), x, q, cast, 0.0)
  g = jax.grad(lambda b: F.matmul_8bit(jnp.asarray(x), q, b).sum())(
      jnp.asarray(bias))
  assert g.dtype == jnp.dtype(bias_dtype)
