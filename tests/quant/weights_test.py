"""The quantized-weight interface: every format behaves the same way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import weights
from tests import helpers

FORMATS = [
    pytest.param(lambda w: F.Params4bit.from_float(
        w, quant_type="nf4", compress_statistics=True), id="nf4-dq"),
    pytest.param(lambda w: F.Params4bit.from_float(w, quant_type="fp4"),
                 id="fp4"),
    pytest.param(F.Int8Params.from_float, id="int8"),
]


def _weight(shape=(48, 256), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("make", FORMATS)
def test_interface(make):
  w = _weight()
  q = make(w)
  assert isinstance(q, F.QuantizedArray)
  assert q.shape == (48, 256) and q.dtype == "float32"
  assert q.nbytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(q))
  assert q.nbytes < w.size * 4 / 3  # at most 8 bits + statistics
  deq = q.dequantize()
  assert deq.shape == w.shape and deq.dtype == w.dtype
  x = jax.random.normal(jax.random.key(1), (5, 256), jnp.float32)
  bias = jnp.arange(48, dtype=jnp.float32)
  y = q.matmul(x, bias)
  assert y.shape == (5, 48) and y.dtype == jnp.float32
  # The product equals x @ dequantized.T up to the format's own rounding:
  # 4-bit: only the float32 accumulation (helpers.matmul_bound); LLM.int8:
  # also x's row-wise int8 rounding (half a step, absmax_row / 254, per
  # element), its fp32 epilogue and the float16 rounding of bnb's output.
  exact, bound = helpers.matmul_bound(x, deq, jnp.float32, bias=bias)
  if q.format == "int8":
    d = np.abs(np.asarray(deq, np.float64))
    xa = np.abs(np.asarray(x, np.float64))
    bound = (bound + xa.max(1)[:, None] / 254 * d.sum(1)[None, :]
             + 4 * helpers.F32_EPS * xa @ d.T
             + helpers.ulp(np.abs(exact) + 1e-2, np.float16))
  helpers.assert_within(y, exact, bound, q.format)
  # Gradients reach x and the bias, through the dequantized weight: dx is
  # ones @ W (a float32 column sum over 48 rows), dbias counts the rows.
  gx, gb = jax.grad(lambda x, b: q.matmul(x, b).sum(), argnums=(0, 1))(x, bias)
  d = np.asarray(deq)
  helpers.assert_within(gx, np.broadcast_to(d.astype(np.float64).sum(0),
                                            x.shape),
                        helpers.sum_bound(d, 0), "dx")
  np.testing.assert_array_equal(np.asarray(gb), np.full(48, 5.0))


@pytest.mark.parametrize("make", FORMATS)
def test_state_dict_and_layout_round_trip(make):
  q = make(_weight(seed=2))
  sd = q.state_dict("fc.")
  assert all(k.startswith("fc.") for k in sd)
  kw = {"dtype": q.dtype} if q.format == "int8" else {}  # bnb keeps no dtype
  back = type(q).from_state_dict(sd, "fc.", **kw)
  assert back == q
  np.testing.assert_array_equal(np.asarray(back.dequantize()),
                                np.asarray(q.dequantize()))
  layout = q.layout()
  abstract = weights.from_layout(layout)
  assert type(abstract) is type(q)
  assert jax.tree.structure(abstract) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(q)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_old_layout_without_format_is_4bit():
  q = F.Params4bit.from_float(_weight(), quant_type="nf4")
  layout = {k: v for k, v in q.layout().items() if k != "format"}
  assert isinstance(weights.from_layout(layout), F.Params4bit)


def test_unknown_layout_format_is_a_clear_error():
  with pytest.raises(ValueError, match="`format` must be one of"):
    weights.from_layout({"format": "int3"})


def test_equality_follows_bitsandbytes():
  w = _weight()
  a = F.Params4bit.from_float(w, quant_type="nf4")
  assert a == F.Params4bit.from_float(w, quant_type="nf4")
  assert a != F.Params4bit.from_float(w, quant_type="fp4")
  assert a != F.Params4bit.from_float(w + 1.0, quant_type="nf4")
  assert a != "nf4" and a != a.quant_state
  i = F.Int8Params.from_float(w)
  assert i == F.Int8Params.from_float(w) and i != a
  assert i != F.Int8Params.from_float(w * 2.0 + 0.5)


@pytest.mark.parametrize("storage", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_float_storage_compares_bytes_not_floats(storage):
  # NF4 codes 15, 15 pack to 0xFF: two such bytes read as a float16 or
  # bfloat16 NaN (four as a float32 NaN). The weight must equal itself.
  w = jnp.full((4, 64), -1.0).at[:, 1::2].set(1.0)  # bytes 0x0F
  w = w.at[0, 0:8].set(1.0)  # leading bytes 0xFF
  p = F.Params4bit.from_float(w, quant_type="nf4", quant_storage=storage)
  assert np.isnan(np.asarray(p.data, np.float32).reshape(-1)[0])
  assert p == p  # pylint: disable=comparison-with-itself
  assert p == F.Params4bit.from_float(w, quant_type="nf4",
                                      quant_storage=storage)
  assert p == F.Params4bit.from_state_dict(p.state_dict("fc."), "fc.")
  # Codes that read as +0.0 and -0.0 are different weights.
  raw = np.asarray(F.Params4bit.from_float(
      jnp.full((4, 64), -1.0).at[:, 1::2].set(1.0), quant_type="nf4",
      quant_storage=storage).data).copy()
  word = np.dtype(f"u{raw.dtype.itemsize}")
  pos, neg = raw.copy(), raw.copy()
  pos.view(word)[5] = 0
  neg.view(word)[5] = 1 << (8 * raw.dtype.itemsize - 1)  # the sign bit
  a = F.Params4bit(jnp.asarray(pos), p.quant_state)
  b = F.Params4bit(jnp.asarray(neg), p.quant_state)
  assert not np.array_equal(np.asarray(a.dequantize()),
                            np.asarray(b.dequantize()))
  assert a != b and b != a
  # The same bytes in another storage dtype are another weight.
  assert p != F.Params4bit.from_float(w, quant_type="nf4")


def test_int8_equality_with_nan_scales():
  w = _weight((8, 32))
  i = F.Int8Params.from_float(w)
  nan = F.Int8Params(i.CB, i.SCB.at[2].set(jnp.nan), i.dtype)
  assert nan == nan  # pylint: disable=comparison-with-itself
  assert nan == F.Int8Params(i.CB, i.SCB.at[2].set(jnp.nan), i.dtype)
  assert nan != i
  # bitsandbytes stores no dtype: a weight equals its checkpoint round trip
  # (which reads float16 unless told otherwise).
  assert F.Int8Params.from_state_dict(i.state_dict("fc."), "fc.") == i
