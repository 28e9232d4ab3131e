"""pallas_kernels.int8_matmul (LLM.int8 decode forward) against bitsandbytes'
semantics, computed independently in numpy.

The golden value: the activations quantized by the reference quantizer
(`int8_vectorwise_quant`, the kernel's input), the int32 product in int64
numpy, the epilogue in numpy float32 (IEEE, never contracted into an FMA)
and, with outliers, the outlier stream `x_out @ w_deq.T` in float64 with
bitsandbytes' dequantized weight `((CB * SCB) * (1/127)).astype(dtype)`.

* Without outliers the kernel must be bit-exact (the int32 product is exact
  and the epilogue is the same sequence of float32 roundings).
* With outliers the reference and the kernel both add `n` terms (the
  outlier products and the fp16 int8 result) in float32, in different
  orders: each is within gamma_n * T of the exact sum (T = sum of the
  terms' magnitudes; 16-bit products are exact in float32, float32 products
  round once more, hence n + 1 terms), then rounds once to the dtype. So
  |y - exact| <= (n + 1) * eps32 * T + 1 ulp of the dtype (the bound is
  `(n + 1) * u` per sum doubled to eps for the tensor cores' truncating
  adds). A single wrong outlier product or a weight rounded differently is
  far outside it; a dropped outlier stream is checked separately.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxbnb
from jaxbnb import functional as F
from jaxbnb._src.quant import reference
from jaxbnb._src.tools import bench_int8
from pallas_kernels import int8_gemm as ig
from pallas_kernels import int8_matmul as ik
from tests import helpers

_NP = {jnp.dtype(jnp.float32): np.float32, jnp.dtype(jnp.float16): np.float16,
       jnp.dtype(jnp.bfloat16): ml_dtypes.bfloat16}


def _inputs(m, n, k, dtype, threshold, seed=0, outlier_cols=(3, 7, 100),
            bias_dtype=None):
  """x [m, k] with planted outliers (|x| >= threshold), an Int8Params, bias."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)).astype(np.float32)
  if threshold > 0:
    for j, c in enumerate(c for c in outlier_cols if c < k):
      r = j % m  # one row per column: bnb zeroes the whole column of CA
      x[r, c] = (threshold + 2.0 + 3 * j) * (-1) ** j
  w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
  weight = F.quantize_int8_weight(jnp.asarray(w))
  bias = None
  if bias_dtype is not None:
    bias = jnp.asarray(rng.standard_normal(n).astype(np.float32)).astype(
        bias_dtype)
  return jnp.asarray(x).astype(dtype), weight, bias


def _golden(x, cb, scb, bias, threshold, limbs=False):
  """(exact float64 result, bound, int8-only result) in numpy.

  With `limbs` (the "limbs" outlier stream: the activations as int8 digits
  of 2**-20 of their row absmax times the unrounded weight) the bound also
  holds the weight's rounding to the dtype, which bitsandbytes does and
  that stream skips (u_dtype per term), and the digits' rounding.
  """
  dtype = _NP[jnp.dtype(x.dtype)]
  ca, sca, mask = reference.int8_vectorwise_quant(
      jnp.asarray(x).astype(jnp.float16), threshold)
  # float64 BLAS is exact here (|acc| <= 128 * 128 * K < 2**53) and far
  # faster than numpy's int64 matmul at prefill sizes.
  assert 128 * 128 * ca.shape[1] < 2**31
  acc = np.asarray(ca, np.float64) @ np.asarray(cb, np.float64).T
  scb = np.asarray(scb, np.float32)
  out = acc.astype(np.float32) * np.asarray(sca, np.float32)[:, None]
  out = out * scb[None, :]
  out = out * np.float32(6.200012e-05)
  if bias is not None:
    b = np.asarray(bias.astype(jnp.float32))
    if bias.dtype == jnp.float16:
      out = (out + b).astype(np.float16)
    else:
      out = (out.astype(np.float16).astype(np.float32) + b).astype(np.float16)
  else:
    out = out.astype(np.float16)
  out = out.astype(dtype)
  if mask is None or not np.any(np.asarray(mask)):
    return out, None, out
  mask = np.asarray(mask)
  x_out = np.where(mask[None, :], np.asarray(x).astype(np.float64), 0.0)
  w = (np.asarray(cb).astype(np.float32) * scb[:, None]) * np.float32(
      7.874015718698502e-3)
  w = w.astype(dtype).astype(np.float64)
  o = out.astype(np.float64)
  exact = x_out @ w.T + o
  terms = np.abs(x_out) @ np.abs(w).T + np.abs(o)
  n_terms = int(mask.sum()) + 1
  bound = (n_terms + 1) * helpers.F32_EPS * terms
  if limbs:
    u = {np.float32: 2.0**-24, np.float16: 2.0**-11}.get(dtype, 2.0**-8)
    wx = np.abs(x_out) @ np.abs(w).T
    amax = np.abs(x_out).max(axis=1, keepdims=True)
    digits = 2.0**-20 * amax * (np.abs(w) @ mask.astype(np.float64))[None]
    bound = bound + 2 * u * wx + digits + 4 * helpers.F32_EPS * terms
  bound = bound + helpers.ulp(np.abs(exact) + bound, dtype)
  return exact, bound, out


