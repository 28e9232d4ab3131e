"""The quantized embeddings (8-bit, 4-bit), StableEmbedding and the swap.

References are independent of the code under test: the int8 row
quantization is written here in numpy from bitsandbytes' `kInt8VectorQuant`
(reference doc section 2.7); the 4-bit lookups are compared with
`jaxbnb.functional.dequantize_4bit` of the whole table (that function is
checked bit for bit against bitsandbytes' golden outputs), indexed after
dequantizing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbnb.optim
from jaxbnb import functional as F
from jaxbnb.models import LlamaConfig, LlamaForCausalLM
from jaxbnb.nnx import (Embedding4bit, Embedding8bit, EmbeddingFP4,
                        EmbeddingNF4, QuantizedWeight, StableEmbedding,
                        Embedding,
                        quantize_embeddings, stable_embedding_override)
from tests import helpers

F32_EPS = helpers.F32_EPS


def _table(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(
      dtype)


def _ids(num, shape=(3, 7), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, num)


def _np_int8_rows(w):
  """bitsandbytes' row-wise int8 (section 2.7) in numpy, float32 math.

  absmax_r = max_j |W[r, j]|; CB = rint(W * (127 / absmax_r)) (round half
  to even); dequantized W ~= CB * absmax_r / 127.
  """
  w = np.asarray(w, np.float32)
  absmax = np.abs(w).max(axis=1).astype(np.float32)
  scale = np.float32(127.0) / absmax
  cb = np.clip(np.rint(w * scale[:, None]), -128, 127).astype(np.int8)
  return cb, absmax


def _float_arrays_in(jaxpr, out=None):
  """Shapes of every floating array any equation (nested ones too) makes."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      aval = v.aval
      if hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating):
        out.append(tuple(aval.shape))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _float_arrays_in(sub.jaxpr, out)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _float_arrays_in(sub, out)
  return out


# ----------------------------------------------------------------- 8-bit


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding8bit_matches_numpy_row_quant(dtype):
  # 400 rows: about 4% of scales tell `SCB / 127` from `SCB * (1 / 127)`
  w = _table((400, 24), dtype)
  emb = Embedding8bit.from_float(w)
  # bitsandbytes' Int8Params quantizes the table cast to float16
  want_cb, want_scb = _np_int8_rows(
      np.asarray(w.astype(jnp.float16).astype(jnp.float32)))
  got = emb.weight.get_value()
  # The codes and scales are exact: same float32 ops, same rounding.
  np.testing.assert_array_equal(np.asarray(got.CB), want_cb)
  np.testing.assert_array_equal(np.asarray(got.SCB), want_scb)
  ids = jnp.concatenate([_ids(400, (1, 40)), jnp.arange(400)[None, :40],
                         jnp.arange(40, 400).reshape(9, 40)])
  out = emb(ids)
  assert out.shape == (11, 40, 24) and out.dtype == jnp.dtype(dtype)
  # bnb's `Embedding8bit.forward`: `CB * (SCB / 127.0)` in float32, then
  # one rounding to the table dtype: bit for bit.
  ref = (want_cb[np.asarray(ids)].astype(np.float32)
         * (want_scb[np.asarray(ids)] / np.float32(127.0))[..., None])
  helpers.assert_bits_equal(out, ref.astype(dtype), err_msg="Embedding8bit lookup")
  jitted = nnx.jit(lambda m, i: m(i))(emb, ids)
  helpers.assert_bits_equal(jitted, ref.astype(dtype), err_msg="jitted lookup")


def test_embedding8bit_quantizes_each_token_row_alone():
  w = np.array(_table((4, 32)))
  w[2] *= 1000.0  # a huge row must not change the other rows' codes
  a = Embedding8bit.from_float(jnp.asarray(w))
  b = Embedding8bit.from_float(jnp.asarray(w[[0, 1, 3]]))
  np.testing.assert_array_equal(np.asarray(a(jnp.array([0, 1, 3]))),
                                np.asarray(b(jnp.array([0, 1, 2]))))


def test_embedding8bit_memory_is_a_quarter_of_float32_plus_scales():
  num, dim = 1000, 64
  emb = Embedding8bit(num, dim, rngs=nnx.Rngs(0))
  w = emb.weight.get_value()
  assert w.nbytes == num * dim + 4 * num  # int8 rows + fp32 row absmax
  assert w.nbytes / (4 * num * dim) == pytest.approx(0.25 + 1 / dim)


