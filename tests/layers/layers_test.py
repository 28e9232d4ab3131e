"""Flax 4-bit layers: linen Dense4bit, NNX Linear4bit, quantize_params."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxbnb import functional as F
from jaxbnb import linen as jl
from jaxbnb import nnx as jn
from tests import helpers


def _reference(x, w: F.Params4bit, bias, dtype):
  """bnb's dequantize + F.linear, as the same XLA ops matmul_4bit runs.

  The weight is dequantized straight to `dtype`, the `[M, K] x [N, K]`
  product (contracted on K) accumulates in float32 at HIGHEST precision and
  is rounded once: eagerly, the layer's output is bit-identical to this.
  """
  wd = F.dequantize_4bit(
      w.data, dataclasses.replace(w.quant_state, dtype=jnp.dtype(dtype).name))
  x2 = x.astype(dtype).reshape(-1, x.shape[-1])
  y = jax.lax.dot_general(x2, wd, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(dtype).astype(jnp.float32)
  return y.astype(dtype).reshape(*x.shape[:-1], wd.shape[0])


def _dense_chain(x, layers):
  """float64 evaluation of dense layers `(W [out, in], b, relu_after)` and a
  bound on how far a float32 evaluation of the same chain (any summation
  order) can be from it: each layer adds its own accumulation error
  (helpers.matmul_bound) and passes the incoming error on through |W|
  (relu is 1-Lipschitz).
  """
  h = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  err = np.zeros_like(h)
  for w, b, relu in layers:
    w = np.asarray(w, np.float64)
    exact, bound = helpers.matmul_bound(h, w, jnp.float32, bias=b)
    err = err @ np.abs(w).T + bound + helpers.F32_EPS * np.abs(exact)
    h = np.maximum(exact, 0.0) if relu else exact
  return h, err


def _moved(y4, y, bound):
  """Fraction of outputs the 4-bit weights moved by more than the bound."""
  return float((np.abs(np.asarray(y4, np.float64) - np.asarray(y)).reshape(
      bound.shape) > bound).mean())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
def test_linen_dense4bit_equals_dequant_dot(quant_type, compress):
  layer = jl.Dense4bit(48, quant_type=quant_type, compress_statistics=compress,
                       bias_init=nn.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(1), (5, 96))
  variables = layer.init(jax.random.key(0), x)
  w = variables[jl.QUANTIZED]["kernel"]
  assert w.quant_state.shape == (48, 96)
  assert w.quant_state.quant_type == quant_type
  assert w.quant_state.nested == compress
  assert "kernel" not in variables["params"]
  y = layer.apply(variables, x)
  ref = _reference(x, w, variables["params"]["bias"], jnp.float32)
  helpers.assert_bits_equal(y, ref, err_msg="Dense4bit")


def test_linen_matches_float_dense_within_quantization_error():
  x = jax.random.normal(jax.random.key(1), (8, 256))
  dense = nn.Dense(128)
  params = dense.init(jax.random.key(0), x)["params"]
  variables = jl.quantize_params(params, quant_type="nf4")
  y4 = jl.Dense4bit(128, quant_type="nf4").apply(variables, x)
  y = dense.apply({"params": params}, x)
  # The output error is x @ (W4 - W): for these random inputs its relative
  # size is the weights' own relative quantization error ||W4 - W|| / ||W||
  # (computed here independently), within sampling noise of 8 x 128 outputs.
  w = np.asarray(params["kernel"]).T
  w4 = np.asarray(variables[jl.QUANTIZED]["kernel"].dequantize())
  w_rel = np.linalg.norm(w4 - w) / np.linalg.norm(w)
  rel = float(jnp.linalg.norm(y4 - y) / jnp.linalg.norm(y))
  # NF4 blocksize 64 on a normal weight: bnb's table gives a relative error
  # near 0.1 (mean abs error 0.0728 / mean |w| 0.798).
  assert 0.07 < w_rel < 0.13, w_rel
  assert abs(rel / w_rel - 1) < 0.2, (rel, w_rel)


def test_linen_and_nnx_agree_exactly():
  x = jax.random.normal(jax.random.key(1), (3, 7, 64))
  linen = jl.Dense4bit(32, quant_type="nf4")
  variables = linen.init(jax.random.key(0), x)
  w = variables[jl.QUANTIZED]["kernel"]
  bias = variables["params"]["bias"]
  layer = jn.Linear4bit(64, 32, weight=w, bias=bias)
  np.testing.assert_array_equal(layer(x), linen.apply(variables, x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_linear4bit_dtype_and_reference(dtype):
  layer = jn.LinearNF4(64, 40, dtype=dtype, rngs=nnx.Rngs(0))
  w = layer.weight.get_value()
  assert w.quant_state.quant_type == "nf4"
  x = jax.random.normal(jax.random.key(2), (4, 64))
  y = layer(x)
  assert y.dtype == dtype
  ref = _reference(x, w, layer.bias[...], dtype)
  helpers.assert_bits_equal(y, ref, err_msg=str(dtype))


def test_nnx_fp4_default_and_bnb_defaults():
  layer = jn.Linear4bit(64, 16, rngs=nnx.Rngs(0))
  qs = layer.weight.get_value().quant_state
  assert (qs.quant_type, qs.blocksize, qs.nested) == ("fp4", 64, True)
  assert jn.LinearFP4(64, 16, rngs=nnx.Rngs(0)).weight.get_value(
  ).quant_state.quant_type == "fp4"


def test_quantized_weight_is_not_trainable():
  model = jn.Linear4bit(64, 16, rngs=nnx.Rngs(0))
  assert not issubclass(jn.QuantizedWeight, nnx.Param)
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params)
  assert len(leaves) == 1 and leaves[0].shape == (16,)  # the bias only
  x = jax.random.normal(jax.random.key(0), (2, 64))

  def loss(m):
    return jnp.sum(m(x) ** 2)

  grads = nnx.grad(loss)(model)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert len(jax.tree.leaves(grads)) == 1
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  before = model.weight.get_value().data.copy()
  opt.update(model, grads)
  np.testing.assert_array_equal(model.weight.get_value().data, before)


def test_layers_under_jit_vmap_grad():
  layer = jl.Dense4bit(16, quant_type="nf4")
  x = jax.random.normal(jax.random.key(0), (6, 32))
  variables = layer.init(jax.random.key(1), x)
  w = variables[jl.QUANTIZED]["kernel"]
  wd = np.asarray(F.dequantize_4bit(w.data, w.quant_state))
  bias = variables["params"]["bias"]
  # Under jit and vmap XLA may sum in another order: the float32 bound
  # against float64 (helpers.matmul_bound), per element.
  exact, bound = helpers.matmul_bound(x, wd, jnp.float32, bias=bias)
  helpers.assert_within(jax.jit(layer.apply)(variables, x), exact, bound,
                        "jit")
  helpers.assert_bits_equal(layer.apply(variables, x),
                            _reference(x, w, bias, jnp.float32))
  # vmap over a batch of inputs.
  xb = jnp.stack([x, 2 * x])
  yb = jax.vmap(lambda xi: layer.apply(variables, xi))(xb)
  exact2, bound2 = helpers.matmul_bound(2 * x, wd, jnp.float32, bias=bias)
  helpers.assert_within(yb[0], exact, bound, "vmap[0]")
  helpers.assert_within(yb[1], exact2, bound2, "vmap[1]")
  # Gradient w.r.t. the input equals ones @ W: a column sum over 16 rows.
  gx = jax.grad(lambda xi: jnp.sum(layer.apply(variables, xi)))(x)
  helpers.assert_within(gx, np.broadcast_to(wd.astype(np.float64).sum(0),
                                            gx.shape),
                        helpers.sum_bound(wd, 0), "dx")
  # Gradient w.r.t. params reaches only the bias: 6 ones summed, exactly.
  gp = jax.grad(lambda p: jnp.sum(layer.apply(
      {"params": p, jl.QUANTIZED: variables[jl.QUANTIZED]}, x)))(
          variables["params"])
  assert set(gp) == {"bias"}
  np.testing.assert_array_equal(gp["bias"], np.full((16,), 6.0, np.float32))


def test_dense4bit_drops_into_a_linen_model():
  class MLP(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
      x = nn.relu(self.dense(64, name="fc1")(x))
      return nn.Dense(10, name="lm_head")(x)

  x = jax.random.normal(jax.random.key(0), (4, 32))
  params = MLP().init(jax.random.key(1), x)["params"]
  variables = jl.quantize_params(params, quant_type="nf4")
  assert "kernel" in variables["params"]["lm_head"]  # skipped by default
  assert "kernel" not in variables["params"]["fc1"]
  y4 = MLP(dense=jl.DenseNF4).apply(variables, x)
  y = MLP().apply({"params": params}, x)
  assert y4.shape == y.shape
  # Exactly the float MLP with fc1's weight replaced by its dequantized
  # 4-bit weight (up to float32 summation order, propagated).
  fc1 = variables[jl.QUANTIZED]["fc1"]["kernel"]
  head = variables["params"]["lm_head"]
  exact, bound = _dense_chain(x, [
      (fc1.dequantize(), variables["params"]["fc1"]["bias"], True),
      (np.asarray(head["kernel"]).T, head["bias"], False)])
  helpers.assert_within(y4, exact, bound, "4-bit MLP")
  # ... and 4-bit really changed fc1: the float model would fail this check.
  assert _moved(y4, y, bound) > 0.9


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_params_nnx_keeps_a_shared_layer_shared(bits):
  # A layer held at two attributes (weights tied) is quantized once and
  # replaced at both: no float copy left behind, the tie kept.
  class Tied(nnx.Module):

    def __init__(self, rngs):
      self.a = nnx.Linear(64, 64, rngs=rngs)
      self.b = self.a
      self.more = nnx.Dict(c=self.a)

  model = jn.quantize_params(Tied(nnx.Rngs(0)), bits=bits)
  cls = jn.Linear4bit if bits == 4 else jn.Linear8bitLt
  assert isinstance(model.a, cls)
  assert model.b is model.a and model.more["c"] is model.a


def test_quantize_params_nnx_in_place_with_skip():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(100, 64, rngs=rngs)
      # Non-zero biases (Flax initializes them to zero), so a quantization
      # that loses or alters a bias is visible.
      bias_init = nnx.initializers.normal(0.5)
      self.blocks = nnx.List([nnx.Linear(64, 64, bias_init=bias_init,
                                         rngs=rngs) for _ in range(2)])
      self.lm_head = nnx.Linear(64, 100, bias_init=bias_init, rngs=rngs)

    def __call__(self, ids):
      h = self.embed(ids)
      for b in self.blocks:
        h = nnx.relu(b(h))
      return self.lm_head(h)

  model = Net(nnx.Rngs(0))
  ids = jnp.arange(8)
  y = model(ids)
  # The float layers before quantization: [out, in] weights and biases.
  floats = [(np.asarray(b.kernel[...]).T, np.asarray(b.bias[...]))
            for b in (*model.blocks, model.lm_head)]
  h = np.asarray(model.embed(ids))
  before = jn.memory_footprint(model)
  jn.quantize_params(model, quant_type="nf4", compress_statistics=True)
  assert isinstance(model.blocks[0], jn.Linear4bit)
  assert isinstance(model.blocks[1], jn.Linear4bit)
  assert isinstance(model.lm_head, nnx.Linear)  # skipped by default
  after = jn.memory_footprint(model)
  assert after < before
  # Each block holds exactly the NF4 quantization of its float weight ...
  want = [F.Params4bit.from_float(w, quant_type="nf4",
                                  compress_statistics=True)
          for w, _ in floats[:2]]
  for b, w4 in zip(model.blocks, want):
    assert b.weight.get_value() == w4
  y4 = model(ids)
  assert y4.shape == y.shape
  # ... and the quantized model computes the float model with each block's
  # weight replaced by its dequantized 4-bit weight, its own float bias
  # kept (float64 reference, float32 summation-order bound propagated
  # through the chain).
  exact, bound = _dense_chain(h, [
      (w4.dequantize(), b, True) for w4, (_, b) in zip(want, floats)
  ] + [(floats[2][0], floats[2][1], False)])
  helpers.assert_within(y4, exact, bound, "quantized model")
  # The float model would fail this check: quantization really happened.
  assert _moved(y4, y, bound) > 0.9
  jn.quantize_params(model, skip_modules=())
  assert isinstance(model.lm_head, jn.Linear4bit)
  # The head too now (its default quant_type: bnb's fp4).
  head4 = F.Params4bit.from_float(floats[2][0], quant_type="fp4",
                                  compress_statistics=True)
  assert model.lm_head.weight.get_value() == head4
  exact, bound = _dense_chain(h, [
      (w4.dequantize(), b, True) for w4, (_, b) in zip(want, floats)
  ] + [(head4.dequantize(), floats[2][1], False)])
  helpers.assert_within(model(ids), exact, bound, "head quantized too")


def test_memory_footprint_counts_bytes():
  w = jax.random.normal(jax.random.key(0), (1024, 1024))
  q = F.Params4bit.from_float(w, quant_type="nf4", compress_statistics=True)
  fp = jn.memory_footprint(w)
  q4 = jn.memory_footprint(q)
  assert fp == 4 * 1024 * 1024
  # packed nibbles + uint8 absmax per 64 + fp32 per 256 blocks + tables.
  expected = 512 * 1024 + 16384 + 4 * 64 + 4 + 16 * 4 + 256 * 4
  assert q4 == expected
  assert q4 / fp < 0.14


def test_layer_bad_input():
  with pytest.raises(ValueError, match="quant_type"):
    jn.Linear4bit(8, 8, quant_type="int4", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="blocksize"):
    jn.Linear4bit(8, 8, blocksize=48, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rngs"):
    jn.Linear4bit(8, 8)
  w = F.Params4bit.from_float(jnp.ones((8, 16)))
  with pytest.raises(ValueError, match="out_features, in_features"):
    jn.Linear4bit(8, 16, weight=w, use_bias=False)
  for layer in (jl.Dense4bit(0), jl.Dense4bit(-3), jl.Dense8bit(0),
                jl.Dense8bit(1.5)):
    with pytest.raises(ValueError, match=f"{type(layer).__name__}: "
                       "`features` must be a positive int, got"):
      layer.init(jax.random.key(0), jnp.ones((1, 16)))
  for cls in (jn.Linear4bit, jn.Linear8bitLt):
    with pytest.raises(ValueError, match=f"{cls.__name__}: `out_features` "
                       "must be a positive int, got 0"):
      cls(8, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`in_features` must be a positive"):
      cls(-1, 8, rngs=nnx.Rngs(0))
  layer = jl.Dense4bit(8, quant_type="nf5")
  with pytest.raises(ValueError, match="quant_type"):
    layer.init(jax.random.key(0), jnp.ones((1, 16)))
  ok = jl.Dense4bit(8)
  variables = ok.init(jax.random.key(0), jnp.ones((1, 16)))
  with pytest.raises(ValueError, match="in_features"):
    ok.apply(variables, jnp.ones((1, 8)))
  with pytest.raises(TypeError, match="quantize_params"):
    jl.quantize_params([1, 2, 3])


class _Block(nn.Module):
  """fc1 already 4-bit, fc2 a float Dense (or 4-bit when `dense4` is set)."""
  dense4: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(jl.DenseNF4(64, name="fc1")(x))
    dense = jl.DenseNF4 if self.dense4 else nn.Dense
    return dense(32, name="fc2")(x)


class _Mixed(nn.Module):
  dense4: bool = False

  @nn.compact
  def __call__(self, x):
    x = _Block(self.dense4, name="block")(x)
    return jl.DenseNF4(16, name="out")(x)


def test_quantize_params_merges_existing_quantized_collection():
  x = jax.random.normal(jax.random.key(0), (4, 32))
  variables = _Mixed().init(jax.random.key(1), x)
  old = variables[jl.QUANTIZED]
  assert set(old) == {"block", "out"} and set(old["block"]) == {"fc1"}
  assert "kernel" in variables["params"]["block"]["fc2"]
  out = jl.quantize_params(variables, quant_type="nf4")
  q = out[jl.QUANTIZED]
  assert set(q) == {"block", "out"}
  assert set(q["block"]) == {"fc1", "fc2"}  # merged, not replaced
  assert q["block"]["fc1"]["kernel"] is old["block"]["fc1"]["kernel"]
  assert q["out"]["kernel"] is old["out"]["kernel"]
  assert "kernel" not in out["params"]["block"]["fc2"]
  y4 = _Mixed(dense4=True).apply(out, x)
  y = _Mixed().apply(variables, x)
  assert y4.shape == y.shape == (4, 16)
  # Only fc2 changed: y4 is the original mixed model with fc2's weight
  # replaced by its dequantized 4-bit weight.
  p = out["params"]
  exact, bound = _dense_chain(x, [
      (q["block"]["fc1"]["kernel"].dequantize(), p["block"]["fc1"]["bias"],
       True),
      (q["block"]["fc2"]["kernel"].dequantize(), p["block"]["fc2"]["bias"],
       False),
      (q["out"]["kernel"].dequantize(), p["out"]["bias"], False)])
  helpers.assert_within(y4, exact, bound, "merged")
  assert _moved(y4, y, bound) > 0.9


def test_quantize_params_rejects_kernel_in_both_collections():
  x = jnp.ones((2, 32))
  variables = _Mixed().init(jax.random.key(1), x)
  params = dict(variables["params"])
  params["out"] = {**params["out"], "kernel": jnp.ones((64, 16))}
  with pytest.raises(ValueError, match="out/kernel"):
    jl.quantize_params({**variables, "params": params})


def test_fixed_type_nnx_layers_reject_conflicting_quant_type():
  linear = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  for cls, good, bad in ((jn.LinearNF4, "nf4", "fp4"),
                         (jn.LinearFP4, "fp4", "nf4")):
    msg = f"`quant_type`.*'{good}'.*'{bad}'"
    with pytest.raises(ValueError, match=msg):
      cls.from_linear(linear, quant_type=bad)
    with pytest.raises(ValueError, match=msg):
      cls(64, 32, quant_type=bad, rngs=nnx.Rngs(0))
    wrong = F.Params4bit.from_float(jnp.ones((32, 64)), quant_type=bad)
    with pytest.raises(ValueError, match=f"`weight`.*'{good}'.*'{bad}'"):
      cls(64, 32, weight=wrong, use_bias=False)
    for layer in (cls.from_linear(linear), cls.from_linear(
        linear, quant_type=good), cls(64, 32, quant_type=good,
                                      rngs=nnx.Rngs(0))):
      assert type(layer) is cls
      assert layer.weight.get_value().quant_state.quant_type == good


def test_fixed_type_linen_layers_reject_conflicting_quant_type():
  x = jnp.ones((2, 32))
  for cls, good, bad in ((jl.DenseNF4, "nf4", "fp4"),
                         (jl.DenseFP4, "fp4", "nf4")):
    with pytest.raises(ValueError, match=f"`quant_type`.*'{good}'.*'{bad}'"):
      cls(8, quant_type=bad).init(jax.random.key(0), x)
    variables = cls(8, quant_type=good).init(jax.random.key(0), x)
    assert variables[jl.QUANTIZED]["kernel"].quant_state.quant_type == good
    wrong = jl.Dense4bit(8, quant_type=bad).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=f"kernel.*'{good}'.*'{bad}'"):
      cls(8).apply(wrong, x)


def test_layers_reject_0d_inputs():
  layer = jn.Linear4bit(16, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"`inputs`.*\[\.\.\., in_features\]"):
    layer(jnp.float32(1.0))
  with pytest.raises(ValueError, match=r"`inputs`.*in_features.*16.*8"):
    layer(jnp.ones((2, 8)))
  dense = jl.Dense4bit(8)
  with pytest.raises(ValueError, match=r"`inputs`.*\[\.\.\., in_features\]"):
    dense.init(jax.random.key(0), jnp.float32(1.0))
  variables = dense.init(jax.random.key(0), jnp.ones((1, 16)))
  with pytest.raises(ValueError, match=r"`inputs`.*\[\.\.\., in_features\]"):
    dense.apply(variables, jnp.float32(1.0))


@pytest.mark.parametrize("cls", [jn.Linear4bit, jn.LinearNF4, jn.LinearFP4])
def test_linear4bit_quantizes_a_float_weight(cls):
  # A float [out, in] weight is quantized with the layer's settings, as
  # Linear8bitLt(has_fp16_weights=False) does with its float weight.
  w = jax.random.normal(jax.random.key(0), (8, 64), jnp.bfloat16)
  kw = dict(blocksize=32, compress_statistics=False,
            quant_storage=jnp.float16)
  if cls is jn.Linear4bit:
    kw["quant_type"] = "nf4"
  layer = cls(64, 8, weight=w, bias=jnp.arange(8.0), **kw)
  quant_type = {jn.LinearFP4: "fp4"}.get(cls, "nf4")
  expected = F.Params4bit.from_float(w, **{**kw, "quant_type": quant_type})
  assert layer.weight.get_value() == expected
  x = jax.random.normal(jax.random.key(1), (3, 64), jnp.float32)
  same = cls(64, 8, weight=expected, bias=jnp.arange(8.0))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(same(x)))


@pytest.mark.parametrize("cls", [jn.Linear4bit, jn.Linear8bitLt])
def test_quantized_linears_check_weight_and_bias_at_construction(cls):
  name = cls.__name__
  if cls is jn.Linear4bit:
    kw = {}
    wrong = F.Int8Params.from_float(jnp.ones((8, 64)))
    own, other = "Params4bit", "Int8Params"
  else:
    kw = dict(has_fp16_weights=False)
    wrong = F.Params4bit.from_float(jnp.ones((8, 64)))
    own, other = "Int8Params", "Params4bit"
  expected = ("must be a " if own == "Params4bit" else "must be an ") + own
  for weight, got in ((wrong, other),
                      (jnp.ones((8, 64), jnp.int32),
                       "an int32 array of shape [8, 64]"),
                      ([[1.0] * 64] * 8, "list")):
    with pytest.raises(TypeError, match=re.escape(
        f"{name}: `weight` {expected} or a float [out_features, "
        f"in_features]=[8, 64] array, got {got}.")):
      cls(64, 8, weight=weight, use_bias=False, **kw)
  with pytest.raises(ValueError, match=re.escape(
      f"{name}: `weight` must have shape [out_features, in_features]=[8, 64]"
      ", got [64, 8].")):
    cls(64, 8, weight=jnp.ones((64, 8)), use_bias=False, **kw)
  good = jnp.ones((8, 64))
  for bias in (jnp.zeros(5), jnp.zeros((8, 1)), jnp.zeros(())):
    with pytest.raises(ValueError, match=re.escape(
        f"{name}: `bias` must have shape (out_features,)=(8,), got "
        f"{tuple(bias.shape)}.")):
      cls(64, 8, weight=good, bias=bias, **kw)
  with pytest.raises(TypeError, match=re.escape(
      f"{name}: `bias` must be a float array of shape (out_features,)=(8,), "
      "got an int32 array of shape [8].")):
    cls(64, 8, weight=good, bias=jnp.zeros(8, jnp.int32), **kw)
  with pytest.raises(ValueError, match=re.escape(
      f"{name}: `bias` must be None with use_bias=False, got a float32 array "
      "of shape [8].")):
    cls(64, 8, weight=good, bias=jnp.zeros(8), use_bias=False, **kw)
  # Initialized layers (rngs) build their own bias: unchanged.
  layer = cls(64, 8, rngs=nnx.Rngs(0), **kw)
  assert layer(jnp.ones((2, 64))).shape == (2, 8)


def test_dense4bit_kernel_of_the_wrong_type():
  layer = jl.Dense4bit(8)
  variables = layer.init(jax.random.key(0), jnp.ones((1, 16)))
  variables = {**variables, jl.QUANTIZED: {"kernel": jnp.ones((8, 16))}}
  with pytest.raises(TypeError, match="Dense4bit: the quantized kernel must "
                     "be a Params4bit, got ArrayImpl"):
    layer.apply(variables, jnp.ones((1, 16)))


def test_quantize_params_refuses_jaxbnb_float_linears():
  """A LlamaForCausalLM built in float holds jaxbnb's own `Linear`s: they
  are not converted, so quantize_params says so instead of returning the
  float model unchanged (LoRA on it would look like QLoRA)."""
  from jaxbnb import models  # pylint: disable=g-import-not-at-top
  cfg = models.LlamaConfig(vocab_size=64, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
  model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  before = jax.tree.leaves(nnx.state(model))
  with pytest.raises(NotImplementedError,
                     match=r"jaxbnb float Linear layers \(e\.g\. 'model/"
                     r"layers/0/.*quantization=QuantizationConfig\.nf4\(\)"):
    jn.quantize_params(model, quant_type="nf4")
  after = jax.tree.leaves(nnx.state(model))
  assert all(a is b for a, b in zip(before, after))  # nothing changed
  assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
  # skipped everywhere: nothing to refuse, nothing converted
  jn.quantize_params(model, skip_modules=["*"])
  # a quantized Llama (lm_head is skipped by default) passes unchanged
  quantized = models.LlamaForCausalLM(
      cfg, quantization=models.QuantizationConfig.nf4(), rngs=nnx.Rngs(0))
  assert jn.quantize_params(quantized) is quantized


@pytest.mark.parametrize("make", [
    lambda: jn.Linear4bit(64, 32, rngs=nnx.Rngs(0)),
    lambda: jn.Linear4bit(64, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
    lambda: jn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0,
                            rngs=nnx.Rngs(0)),
    lambda: jn.Linear8bitLt(64, 32, rngs=nnx.Rngs(0))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_an_empty_batch_gives_an_empty_output(make, dtype):
  # as bitsandbytes' layers: [0, in] -> [0, out] in the dtype a row gets
  layer = make()
  one = layer(jnp.ones((1, 64), dtype))
  for shape in ((0, 64), (2, 0, 64)):
    y = layer(jnp.zeros(shape, dtype))
    assert y.shape == shape[:-1] + (32,) and y.dtype == one.dtype
  g = jax.grad(lambda x: layer(x).sum())(jnp.zeros((0, 64), dtype))
  assert g.shape == (0, 64)


@pytest.mark.parametrize("module", [jl.Dense4bit(features=32),
                                    jl.Dense8bit(features=32)])
def test_linen_empty_batch(module):
  variables = module.init(jax.random.key(0), jnp.ones((1, 64)))
  assert module.apply(variables, jnp.zeros((0, 64))).shape == (0, 32)