def _limbs(config) -> bool:
  """Whether `config` (None: the default) runs the "limbs" stream."""
  return config is None or len(config) < 6 or config[5] == "limbs"


def _check(y, x, weight, bias, threshold, limbs=False):
  exact, bound, int8_only = _golden(x, weight.CB, weight.SCB, bias, threshold,
                                    limbs)
  assert y.dtype == x.dtype and y.shape == exact.shape
  if bound is None:
    helpers.assert_bits_equal(y, exact, err_msg="int8 matmul")
    return
  helpers.assert_within(y, exact, bound, "int8 matmul with outliers")
  # The outlier stream is really there: without it most outputs move.
  moved = np.abs(np.asarray(int8_only, np.float64) - exact) > bound
  assert moved.mean() > 0.5


def _call(x, weight, bias, threshold, config=None, interpret=True):
  ca, sca, mask = reference.int8_vectorwise_quant(
      x.astype(jnp.float16), threshold)
  x_out = None if mask is None else jnp.where(mask[None], x, 0)
  return ik.int8_matmul(ca, sca, weight.CB, weight.SCB, dtype=x.dtype,
                        bias=bias, x_outlier=x_out, outlier_cols=mask,
                        config=config, interpret=interpret)


CASES = [
    # (m, n, k, dtype, threshold, bias dtype, config)
    (1, 64, 256, jnp.bfloat16, 0.0, None, None),
    (1, 50, 256, jnp.bfloat16, 6.0, jnp.bfloat16, (16, 64, 1, 4, 3, "skip")),
    (3, 40, 200, jnp.float16, 6.0, jnp.float16, (16, 64, 1, 4, 3, "skip")),
    (3, 40, 200, jnp.float16, 0.0, jnp.float16, (16, 64, 1, 4, 3)),
    (16, 48, 300, jnp.float32, 6.0, jnp.float32, (16, 32, 2, 4, 3, "skip")),
    (5, 33, 128, jnp.bfloat16, 6.0, None, (32, 32, 2, 4, 3)),
    (5, 33, 128, jnp.bfloat16, 6.0, jnp.float16, (32, 32, 2, 4, 3, "always")),
    (2, 50, 256, jnp.float16, 6.0, None, (16, 64, 1, 4, 3, "always")),
    (16, 64, 512, jnp.float16, 0.0, jnp.float32, (32, 128, 1, 4, 3)),
    (2, 70, 96, jnp.bfloat16, 0.0, jnp.bfloat16, (16, 32, 4, 4, 3)),
    (1, 50, 256, jnp.bfloat16, 6.0, jnp.bfloat16, (16, 64, 1, 4, 3, "limbs")),
    (3, 40, 200, jnp.float16, 6.0, jnp.float16, (16, 64, 1, 4, 3, "limbs")),
    (6, 33, 300, jnp.bfloat16, 6.0, None, (32, 32, 2, 4, 3, "limbs")),
    (16, 48, 300, jnp.float32, 6.0, jnp.float32, (16, 32, 2, 4, 3, "limbs")),
    (9, 40, 128, jnp.float16, 0.0, None, (16, 64, 1, 4, 3, "limbs")),
    # M equal to the lanes per limb (4, 8, 16): the whole-tile epilogue.
    (4, 50, 256, jnp.bfloat16, 6.0, jnp.bfloat16, (16, 64, 1, 4, 3, "limbs")),
    (8, 40, 200, jnp.float16, 6.0, jnp.float16, (32, 64, 1, 4, 3, "limbs")),
    (16, 48, 300, jnp.bfloat16, 6.0, jnp.float32, (16, 32, 1, 4, 3, "limbs")),
    (16, 70, 256, jnp.float16, 6.0, None, (64, 64, 1, 4, 3, "limbs")),
    (16, 33, 160, jnp.float32, 0.0, jnp.float16, (32, 32, 1, 4, 3)),
    (16, 40, 200, jnp.bfloat16, 6.0, jnp.bfloat16, (16, 64, 1, 4, 3, "skip")),
]