def test_embedding8bit_attend_is_x_times_dequantized_table():
  emb = Embedding8bit.from_float(_table((40, 32)))
  cb, scb = _np_int8_rows(np.asarray(
      _table((40, 32)).astype(jnp.float16).astype(jnp.float32)))
  w64 = cb.astype(np.float64) * scb[:, None].astype(np.float64) / 127.0
  x = _table((5, 32), seed=3)
  got = emb.attend(x)
  assert got.shape == (5, 40) and got.dtype == jnp.float32
  # float32 accumulation of 32 products (K * eps * sum|x||w|), then two more
  # roundings for the `SCB / 127` column scale (weight_rel = 2 eps).
  exact, bound = helpers.matmul_bound(x, w64, jnp.float32,
                                      weight_rel=2 * F32_EPS)
  helpers.assert_within(got, exact, bound, "Embedding8bit.attend")


# ----------------------------------------------------------------- 4-bit

CASES_4BIT = [
    # (quant_type, blocksize, compress_statistics, quant_storage, dtype)
    ("nf4", 64, False, jnp.uint8, jnp.float32),
    ("fp4", 32, False, jnp.uint8, jnp.float32),
    # 300 * 64 / 32 = 600 absmax blocks: three nested 256-blocks.
    ("nf4", 32, True, jnp.uint8, jnp.float32),
    ("fp4", 64, True, jnp.bfloat16, jnp.bfloat16),
    ("nf4", 128, True, jnp.float32, jnp.float16),
]


@pytest.mark.parametrize("quant_type,blocksize,nested,storage,dtype",
                         CASES_4BIT)
def test_embedding4bit_rows_equal_full_dequantize_bit_for_bit(
    quant_type, blocksize, nested, storage, dtype):
  w = _table((300, 128), dtype)
  emb = Embedding4bit.from_float(w, quant_type=quant_type,
                                 blocksize=blocksize,
                                 compress_statistics=nested,
                                 quant_storage=storage)
  packed, qs = F.quantize_4bit(w, blocksize=blocksize,
                               compress_statistics=nested,
                               quant_type=quant_type, quant_storage=storage)
  stored = emb.weight.get_value()
  # Compare the packed bytes (a float quant_storage may hold NaN patterns).
  np.testing.assert_array_equal(np.asarray(stored.data).view(np.uint8),
                                np.asarray(packed).view(np.uint8))
  assert stored.quant_state.nested == nested
  full = np.asarray(F.dequantize_4bit(packed, qs))
  ids = jnp.array([[0, 299, 17], [256, 5, 5], [150, 1, 298]])
  out = emb(ids)
  assert out.dtype == jnp.dtype(dtype) and out.shape == (3, 3, 128)
  helpers.assert_bits_equal(out, full[np.asarray(ids)], err_msg="rows")


def test_embedding4bit_lookup_never_dequantizes_the_table():
  num, dim = 257, 64
  ids = jnp.array([3, 4])
  for emb in (Embedding4bit(num, dim, compress_statistics=True,
                            rngs=nnx.Rngs(0)),
              Embedding8bit(num, dim, rngs=nnx.Rngs(0))):
    shapes = _float_arrays_in(jax.make_jaxpr(emb)(ids).jaxpr)
    biggest = max(int(np.prod(s)) for s in shapes)
    # Only the 2 looked-up rows (and per-row statistics) are ever floats.
    assert biggest <= 2 * dim, (type(emb).__name__, shapes)


def test_embedding4bit_attend_uses_the_dequantized_table():
  w = _table((64, 64))
  emb = EmbeddingNF4.from_float(w, compress_statistics=True)
  full = F.dequantize_4bit(*F.quantize_4bit(w, quant_type="nf4",
                                            compress_statistics=True))
  x = _table((3, 64), seed=2)
  exact, bound = helpers.matmul_bound(x, full, jnp.float32)
  helpers.assert_within(emb.attend(x), exact, bound, "Embedding4bit.attend")
  # A 16-bit table still gives float32 logits (float32 accumulation).
  for cls in (EmbeddingNF4, Embedding8bit):
    half = cls.from_float(w.astype(jnp.bfloat16))
    assert half.attend(x).dtype == jnp.float32
    assert half(jnp.array([1])).dtype == jnp.bfloat16


