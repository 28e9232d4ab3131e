"""LLM.int8 weights (`Int8Params`) and `matmul_int8` against bitsandbytes.

The golden values (tests/golden/bnb_8bit.npz, from make_golden.py) are
bitsandbytes 0.50.2 on CUDA: `int8_vectorwise_quant` of fp16 weights (what
`bnb.nn.Int8Params` stores as `CB`/`SCB`), `int8_linear_matmul` and the
`int8_mm_dequant` epilogue (what `Linear8bitLt`'s forward computes).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb import functional as F
from jaxbnb._src.quant import int8_frozen
from tests import helpers

G8 = helpers.load_golden("bnb_8bit.npz")


def _fp16(name):
  return jnp.asarray(G8[name])


# --------------------------------------------------------------------------
# Int8Params: from_float, state dict, errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["iv0", "iv4"])  # threshold-0 fixtures
def test_from_float_matches_bnb_int8params(name):
  # bnb.nn.Int8Params quantizes the fp16 weight with int8_vectorwise_quant
  # (threshold 0): CB is its int8 rows, SCB its float32 row absmax.
  assert float(G8[name + "/threshold"]) == 0.0
  w = _fp16(name + "/input")
  q = F.Int8Params.from_float(w)
  assert q.CB.dtype == jnp.int8 and q.CB.shape == w.shape
  assert q.SCB.dtype == jnp.float32 and q.SCB.shape == (w.shape[0],)
  assert q.dtype == "float16" and q.shape == w.shape
  np.testing.assert_array_equal(np.asarray(q.CB), G8[name + "/CA"])
  helpers.assert_bits_equal(q.SCB, G8[name + "/stats"], err_msg=name)
  # dequantize() is bnb's int8_vectorwise_dequant, in the weight's dtype.
  deq = q.dequantize()
  assert deq.dtype == jnp.float16
  helpers.assert_bits_equal(
      deq, G8[name + "/dequant"].astype(np.float16), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_from_float_keeps_dtype_and_rows(dtype):
  w = jax.random.normal(jax.random.key(0), (12, 40), jnp.float32).astype(
      dtype)
  q = F.Int8Params.from_float(w)
  assert q.dtype == jnp.dtype(dtype).name
  cb, scb, cols = F.int8_vectorwise_quant(w)
  assert cols is None
  np.testing.assert_array_equal(np.asarray(q.CB), np.asarray(cb))
  helpers.assert_bits_equal(q.SCB, scb)
  # Every row reaches +-127 at its absmax.
  assert np.all(np.abs(np.asarray(q.CB, np.int32)).max(1) == 127)
  assert q.dequantize().dtype == dtype


def test_from_float_errors():
  with pytest.raises(TypeError, match="unexpected arguments.*'threshold'"):
    F.Int8Params.from_float(jnp.ones((4, 8)), threshold=6.0)
  with pytest.raises(ValueError, match=r"2-D \[out, in\].*\(8,\)"):
    F.Int8Params.from_float(jnp.ones((8,)))
  with pytest.raises(TypeError, match="`A`"):
    F.Int8Params.from_float(jnp.ones((4, 8), jnp.int32))


def test_state_dict_is_bnb_linear8bitlt_format():
  q = F.Int8Params.from_float(_fp16("mm/W"))
  sd = q.state_dict("model.fc.")
  assert sorted(sd) == ["model.fc.SCB", "model.fc.weight",
                        "model.fc.weight_format"]
  assert all(isinstance(v, np.ndarray) for v in sd.values())
  assert sd["model.fc.weight"].dtype == np.int8
  assert sd["model.fc.weight"].shape == (24, 64)
  assert sd["model.fc.SCB"].dtype == np.float32
  assert sd["model.fc.SCB"].shape == (24,)
  # weight_format: a uint8 scalar, 0 = "row" (bnb's only layout since 0.45).
  assert sd["model.fc.weight_format"].dtype == np.uint8
  assert sd["model.fc.weight_format"].shape == ()
  assert int(sd["model.fc.weight_format"]) == 0
  np.testing.assert_array_equal(sd["model.fc.weight"], np.asarray(q.CB))
  helpers.assert_bits_equal(sd["model.fc.SCB"], q.SCB)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_state_dict_round_trip(dtype):
  w = jax.random.normal(jax.random.key(1), (16, 32)).astype(dtype)
  q = F.Int8Params.from_float(w)
  other = F.Int8Params.from_float(2 * w[:4])
  state = {**q.state_dict("a."), **other.state_dict("a.b.")}
  back = F.Int8Params.from_state_dict(state, "a.", dtype=dtype)
  assert back == q and back.dtype == dtype
  np.testing.assert_array_equal(np.asarray(back.CB), np.asarray(q.CB))
  helpers.assert_bits_equal(back.SCB, q.SCB)
  helpers.assert_bits_equal(back.dequantize(), q.dequantize())
  assert F.Int8Params.from_state_dict(state, "a.b.", dtype=dtype) == other
  # bnb stores no dtype: the default is Linear8bitLt's float16.
  assert F.Int8Params.from_state_dict(state, "a.").dtype == "float16"
  # weight_format is optional (older checkpoints omit it).
  del state["a.weight_format"]
  assert F.Int8Params.from_state_dict(state, "a.", dtype=dtype) == q


def test_from_state_dict_errors():
  state = F.Int8Params.from_float(jnp.ones((4, 8))).state_dict("fc.")
  for key in ("weight", "SCB"):
    broken = {k: v for k, v in state.items() if k != "fc." + key}
    with pytest.raises(ValueError, match=f"missing 'fc.{key}'"):
      F.Int8Params.from_state_dict(broken, "fc.")
  with pytest.raises(ValueError, match="missing 'fc2.weight'"):
    F.Int8Params.from_state_dict(state, "fc2.")
  for dtype in (np.uint8, np.int16, np.float16):
    wrong = {**state, "fc.weight": state["fc.weight"].astype(dtype)}
    with pytest.raises(ValueError, match="fc.weight must be int8, got "
                       + np.dtype(dtype).name):
      F.Int8Params.from_state_dict(wrong, "fc.")
  for fmt in (1, 2, 3):  # col32, col_turing, col_ampere (bnb <= 0.44)
    tiled = {**state, "fc.weight_format": np.asarray(fmt, np.uint8)}
    with pytest.raises(ValueError,
                       match=f"only weight_format 0 .* got {fmt}"):
      F.Int8Params.from_state_dict(tiled, "fc.")


# --------------------------------------------------------------------------
# matmul_int8: bnb's Linear8bitLt forward (threshold 0)
# --------------------------------------------------------------------------


def test_matmul_int8_matches_bnb():
  # A fp16 [8, 64] x W fp16 [24, 64]: bnb quantizes both row-wise, runs the
  # int8 GEMM (exact int32) and the fp16 epilogue. Same steps, same bits.
  a, w = _fp16("mm/A"), _fp16("mm/W")
  q = F.Int8Params.from_float(w)
  y = F.matmul_int8(a, q.CB, q.SCB)
  assert y.dtype == jnp.float16 and y.shape == (8, 24)
  helpers.assert_bits_equal(y, G8["mm/out"], err_msg="no bias")
  # The interface method is the same computation.
  helpers.assert_bits_equal(q.matmul(a), G8["mm/out"], err_msg="matmul()")
  # The int32 accumulator itself equals bnb's int8_linear_matmul.
  ca, sa, _ = F.int8_vectorwise_quant(a)
  acc = jax.lax.dot_general(ca, q.CB, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  np.testing.assert_array_equal(np.asarray(acc), G8["mm/acc"])
  # With the fp16 bias: bnb fuses it with fmaf, jaxbnb adds it after the
  # rounded product; identical unless within an fp32 ulp of an fp16 tie.
  yb = F.matmul_int8(a, q.CB, q.SCB, _fp16("mm/bias"))
  ref = G8["mm/out_bias"]
  same = helpers.bits(np.asarray(yb)) == helpers.bits(ref)
  diff = np.abs(np.asarray(yb, np.float64) - ref.astype(np.float64))
  assert np.all(same | (diff <= helpers.ulp(ref, np.float16))), diff.max()
  assert same.mean() >= 0.99, same.mean()


@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_int8_shapes_dtypes_and_bound(lead, dtype):
  w = jax.random.normal(jax.random.key(2), (20, 48)) / 7
  q = F.Int8Params.from_float(w)
  x = jax.random.normal(jax.random.key(3), (*lead, 48)).astype(dtype)
  bias = jax.random.normal(jax.random.key(4), (20,)).astype(dtype)
  y = F.matmul_int8(x, q.CB, q.SCB, bias)
  assert y.shape == (*lead, 20) and y.dtype == dtype
  # Error against x @ dequant(W).T + bias: x's row-wise int8 rounding (half
  # a step, absmax_row / 254, per element), the fp32 epilogue (3 roundings),
  # the fp16 rounding of bnb's epilogue, and the final cast to `dtype`.
  x2 = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, 48)
  wd = np.asarray(q.dequantize(), np.float64)
  exact = x2 @ wd.T + np.asarray(bias.astype(jnp.float32), np.float64)
  step = np.abs(x2).max(1, keepdims=True) / 254
  bound = (step * np.abs(wd).sum(1)[None, :]
           + 4 * helpers.F32_EPS * np.abs(x2) @ np.abs(wd).T
           + helpers.ulp(np.abs(exact) + 1e-2, np.float16))
  if dtype != jnp.float32:
    bound = bound + helpers.ulp(np.abs(exact) + bound, dtype)
  helpers.assert_within(np.asarray(y.astype(jnp.float32)).reshape(-1, 20),
                        exact, bound, "int8 matmul")
  # Not vacuous: dropping the bias would leave most elements out of bounds.
  b = np.abs(np.asarray(bias.astype(jnp.float32), np.float64))[None, :]
  assert (b > bound).mean() > 0.75, (b > bound).mean()


def test_matmul_int8_gradients_jit_and_vmap():
  w = jax.random.normal(jax.random.key(5), (16, 32))
  q = F.Int8Params.from_float(w)
  x = jax.random.normal(jax.random.key(6), (4, 3, 32))
  bias = jax.random.normal(jax.random.key(7), (16,))
  g = jax.random.normal(jax.random.key(8), (4, 3, 16))

  def loss(x, b):
    return jnp.sum(F.matmul_int8(x, q.CB, q.SCB, b) * g)

  dx, db = jax.grad(loss, argnums=(0, 1))(x, bias)
  # bnb's MatMul8bitLt backward: grad_A = grad_out @ (CB * (SCB * (1/127))),
  # the dequantized weight in float32 (the same dot: bit-identical).
  wd = (np.asarray(q.CB, np.float32)
        * (np.asarray(q.SCB, np.float32) * np.float32(1 / 127))[:, None])
  helpers.assert_bits_equal(
      dx, jnp.dot(g.reshape(-1, 16), wd,
                  precision=jax.lax.Precision.HIGHEST).reshape(x.shape))
  helpers.assert_within(db, np.asarray(g, np.float64).sum((0, 1)),
                        helpers.sum_bound(np.asarray(g).reshape(-1, 16), 0),
                        "dbias")
  # No gradient reaches the frozen int8 weight or its scales.
  gs = jax.grad(lambda s: loss(x, bias) + jnp.sum(
      F.matmul_int8(x, q.CB, s)), allow_int=True)(q.SCB)
  assert not np.any(np.asarray(gs))
  # jit and vmap run the same computation.
  y = F.matmul_int8(x, q.CB, q.SCB, bias)
  helpers.assert_bits_equal(jax.jit(F.matmul_int8)(x, q.CB, q.SCB, bias), y)
  y_v = jax.vmap(lambda xi: F.matmul_int8(xi, q.CB, q.SCB, bias))(x)
  helpers.assert_bits_equal(y_v, y)
  dx_j, db_j = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, bias)
  # Under jit XLA may fuse the dequantization into the dot and sum in
  # another order: the float32 reduction bound over N = 16.
  exact, bound = helpers.matmul_bound(np.asarray(g).reshape(-1, 16),
                                      np.asarray(wd).T, jnp.float32)
  helpers.assert_within(np.asarray(dx_j).reshape(-1, 32), exact, bound,
                        "jit dx")
  helpers.assert_within(db_j, np.asarray(g, np.float64).sum((0, 1)),
                        helpers.sum_bound(np.asarray(g).reshape(-1, 16), 0),
                        "jit dbias")


@pytest.mark.parametrize("m", [3, 40])  # the decode kernel, the int8 GEMM
def test_matmul_int8_goes_through_the_int8_kernels(m, monkeypatch):
  # matmul_int8 is matmul_8bit's frozen-weight product at threshold 0: the
  # same dispatch, so the LLM.int8 kernels serve it where they may (here in
  # interpret mode), with the reference's values bit for bit.
  q = F.Int8Params.from_float(jax.random.normal(jax.random.key(9), (64, 128)))
  x = jax.random.normal(jax.random.key(10), (m, 128), jnp.bfloat16)
  bias = jax.random.normal(jax.random.key(11), (64,), jnp.bfloat16)
  with jaxbnb.kernel_mode("reference"):
    y_ref = F.matmul_int8(x, q.CB, q.SCB, bias)
  served = []
  kernel_forward = int8_frozen._kernel_forward  # pylint: disable=protected-access

  def spy(*args):
    served.append(kernel_forward(*args))
    return served[-1]

  monkeypatch.setattr(int8_frozen, "_kernel_forward", spy)
  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_int8(x, q.CB, q.SCB, bias)
    assert served and all(s is not None for s in served)
    y_8bit = F.matmul_8bit(x, q, bias)
  helpers.assert_bits_equal(y, y_ref)
  helpers.assert_bits_equal(y, y_8bit)


def test_matmul_int8_errors():
  q = F.Int8Params.from_float(jnp.ones((4, 8)))
  with pytest.raises(TypeError, match="`A`"):
    F.matmul_int8(jnp.ones((2, 8), jnp.int32), q.CB, q.SCB)
  with pytest.raises(TypeError, match="`CB` must be a 2-D int8 array"):
    F.matmul_int8(jnp.ones((2, 8)), q.CB.astype(jnp.int32), q.SCB)
  with pytest.raises(TypeError, match="`CB` must be a 2-D int8 array"):
    F.matmul_int8(jnp.ones((2, 8)), q.CB.reshape(-1), q.SCB)
  with pytest.raises(ValueError, match=r"`A` must have shape \[\.\.\., 8\]"):
    F.matmul_int8(jnp.ones((2, 7)), q.CB, q.SCB)


def test_matmul_int8_scales_and_bias_must_match_the_rows():
  q = F.Int8Params.from_float(jnp.ones((16, 64)))
  x = jnp.ones((2, 64))
  with pytest.raises(ValueError, match=re.escape(
      "matmul_int8: `SCB` must have shape (N,)=(16,) (one row absmax per "
      "row of `CB` (16, 64)), got (3,).")):
    F.matmul_int8(x, q.CB, q.SCB[:3])
  with pytest.raises(ValueError, match=re.escape("`SCB` must have shape "
                                                 "(N,)=(16,)")):
    F.matmul_int8(x, q.CB, q.SCB[:, None])
  with pytest.raises(TypeError, match=re.escape(
      "matmul_int8: `SCB` must be a float32 array, got int32.")):
    F.matmul_int8(x, q.CB, q.SCB.astype(jnp.int32))
  with pytest.raises(ValueError, match=re.escape(
      "matmul_int8: `bias` must have shape (N,)=(16,), got (3,).")):
    F.matmul_int8(x, q.CB, q.SCB, bias=jnp.ones(3))
  with pytest.raises(ValueError, match=re.escape(
      "`bias` must have shape (N,)=(16,), got (16, 1).")):
    F.matmul_int8(x, q.CB, q.SCB, bias=jnp.ones((16, 1)))
  with pytest.raises(TypeError, match="`bias` must have dtype float32, "
                     "float16 or bfloat16, got int32"):
    F.matmul_int8(x, q.CB, q.SCB, bias=jnp.ones(16, jnp.int32))
  # The checked arguments still run, jitted too.
  y = F.matmul_int8(x, q.CB, q.SCB, bias=jnp.ones(16))
  helpers.assert_bits_equal(
      jax.jit(F.matmul_int8)(x, q.CB, q.SCB, jnp.ones(16)), y)


def test_int8_mm_dequant_adds_the_bias_after_rounding_under_jit():
  """The product is rounded to float32, then the bias added (two roundings,
  as bitsandbytes and the kernels' epilogue), also under `jax.jit`, where
  XLA would otherwise contract the two into one fused multiply-add."""
  rng = np.random.default_rng(0)
  m, n = 64, 256
  acc = jnp.asarray(rng.integers(-20000, 20000, (m, n)), jnp.int32)
  row = jnp.asarray(rng.uniform(0.5, 4, m), jnp.float32)
  col = jnp.asarray(rng.uniform(0.5, 4, n), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float16)
  prod = (np.asarray(acc, np.float32) * np.asarray(row)[:, None]
          * np.asarray(col)[None, :] * np.float32(6.200012e-05))
  want = (prod + np.asarray(bias, np.float32)).astype(np.float16)
  for fn in (F.int8_mm_dequant, jax.jit(F.int8_mm_dequant)):
    got = np.asarray(fn(acc, row, col, bias))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("bias_dtype", [jnp.float32, jnp.bfloat16])
def test_int8_mm_dequant_adds_a_non_float16_bias_to_the_float16_result(
    bias_dtype):
  """bitsandbytes' CUDA op fuses only a float16 bias; any other is added to
  the float16 result (`out.add_(bias)`): two float16 roundings."""
  rng = np.random.default_rng(1)
  m, n = 32, 128
  acc = jnp.asarray(rng.integers(-20000, 20000, (m, n)), jnp.int32)
  row = jnp.asarray(rng.uniform(0.5, 4, m), jnp.float32)
  col = jnp.asarray(rng.uniform(0.5, 4, n), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(n) * 100, bias_dtype)
  prod = (np.asarray(acc, np.float32) * np.asarray(row)[:, None]
          * np.asarray(col)[None, :] * np.float32(6.200012e-05))
  out16 = prod.astype(np.float16)
  want = (out16.astype(np.float32)
          + np.asarray(bias.astype(jnp.float32))).astype(np.float16)
  fused = (prod + np.asarray(bias.astype(jnp.float32))).astype(np.float16)
  assert (want != fused).any()  # the case tells the two apart
  for fn in (F.int8_mm_dequant, jax.jit(F.int8_mm_dequant)):
    got = np.asarray(fn(acc, row, col, bias))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("value, error, match", [
    ("6", TypeError, "`threshold` must be a float >= 0, got '6'"),
    (True, TypeError, "`threshold` must be a float >= 0, got True"),
    (None, TypeError, "`threshold` must be a float >= 0, got None"),
    (-1.0, ValueError, "`threshold` must be >= 0, got -1.0"),
])
def test_int8_vectorwise_quant_checks_the_threshold(value, error, match):
  x = jnp.ones((2, 8), jnp.float16)
  for fn in (F.int8_vectorwise_quant, F.int8_vectorwise_quant_mask):
    with pytest.raises(error, match="int8_vectorwise_quant: " + match):
      fn(x, value)
  with pytest.raises(TypeError, match="static Python float"):
    jax.jit(F.int8_vectorwise_quant_mask)(x, 6.0)


def test_int8_params_state_dict_formats():
  q = F.Int8Params.from_float(jnp.ones((3, 4)))
  sd = q.state_dict("l.")
  # bitsandbytes' own format name loads as 0 does
  assert F.Int8Params.from_state_dict({**sd, "l.weight_format": "row"},
                                      "l.") == q
  with pytest.raises(ValueError, match="only weight_format 'row' .* 'col32'"):
    F.Int8Params.from_state_dict({**sd, "l.weight_format": "col32"}, "l.")
  with pytest.raises(ValueError, match=r"`CB` must be int8 \[out, in\], got "
                     r"float32 \[3, 4\]"):
    F.Int8Params(jnp.ones((3, 4)), jnp.ones(3)).state_dict()
  with pytest.raises(ValueError, match=r"`SCB` must have shape \[3\]"):
    F.Int8Params(q.CB, jnp.ones(2)).state_dict()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bias_dtype", [None, jnp.float32, jnp.float16])
def test_matmul_int8_is_matmul_8bit_at_threshold_0(dtype, bias_dtype):
  # float32 inputs go through float16 first, as bnb.matmul casts them
  x = (jax.random.normal(jax.random.key(0), (6, 96)) * 3).astype(dtype)
  q = F.quantize_int8_weight(jax.random.normal(jax.random.key(1), (16, 96)))
  b = None if bias_dtype is None else jax.random.normal(
      jax.random.key(2), (16,)).astype(bias_dtype)
  with jaxbnb.kernel_mode("reference"):
    helpers.assert_bits_equal(F.matmul_int8(x, q.CB, q.SCB, b),
                              F.matmul_8bit(x, q, b))
    grads = [jax.grad(lambda x, f=f: f(x).astype(jnp.float32).sum())(x)
             for f in (lambda x: F.matmul_int8(x, q.CB, q.SCB, b),
                       lambda x: F.matmul_8bit(x, q, b))]
  helpers.assert_bits_equal(*grads)