@pytest.mark.parametrize("m,n,k,dtype,threshold,bias_dtype,config", CASES)
def test_interpret_matches_bnb_semantics(m, n, k, dtype, threshold,
                                         bias_dtype, config):
  x, weight, bias = _inputs(m, n, k, dtype, threshold, seed=m + n,
                            bias_dtype=bias_dtype)
  y = _call(x, weight, bias, threshold, config)
  _check(y, x, weight, bias, threshold, _limbs(config))


def test_interpret_threshold_without_outliers():
  """threshold > 0 but no |x| >= threshold: every K tile skips the stream."""
  x, weight, bias = _inputs(4, 40, 160, jnp.float16, 0.0, seed=3,
                            bias_dtype=jnp.float16)
  x = jnp.clip(x, -5.0, 5.0)
  y = _call(x, weight, bias, 6.0, (16, 32, 1, 4, 3, "skip"))
  _check(y, x, weight, bias, 6.0)
  with jaxbnb.kernel_mode("reference"):
    ref = F.matmul_8bit(x, weight, bias, threshold=6.0)
  helpers.assert_bits_equal(y, ref)


@pytest.mark.parametrize("cols,config", [
    ((), (16, 32, 1, 4, 3)),
    ((0,), (16, 64, 2, 4, 3)),
    ((5, 6, 300), (32, 64, 1, 4, 3)),
    (tuple(range(1, 500, 13)), (16, 32, 4, 4, 3)),  # 39 outlier columns
])
def test_interpret_limbs_mode(cols, config):
  """"limbs": the outlier activations as int8 digits in the int8 product's
  spare lanes, from none to 39 outlier columns. Without outlier columns it
  leaves the int8 result alone (bit-identical to "skip")."""
  x, weight, bias = _inputs(5, 40, 512, jnp.bfloat16, 6.0, seed=len(cols),
                            outlier_cols=cols, bias_dtype=jnp.bfloat16)
  if not cols:
    x = jnp.clip(x, -5.0, 5.0)
  y = _call(x, weight, bias, 6.0, (*config, "limbs"))
  _check(y, x, weight, bias, 6.0, limbs=True)
  if not cols:
    helpers.assert_bits_equal(y, _call(x, weight, bias, 6.0, (*config, "skip")))