def test_negative_ids_count_from_the_end():
  w = _table((10, 64))
  for emb in (Embedding8bit.from_float(w), Embedding4bit.from_float(w)):
    np.testing.assert_array_equal(np.asarray(emb(jnp.array([-1]))),
                                  np.asarray(emb(jnp.array([9]))))


def test_ids_outside_the_table_give_nan_as_jnp_take():
  # Ids below -num_embeddings, past the end, and unsigned ids past the
  # int32 range are out of range (NaN), never a wrapped real row; the
  # nested absmax gather of a double-quantized table included (its uint8
  # fill would decode to a finite scale).
  w = _table((100, 64))
  embs = (Embedding8bit.from_float(w), Embedding4bit.from_float(w),
          Embedding4bit.from_float(w, compress_statistics=True),
          StableEmbedding(100, 64, rngs=nnx.Rngs(0)))
  for emb in embs:
    name = type(emb).__name__
    for ids in (jnp.array([-101, -150, -200, 100, 101, 120]),
                jnp.array([2**32 - 1, 2**31], jnp.uint32)):
      out = np.asarray(emb(ids))
      assert np.isnan(out).all(), (name, ids)
    ok = np.asarray(emb(jnp.array([99, 5], jnp.uint32)))
    np.testing.assert_array_equal(ok, np.asarray(emb(jnp.array([-1, 5]))))
    assert not np.isnan(ok).any(), name
    small = np.asarray(emb(jnp.array([3, 99], jnp.uint8)))
    np.testing.assert_array_equal(small, np.asarray(emb(jnp.array([3, 99]))))


def test_quantize_embeddings_keeps_a_shared_embedding_shared():
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.enc = nnx.Embed(20, 64, rngs=rngs)
      self.dec = self.enc
      self.heads = nnx.List([self.enc])

  for bits in (8, 4):
    m = quantize_embeddings(Tied(nnx.Rngs(0)), bits=bits)
    assert isinstance(m.enc, Embedding8bit if bits == 8 else Embedding4bit)
    assert m.dec is m.enc and m.heads[0] is m.enc


def test_fixed_type_classes_and_defaults():
  assert EmbeddingNF4(8, 64, rngs=nnx.Rngs(0)).weight.get_value(
  ).quant_state.quant_type == "nf4"
  fp4 = EmbeddingFP4(8, 64, rngs=nnx.Rngs(0)).weight.get_value()
  # bitsandbytes' Embedding4bit defaults: fp4, blocksize 64, no double quant.
  qs = Embedding4bit(8, 64, rngs=nnx.Rngs(0)).weight.get_value().quant_state
  assert (qs.quant_type, qs.blocksize, qs.nested) == ("fp4", 64, False)
  assert fp4.quant_state.quant_type == "fp4"


@pytest.mark.parametrize("shape, blocksize, nested", [
    ((10, 96), 64, False), ((7, 33), 64, True), ((11, 32), 64, False),
    ((5, 100), 32, True)])
def test_embedding4bit_rows_that_are_not_whole_blocks(shape, blocksize,
                                                      nested):
  # bitsandbytes dequantizes the whole table then (with a warning)
  w = _table(shape)
  emb = Embedding4bit.from_float(w, quant_type="nf4", blocksize=blocksize,
                                 compress_statistics=nested)
  table = emb.weight.get_value().dequantize()
  ids = jnp.asarray([[0, shape[0] - 1, 2], [3, -1, 1]])
  want = jnp.take(table, ids % shape[0], axis=0)
  helpers.assert_bits_equal(emb(ids), want)
  helpers.assert_bits_equal(jax.jit(emb.__call__)(ids), want)
  assert np.isnan(np.asarray(emb(jnp.asarray([shape[0]])))).all()


