"""The quantized-weight interface: every format behaves the same way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import weights

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
  # The product equals x @ dequantized.T up to the format's own rounding of
  # x (none for 4-bit; int8 rows for LLM.int8: |err| <= sum|w| * absmax/254).
  ref = np.asarray(x, np.float64) @ np.asarray(deq, np.float64).T + np.arange(48)
  if q.format == "int8":
    bound = (np.abs(np.asarray(deq)).sum(1)[None, :]
             * np.abs(np.asarray(x)).max(1)[:, None] / 254 + 1e-3)
    assert np.all(np.abs(np.asarray(y) - ref) <= bound)
  else:
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=1e-4)
  # Gradients reach x and the bias, through the dequantized weight.
  gx, gb = jax.grad(lambda x, b: q.matmul(x, b).sum(), argnums=(0, 1))(x, bias)
  np.testing.assert_allclose(np.asarray(gx),
                             np.broadcast_to(np.asarray(deq).sum(0), x.shape),
                             rtol=1e-5, atol=1e-5)
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