def test_outlier_limbs_digits():
  """The digits are int8 in [-64, 64] and rebuild the activations: exactly
  for bfloat16 values within 2**12 of the row absmax; a non-finite row
  gets a NaN scale."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 300)).astype(np.float32)
  x *= 2.0 ** rng.integers(-11, 8, size=x.shape)
  x[1] = 0.0
  x[2, 7] = 1e30
  x = jnp.asarray(x).astype(jnp.bfloat16)
  x = x.at[3, 5].set(jnp.inf)
  (hi, mid, lo), scale = ik.outlier_limbs(x)
  for d in (hi, mid, lo):
    assert d.dtype == jnp.int8 and int(jnp.max(jnp.abs(d))) <= 64
  q = (np.asarray(hi, np.int64) * 2**14 + np.asarray(mid, np.int64) * 2**7
       + np.asarray(lo))
  back = q * np.asarray(scale, np.float64)[:, None]
  xf = np.asarray(x.astype(jnp.float32), np.float64)
  amax = np.abs(xf[:3]).max(axis=1, keepdims=True)
  near = np.abs(xf[:3]) >= amax * 2.0**-12
  np.testing.assert_array_equal(back[:3][near], xf[:3][near])
  assert np.all(np.abs(back[:3] - xf[:3]) <= 2.0**-20 * amax)
  assert np.all(back[1] == 0) and np.isnan(scale[3])


def test_bad_outlier_mode():
  x, weight, _ = _inputs(2, 32, 64, jnp.bfloat16, 6.0)
  with pytest.raises(ValueError, match=r"config\[5\].*'sideways'"):
    _call(x, weight, None, 6.0, (16, 32, 1, 4, 3, "sideways"))


def test_interpret_under_jit_and_vmap():
  x, weight, bias = _inputs(3, 40, 128, jnp.bfloat16, 6.0, seed=5,
                            bias_dtype=jnp.bfloat16)
  f = jax.jit(functools.partial(_call, threshold=6.0,
                                config=(16, 64, 1, 4, 3)))
  _check(f(x, weight, bias), x, weight, bias, 6.0, limbs=True)
  ys = jax.vmap(lambda xi: f(xi, weight, bias))(jnp.stack([x, -x]))
  _check(ys[1], -x, weight, bias, 6.0, limbs=True)


def test_can_use_and_config():
  assert ik.can_use(1, 14336, 4096, jnp.bfloat16)
  assert ik.can_use(16, 14336, 4096, jnp.float16)
  assert not ik.can_use(17, 14336, 4096, jnp.bfloat16)
  assert not ik.can_use(0, 14336, 4096, jnp.bfloat16)
  assert not ik.can_use(1, 14336, 2**17, jnp.bfloat16)   # int32 range
  assert not ik.can_use(1, 64, 64, jnp.int32)
  block_n, block_k, split_k, _, _, outliers = ik.default_config(
      1, 14336, 4096)
  assert (block_n, block_k, split_k, outliers) == (64, 256, 1, "limbs")
  assert ik.default_config(1, 4096, 4096)[2] > 1        # fills the SMs
  assert ik.default_config(1, 8, 40)[1] == 32


# ---------------------------------------------------------------------------
# dispatch from jaxbnb.functional.matmul_8bit
# ---------------------------------------------------------------------------


def _spy(monkeypatch, module=ik, name="int8_matmul",
         record=lambda kwargs: kwargs.get("interpret")):
  """Records `record(kwargs)` for each call of `module.name`."""
  calls = []
  original = getattr(module, name)

  def spy(*args, **kwargs):
    calls.append(record(kwargs))
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, spy)
  return calls


def spy_gemm(monkeypatch):
  """Calls of `int8_gemm`: (interpret, outlier activations given)."""
  return _spy(monkeypatch, ig, "int8_gemm", lambda kwargs: (
      kwargs.get("interpret"), kwargs.get("x") is not None))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("m,dtype,kernel", [
    (6, jnp.bfloat16, "decode"), (40, jnp.float16, "gemm")])
def test_matmul_8bit_dispatches_in_interpret_mode(monkeypatch, threshold, m,
                                                  dtype, kernel):
  if kernel == "decode":
    calls, want = _spy(monkeypatch), [True]
  else:
    calls, want = spy_gemm(monkeypatch), [(True, threshold > 0)]
  x, weight, bias = _inputs(m, 48, 192, dtype, threshold, seed=9,
                            bias_dtype=dtype)
  x3 = x.reshape(2, m // 2, 192)
  with jaxbnb.kernel_mode("interpret"):
    y = jax.jit(lambda a: F.matmul_8bit(a, weight, bias,
                                        threshold=threshold))(x3)
  assert calls == want
  with jaxbnb.kernel_mode("reference"):
    ref = F.matmul_8bit(x3, weight, bias, threshold=threshold)
  assert len(calls) == 1
  assert y.shape == ref.shape == (2, m // 2, 48)
  _check(y.reshape(m, 48), x, weight, bias, threshold,
         limbs=kernel == "decode")
  if threshold == 0.0:
    helpers.assert_bits_equal(y, ref)
  else:
    _, bound, _ = _golden(x, weight.CB, weight.SCB, bias, threshold,
                          limbs=kernel == "decode")
    helpers.assert_within(y.reshape(m, 48), np.asarray(
        ref.reshape(m, 48).astype(jnp.float32), np.float64), 2 * bound)


def test_matmul_8bit_large_m_and_reference_mode_skip_kernel(monkeypatch):
  calls = _spy(monkeypatch)
  x, weight, _ = _inputs(17, 32, 64, jnp.float16, 6.0, seed=1)
  with jaxbnb.kernel_mode("pallas"):  # M > 16 is int8_gemm's
    jax.eval_shape(lambda a: F.matmul_8bit(a, weight, threshold=6.0), x)
  with jaxbnb.kernel_mode("reference"):
    F.matmul_8bit(x[:2], weight, threshold=6.0)
  assert not calls


@pytest.mark.parametrize("m", [2, 24])  # the decode kernel, int8_gemm
def test_matmul_8bit_grad_in_interpret_mode(m):
  x, weight, bias = _inputs(m, 32, 96, jnp.float32, 6.0, seed=4,
                            bias_dtype=jnp.float32)

  def loss(a, b):
    return jnp.sum(F.matmul_8bit(a, weight, b, threshold=6.0) ** 2)

  with jaxbnb.kernel_mode("interpret"):
    gx, gb = jax.grad(loss, argnums=(0, 1))(x, bias)
  with jaxbnb.kernel_mode("reference"):
    rx, rb = jax.grad(loss, argnums=(0, 1))(x, bias)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gb, rb, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# lowering to Triton for CUDA on the CPU (Pallas-level errors only)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("m", [3, 4, 16])  # 4, 16: whole-tile epilogue
def test_lowers_for_cuda(m):
  s = jax.ShapeDtypeStruct
  n, k = 1000, 4096 + 96
  args = (s((m, k), jnp.int8), s((m,), jnp.float32), s((n, k), jnp.int8),
          s((n,), jnp.float32))
  kw = dict(bias=s((n,), jnp.float16), x_outlier=s((m, k), jnp.float16),
            outlier_cols=s((k,), jnp.bool_))
  for config in (None, (64, 256, 2, 4, 3), (64, 256, 1, 4, 3, "always"),
                 (64, 256, 1, 4, 3, "limbs"),
                 (64, 256, 2, 4, 3, "limbs")):
    text = helpers.lowered_for_h200(functools.partial(
        ik.int8_matmul, dtype=jnp.float16, config=config), *args, **kw)
    assert "jaxbnb_int8_matmul" in text


# ---------------------------------------------------------------------------
# compiled on the GPU
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 4096 + 96)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_gpu_matches_bnb_semantics(m, n, k, dtype, threshold):
  x, weight, bias = _inputs(m, n, k, dtype, threshold, seed=m,
                            outlier_cols=(3, 700, 701, 2048, 4000),
                            bias_dtype=dtype)
  y = _call(x, weight, bias, threshold, interpret=False)
  _check(y, x, weight, bias, threshold, limbs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(32, 512, 1, 4, 4), (64, 256, 2, 4, 3),
                                    (16, 256, 4, 4, 3), (128, 128, 1, 8, 3),
                                    (64, 256, 1, 4, 3, "always"),
                                    (64, 256, 1, 4, 3, "limbs"),
                                    (64, 256, 2, 4, 3, "limbs")])
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_configs(config, m):
  x, weight, bias = _inputs(m, 1000, 4096, jnp.bfloat16, 6.0, seed=2,
                            outlier_cols=(3, 700, 701, 2048, 4000),
                            bias_dtype=jnp.float16)
  y = _call(x, weight, bias, 6.0, config=config, interpret=False)
  _check(y, x, weight, bias, 6.0, _limbs(config))


@pytest.mark.gpu
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_gpu_matmul_8bit_dispatch(monkeypatch, threshold):
  calls = _spy(monkeypatch)
  x, weight, bias = _inputs(4, 4096, 4096, jnp.bfloat16, threshold, seed=7,
                            outlier_cols=(3, 700, 701, 2048, 4000),
                            bias_dtype=jnp.bfloat16)
  with jaxbnb.kernel_mode("pallas"):
    y = jax.jit(lambda a: F.matmul_8bit(a, weight, bias,
                                        threshold=threshold))(x)
  assert calls == [False]
  _check(y, x, weight, bias, threshold, limbs=True)



def test_bench_int8_quick(tmp_path, capsys):
  parser = argparse.ArgumentParser()
  bench_int8.add_parsers(parser.add_subparsers())
  out = tmp_path / "int8.json"
  opts = parser.parse_args(["int8", "--quick", "--m", "2", "--n", "64",
                            "--k", "128", "--reps", "1", "--out", str(out)])
  with jaxbnb.kernel_mode("reference"):
    assert opts.func(opts) == 0
  text = capsys.readouterr().out
  assert "| 64x128 | 2 | 6 | 5 |" in text
  doc = json.loads(out.read_text())
  assert doc["meta"]["benchmark"] == "int8" and len(doc["results"]) == 2
  assert all(r["us"]["jaxbnb"] for r in doc["results"])
  assert len(bench_int8.sweep_configs()) == 48  # 24 tiles, skip or always
  assert len(bench_int8.gemm_sweep_configs()) == 12
  assert bench_int8.parse_configs("64,256,1,4,3,skip; 128,128,128,8,4,3") == [
      (64, 256, 1, 4, 3, "skip"), (128, 128, 128, 8, 4, 3)]
  for bad, match in (("1,2", "5 or 6"), ("64,256,1,4,x,skip", "integers"),
                     ("64,256,1,4,3,sideways", "outlier mode")):
    with pytest.raises(ValueError, match=match):
      bench_int8.parse_configs(bad)