def test_stable_embedding_norm_of_a_row_with_a_large_mean():
  # torch's LayerNorm takes the variance in two passes; E[x^2] - E[x]^2 in
  # float32 cancels on such a row (off by 4.3 for 300 +- 0.01)
  emb = StableEmbedding(4, 33, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  rows = (300 + 0.01 * rng.standard_normal((4, 33))).astype(np.float32)
  emb.weight[...] = jnp.asarray(rows)
  x = rows.astype(np.float64)
  mu = x.mean(-1, keepdims=True)
  ref = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
  got = np.asarray(emb(jnp.arange(4)), np.float64)
  # the rows' float32 rounding (ulp 3e-5 at 300) moves them by ~3e-3
  assert np.abs(got - ref).max() < 1e-2, np.abs(got - ref).max()


@pytest.mark.parametrize("cls", [StableEmbedding, Embedding])
@pytest.mark.parametrize("padding_idx", [3, -2])
def test_padding_row_starts_at_zero_and_gets_no_gradient(cls, padding_idx):
  """As bitsandbytes' (PyTorch's `padding_idx`); StableEmbedding checked
  against bitsandbytes 0.50.2 on the CPU in the thirty-ninth session
  (outputs to 5e-7, gradients to 1.2e-5)."""
  emb = cls(10, 8, padding_idx=padding_idx, rngs=nnx.Rngs(0))
  pad = padding_idx % 10
  assert emb.padding_idx == pad
  assert not np.asarray(emb.weight[...][pad]).any()
  emb.weight[...] = jnp.asarray(_table((10, 8)))  # a non-zero row too
  ids = jnp.array([[pad, 1, 8, pad], [0, 8, 2, 5]])

  def loss(m):
    return jnp.sum(m(ids) * jnp.arange(8.0))

  grad = np.asarray(nnx.grad(loss)(emb).weight[...])
  assert not grad[pad].any()
  assert all(grad[i].any() for i in {0, 1, 2, 5, 8} - {pad})
  plain = cls(10, 8, rngs=nnx.Rngs(0))
  plain.weight[...] = emb.weight[...]
  helpers.assert_bits_equal(emb(ids), plain(ids))  # the forward is the same
  grad_plain = np.asarray(nnx.grad(loss)(plain).weight[...])
  assert grad_plain[pad].any()
  np.testing.assert_array_equal(np.delete(grad, pad, 0),
                                np.delete(grad_plain, pad, 0))


def test_embedding_is_the_xavier_table_without_the_norm():
  emb = Embedding(300, 40, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  w = np.asarray(emb.weight[...])
  bound = np.sqrt(6 / (300 + 40))  # torch's xavier_uniform_
  assert w.dtype == np.float32 and np.abs(w).max() <= bound
  assert np.abs(w).max() > 0.95 * bound
  ids = jnp.array([[5, 299, 5], [0, 1, 2]])
  y = emb(ids)
  assert y.dtype == jnp.bfloat16
  helpers.assert_bits_equal(y, jnp.take(emb.weight[...], ids, axis=0)
                            .astype(jnp.bfloat16))
  stable = StableEmbedding(300, 40, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(stable.weight[...]), w)


# ------------------------------------------------------------- errors


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="`quant_type` must be 'nf4' or 'fp4'"):
    Embedding4bit(10, 64, quant_type="int4", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`quant_type` must be 'nf4'"):
    EmbeddingNF4(10, 64, quant_type="fp4", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`quant_type` must be 'fp4'"):
    EmbeddingFP4.from_float(_table((10, 64)), quant_type="nf4")
  with pytest.raises(ValueError, match="`ids` must be an integer array"):
    Embedding8bit(10, 8, rngs=nnx.Rngs(0))(jnp.ones((2,)))
  with pytest.raises(ValueError, match="`rngs` is required"):
    Embedding8bit(10, 8)
  with pytest.raises(ValueError, match="`num_embeddings` must be a positive"):
    Embedding8bit(0, 8, rngs=nnx.Rngs(0))
  for bad in (10, -11, 1.0, True):
    with pytest.raises(ValueError, match=r"`padding_idx` must be an int in "
                       r"\[-10, 10\) \(num_embeddings\), got"):
      StableEmbedding(10, 8, padding_idx=bad, rngs=nnx.Rngs(0))
  w8 = Embedding8bit(10, 8, rngs=nnx.Rngs(0)).weight.get_value()
  with pytest.raises(ValueError, match=r"\[num_embeddings, embedding_dim\]="
                     r"\[10, 16\], got \[10, 8\]"):
    Embedding8bit(10, 16, weight=w8)
  with pytest.raises(TypeError, match="must be a Params4bit"):
    Embedding4bit(10, 8, weight=w8)
  with pytest.raises(ValueError, match="`bits` must be 8 or 4, got 3"):
    quantize_embeddings(nnx.Embed(4, 64, rngs=nnx.Rngs(0)), bits=3)
  with pytest.raises(ValueError, match="has no embedding"):
    quantize_embeddings(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="bits=8 takes only `dtype`"):
    quantize_embeddings(nnx.Embed(4, 64, rngs=nnx.Rngs(0)), quant_type="nf4")
  for cls in (Embedding8bit, Embedding4bit, StableEmbedding):
    with pytest.raises(TypeError, match=f"{cls.__name__}: `dtype` must be a "
                       "dtype .* got 'xx'"):
      cls(10, 64, dtype="xx", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="`param_dtype` must be a dtype"):
      cls(10, 64, param_dtype="yy", rngs=nnx.Rngs(0))
    # numpy integer sizes are sizes (as nnx.Embed takes them).
    assert cls(np.int64(10), np.int32(64), rngs=nnx.Rngs(0))(
        jnp.array([1])).shape == (1, 64)
  for cls in (Embedding8bit, Embedding4bit):
    with pytest.raises(ValueError, match=r"from_float: `table` must be 2-D"):
      cls.from_float(jnp.ones((64,)))
    with pytest.raises(TypeError, match=r"from_float: `table` must have dtype "
                       "float32, float16 or bfloat16, got int32"):
      cls.from_float(jnp.ones((4, 64), jnp.int32))
    with pytest.raises(ValueError, match=r"attend: `query` must have shape "
                       r"\[..., embedding_dim=64\], got \(2, 7\)"):
      cls(10, 64, rngs=nnx.Rngs(0)).attend(jnp.ones((2, 7)))


# ---------------------------------------------------- jit and state


@pytest.mark.parametrize("cls", [Embedding8bit, Embedding4bit])
def test_jit_split_merge_and_state(cls):
  emb = cls(64, 64, rngs=nnx.Rngs(0))
  ids = _ids(64)
  eager = emb(ids)
  graphdef, state = nnx.split(emb)
  # The table is QuantizedWeight state, not a Param: frozen for optimizers.
  assert not jax.tree.leaves(nnx.state(emb, nnx.Param))
  assert jax.tree.leaves(nnx.state(emb, QuantizedWeight))

  @jax.jit
  def lookup(state, ids):
    return nnx.merge(graphdef, state)(ids)

  helpers.assert_bits_equal(lookup(state, ids), eager, err_msg="jit")
  helpers.assert_bits_equal(nnx.jit(lambda m, i: m(i))(emb, ids), eager,
                            err_msg="nnx.jit")
  # A pure-dict round trip (what orbax stores) rebuilds the same layer.
  abstract = nnx.eval_shape(lambda: cls(64, 64, rngs=nnx.Rngs(1)))
  gdef, astate = nnx.split(abstract)
  nnx.replace_by_pure_dict(astate, nnx.to_pure_dict(state))
  helpers.assert_bits_equal(nnx.merge(gdef, astate)(ids), eager,
                            err_msg="pure dict round trip")


# ------------------------------------------------------- StableEmbedding


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_stable_embedding_matches_xavier_and_layernorm(param_dtype):
  num, dim = 1000, 64
  emb = StableEmbedding(num, dim, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  w = np.asarray(emb.weight[...].astype(jnp.float32), np.float64)
  assert emb.weight[...].dtype == jnp.dtype(param_dtype)
  # torch.nn.init.xavier_uniform_: U(-b, b), b = sqrt(6 / (fan_in + fan_out)).
  # 64000 samples: the sample std of U(-b, b) is b / sqrt(3) within about
  # 0.3% (one sigma), so 3% can only fail for another distribution/scale.
  b = np.sqrt(6.0 / (num + dim))
  assert np.abs(w).max() <= b * (1 + 2 ** -7)  # bf16 rounding of the bound
  assert np.abs(w).max() > 0.99 * b
  assert w.std() == pytest.approx(b / np.sqrt(3), rel=0.03)
  assert abs(w.mean()) < 0.01 * b
  ids = _ids(num)
  out = emb(ids)
  assert out.dtype == jnp.dtype(param_dtype)
  # LayerNorm as torch.nn.LayerNorm(dim) in float32: biased variance, eps
  # 1e-5, scale 1, bias 0 (float64 here). Float32 mean/var/rsqrt add a few
  # eps relative per element: 64 * eps covers the two length-64 sums; for a
  # bf16 output one more bf16 ulp.
  rows = w[np.asarray(ids)]
  mu = rows.mean(-1, keepdims=True)
  var = ((rows - mu) ** 2).mean(-1, keepdims=True)
  ref = (rows - mu) / np.sqrt(var + 1e-5)
  bound = 64 * F32_EPS * np.abs(ref) + 64 * F32_EPS
  if param_dtype != jnp.float32:
    bound = bound + helpers.ulp(np.abs(ref) + bound, param_dtype)
  helpers.assert_within(out, ref, bound, "StableEmbedding")


class _Mixed(nnx.Module):

  def __init__(self):
    self.stable = StableEmbedding(1000, 16, rngs=nnx.Rngs(0))
    self.plain = Embedding(1000, 16, rngs=nnx.Rngs(3))
    self.embed = nnx.Embed(1000, 16, rngs=nnx.Rngs(1))
    self.layers = nnx.List([nnx.Linear(16, 512, rngs=nnx.Rngs(2))])

  def __call__(self, ids):
    return self.layers[0](self.stable(ids) + self.plain(ids)
                          + self.embed(ids))


def test_stable_embedding_optimizer_state_stays_32bit():
  model = _Mixed()
  tx = jaxbnb.optim.adamw8bit(1e-3, override=stable_embedding_override(model))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  s1, s2 = opt.opt_state.state1, opt.opt_state.state2
  for s in (s1, s2):
    # The StableEmbedding table (16000 >= min_8bit_size elements) is pinned
    # to float32 state, as bitsandbytes' GlobalOptimManager override does.
    stable = s["stable"]["weight"].get_value()
    assert isinstance(stable, jax.Array) and stable.dtype == jnp.float32
    assert stable.shape == (1000, 16)
    plain_table = s["plain"]["weight"].get_value()  # bnb's Embedding too
    assert isinstance(plain_table, jax.Array)
    assert plain_table.dtype == jnp.float32
    # The same-sized plain embedding and the linear keep 8-bit state.
    assert isinstance(s["embed"]["embedding"], jaxbnb.optim.Quantized8bit)
    assert isinstance(s["layers"][0]["kernel"], jaxbnb.optim.Quantized8bit)
  # Without the override the table would be 8-bit (the test can fail).
  plain = nnx.Optimizer(model, jaxbnb.optim.adamw8bit(1e-3), wrt=nnx.Param)
  assert isinstance(plain.opt_state.state1["stable"]["weight"],
                    jaxbnb.optim.Quantized8bit)
  # A training step runs and moves the table.
  ids = jnp.arange(8)
  before = np.asarray(model.stable.weight[...])
  grads = nnx.grad(lambda m: jnp.sum(m(ids) ** 2))(model)
  opt.update(model, grads)
  assert not np.array_equal(before, np.asarray(model.stable.weight[...]))


def test_stable_embedding_override_takes_plain_optax_state_paths():
  model = _Mixed()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = optax.chain(jaxbnb.optim.scale_by_adam8bit(
      override=stable_embedding_override(model)))
  state = tx.init(params)[0]
  assert state.state1["stable"]["weight"].dtype == jnp.float32
  assert isinstance(state.state1["embed"]["embedding"],
                    jaxbnb.optim.Quantized8bit)


# ---------------------------------------------------- quantize_embeddings


def _tiny_llama(tie):
  cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, initializer_range=0.3,
                    tie_word_embeddings=tie)
  return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def _rms(x):
  return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bits,kwargs", [(8, {}),
                                         (4, {"quant_type": "nf4"})])
def test_quantize_embeddings_on_a_tiny_llama(tie, bits, kwargs):
  ids = jnp.array([[1, 5, 7, 95, 0], [3, 3, 60, 2, 11]])
  model = _tiny_llama(tie)
  table = np.asarray(model.model.embed_tokens.weight[...])
  float_logits = np.asarray(model(ids)[0])
  quantize_embeddings(model, bits=bits, **kwargs)
  cls = Embedding8bit if bits == 8 else Embedding4bit
  assert isinstance(model.model.embed_tokens, cls)
  logits = np.asarray(model(ids)[0])
  assert logits.dtype == np.float32 and logits.shape == (2, 5, 96)

  # 1. Tight: the same model with its float table replaced by the
  # dequantized table. The lookup is bit-identical, so the hidden states
  # are too; the tied head (8-bit) scales after the matmul instead of
  # before: both are float32 products of K=64 terms, so they differ by at
  # most 2 * K * eps * sum|h||w| per logit (plus 2 eps for the scale).
  # (8-bit: the table its lookup reads, bnb's forward `CB * (SCB / 127)`,
  # which may differ by an ulp from `dequantize()`'s `CB * SCB / 127`.)
  emb = model.model.embed_tokens
  deq = np.asarray(emb(jnp.arange(96)) if bits == 8
                   else emb.weight.get_value().dequantize())
  ref_model = _tiny_llama(tie)
  ref_model.model.embed_tokens.weight[...] = jnp.asarray(deq)
  hidden = np.asarray(ref_model.model(ids)[0])
  ref_logits = np.asarray(ref_model(ids)[0])
  if tie:
    _, bound = helpers.matmul_bound(hidden.reshape(-1, 64), deq, jnp.float32,
                                    weight_rel=2 * F32_EPS)
    helpers.assert_within(logits.reshape(-1, 96), ref_logits.reshape(-1, 96),
                          bound, "tied head vs dequantized table")
  else:
    helpers.assert_bits_equal(logits, ref_logits, err_msg="untied")

  # 2. Loose: against the float model. How much a table error of this size
  # moves the logits depends on the random network (its gain), so the
  # tolerance is measured from the quantization error itself: the same
  # error values (deq - table) shuffled to random places, a perturbation
  # of exactly the same size and distribution. A correct quantization moves
  # the logits about as much (factor 2 for the spread between draws); a
  # wrong scale, row or block would move them far more.
  err = deq - table
  rng = np.random.default_rng(0)
  noise_rel = []
  for _ in range(2):
    noisy = _tiny_llama(tie)
    shuffled = rng.permutation(err.reshape(-1)).reshape(err.shape)
    noisy.model.embed_tokens.weight[...] = jnp.asarray(table + shuffled)
    noise_rel.append(_rms(noisy(ids)[0] - float_logits))
  logit_err = _rms(logits - float_logits)
  assert 0 < logit_err <= 2 * max(noise_rel), (logit_err, noise_rel)


def test_quantize_embeddings_keeps_other_modules_and_dtype():
  model = _tiny_llama(True)
  before = model.model.layers[0].mlp.up_proj
  quantize_embeddings(model, bits=4, blocksize=32)
  emb = model.model.embed_tokens
  assert model.model.layers[0].mlp.up_proj is before
  assert emb.dtype == jnp.float32
  assert emb.weight.get_value().quant_state.blocksize == 32
  names = [n for n, _ in model.iter_variables()]
  assert "model.embed_tokens.weight" in names
  assert model.num_parameters() == _tiny_llama(True).num_parameters()
  # An nnx.Embed on its own is returned quantized.
  e = quantize_embeddings(nnx.Embed(16, 64, dtype=jnp.bfloat16,
                                    rngs=nnx.Rngs(0)))
  assert isinstance(e, Embedding8bit) and e(jnp.array([1])).dtype == (
      jnp.bfloat16)


def test_quantize_embeddings_error_leaves_the_model_unchanged():
  model = _tiny_llama(True)
  with pytest.raises(ValueError, match="`blocksize` must be one of"):
    quantize_embeddings(model, bits=4, blocksize=100)
  assert isinstance(model.model.embed_tokens.weight, nnx.Param)


def test_quantized_llama_orbax_roundtrip(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  from jaxbnb import convert  # pylint: disable=g-import-not-at-top
  model = quantize_embeddings(_tiny_llama(True), bits=4,
                              compress_statistics=True)
  convert.save_checkpoint(model, tmp_path / "ckpt")
  # The float model cannot describe a quantized embedding: restore into a
  # model quantized the same way (abstractly, nothing is computed).
  like = nnx.eval_shape(lambda: quantize_embeddings(
      _tiny_llama(True), bits=4, compress_statistics=True))
  restored = convert.restore_checkpoint(tmp_path / "ckpt", like=like)
  a = jax.tree.leaves(nnx.state(model))
  b = jax.tree.leaves(nnx.state(restored))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ids = jnp.array([[1, 2, 3]])
  np.testing.assert_array_equal(np.asarray(restored(ids)[0]),
                                np.asarray(model(ids)[0]))
