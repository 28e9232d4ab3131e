"""Flax 4-bit layers: linen Dense4bit, NNX Linear4bit, quantize_params."""

from __future__ import annotations

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


def _reference(x, w: F.Params4bit, bias, dtype):
  wd = F.dequantize_4bit(w.data, w.quant_state).astype(dtype)
  y = jnp.dot(x.astype(dtype), wd.T, preferred_element_type=jnp.float32,
              precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype)


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
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_linen_matches_float_dense_within_quantization_error():
  x = jax.random.normal(jax.random.key(1), (8, 256))
  dense = nn.Dense(128)
  params = dense.init(jax.random.key(0), x)["params"]
  variables = jl.quantize_params(params, quant_type="nf4")
  y4 = jl.Dense4bit(128, quant_type="nf4").apply(variables, x)
  y = dense.apply({"params": params}, x)
  rel = jnp.linalg.norm(y4 - y) / jnp.linalg.norm(y)
  assert 0.01 < rel < 0.15, rel  # real 4-bit error, but not garbage


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
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(ref, np.float32), rtol=1e-6,
                             atol=1e-6)


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
  f = jax.jit(layer.apply)
  np.testing.assert_allclose(f(variables, x), layer.apply(variables, x),
                             rtol=1e-6)
  # vmap over a batch of inputs.
  xb = jnp.stack([x, 2 * x])
  yb = jax.vmap(lambda xi: layer.apply(variables, xi))(xb)
  np.testing.assert_allclose(yb[1], layer.apply(variables, 2 * x), rtol=1e-5,
                             atol=1e-5)
  # Gradient w.r.t. the input equals g @ W.
  w = variables[jl.QUANTIZED]["kernel"]
  gx = jax.grad(lambda xi: jnp.sum(layer.apply(variables, xi)))(x)
  wd = F.dequantize_4bit(w.data, w.quant_state)
  ref = jnp.dot(jnp.ones((6, 16)), wd, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(gx, ref, rtol=1e-5, atol=1e-5)
  # Gradient w.r.t. params reaches only the bias.
  gp = jax.grad(lambda p: jnp.sum(layer.apply(
      {"params": p, jl.QUANTIZED: variables[jl.QUANTIZED]}, x)))(
          variables["params"])
  np.testing.assert_allclose(gp["bias"], jnp.full((16,), 6.0), rtol=1e-6)


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
  assert float(jnp.abs(y4 - y).mean()) < 0.1 * float(jnp.abs(y).mean()) + 0.05


def test_quantize_params_nnx_in_place_with_skip():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(100, 64, rngs=rngs)
      self.blocks = nnx.List([nnx.Linear(64, 64, rngs=rngs) for _ in range(2)])
      self.lm_head = nnx.Linear(64, 100, rngs=rngs)

    def __call__(self, ids):
      h = self.embed(ids)
      for b in self.blocks:
        h = nnx.relu(b(h))
      return self.lm_head(h)

  model = Net(nnx.Rngs(0))
  ids = jnp.arange(8)
  y = model(ids)
  before = jn.memory_footprint(model)
  jn.quantize_params(model, quant_type="nf4", compress_statistics=True)
  assert isinstance(model.blocks[0], jn.Linear4bit)
  assert isinstance(model.blocks[1], jn.Linear4bit)
  assert isinstance(model.lm_head, nnx.Linear)  # skipped by default
  after = jn.memory_footprint(model)
  assert after < before
  y4 = model(ids)
  assert y4.shape == y.shape and bool(jnp.all(jnp.isfinite(y4)))
  jn.quantize_params(model, skip_modules=())
  assert isinstance(model.lm_head, jn.Linear4bit)


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
  assert float(jnp.abs(y4 - y).mean()) < 0.1 * float(jnp.abs(y).mean()) + 0.05


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
