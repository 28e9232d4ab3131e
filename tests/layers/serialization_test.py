"""Flax's own serializer on layers with quantized weights: to_bytes /
from_bytes and to_state_dict / from_state_dict round-trip exactly."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax import serialization

from jaxbnb import functional as F
from jaxbnb import linen as jl
from jaxbnb import nnx as jn
from tests import helpers

_X = jax.random.normal(jax.random.key(9), (3, 64), jnp.float32)


_LINEN = [
    pytest.param(lambda: jl.Dense4bit(8), id="dense4bit-fp4-dq"),
    pytest.param(lambda: jl.DenseNF4(8, compress_statistics=False,
                                     quant_storage=jnp.bfloat16),
                 id="densenf4-bf16storage"),
    pytest.param(lambda: jl.Dense4bit(8, quant_type="nf4", blocksize=32,
                                      quant_storage=jnp.float16),
                 id="dense4bit-nf4-dq-fp16storage"),
    pytest.param(lambda: jl.Dense8bit(8, has_fp16_weights=False,
                                      threshold=6.0), id="dense8bit"),
]


@pytest.mark.parametrize("make", _LINEN)
def test_linen_to_bytes_from_bytes_round_trip(make):
  layer = make()
  variables = layer.init(jax.random.key(0), _X)
  template = layer.init(jax.random.key(1), _X)  # other values, same layout
  assert not jax.tree.all(jax.tree.map(
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
      variables, template))
  restored = serialization.from_bytes(template,
                                      serialization.to_bytes(variables))
  helpers.assert_trees_bitwise_equal(restored, variables)
  kernel = restored[jl.QUANTIZED]["kernel"]
  assert type(kernel) is type(variables[jl.QUANTIZED]["kernel"])
  assert kernel == variables[jl.QUANTIZED]["kernel"]
  np.testing.assert_array_equal(
      np.asarray(layer.apply(restored, _X)),
      np.asarray(layer.apply(variables, _X)))
  # to_state_dict / from_state_dict: the same round trip, without bytes.
  state = serialization.to_state_dict(variables)
  back = serialization.from_state_dict(template, state)
  helpers.assert_trees_bitwise_equal(back, variables)
  # An abstract target (jax.eval_shape of init) serves as well.
  abstract = jax.eval_shape(layer.init, jax.random.key(1), _X)
  assert isinstance(jax.tree.leaves(abstract)[0], jax.ShapeDtypeStruct)
  back = serialization.from_bytes(abstract, serialization.to_bytes(variables))
  helpers.assert_trees_bitwise_equal(back, variables)


def test_linen_model_with_4bit_and_8bit_layers_round_trips():

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = jl.DenseNF4(32, name="a")(x)
      return jl.Dense8bit(4, has_fp16_weights=False, name="b")(x)

  model = Model()
  variables = model.init(jax.random.key(0), _X)
  template = model.init(jax.random.key(1), _X)
  restored = serialization.from_bytes(template,
                                      serialization.to_bytes(variables))
  helpers.assert_trees_bitwise_equal(restored, variables)
  np.testing.assert_array_equal(np.asarray(model.apply(restored, _X)),
                                np.asarray(model.apply(variables, _X)))


_NNX = [
    pytest.param(lambda r: jn.LinearNF4(64, 8, rngs=r), id="linearnf4"),
    pytest.param(lambda r: jn.Linear4bit(64, 8, compress_statistics=False,
                                         quant_storage=jnp.float16, rngs=r),
                 id="linear4bit-fp4-fp16storage"),
    pytest.param(lambda r: jn.Linear8bitLt(64, 8, has_fp16_weights=False,
                                           rngs=r), id="linear8bitlt"),
]


@pytest.mark.parametrize("make", _NNX)
def test_nnx_pure_dict_round_trip(make):
  layer = make(nnx.Rngs(0))
  data = serialization.to_bytes(nnx.to_pure_dict(nnx.state(layer)))
  other = make(nnx.Rngs(1))
  assert not np.array_equal(np.asarray(other(_X)), np.asarray(layer(_X)))
  state = nnx.state(other)
  pure = serialization.from_bytes(nnx.to_pure_dict(state), data)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(other, state)
  assert other.weight.get_value() == layer.weight.get_value()
  helpers.assert_trees_bitwise_equal(nnx.state(other), nnx.state(layer))
  np.testing.assert_array_equal(np.asarray(other(_X)), np.asarray(layer(_X)))


def test_quant_state_alone_round_trips():
  for compress in (False, True):
    _, qs = F.quantize_4bit(_X, quant_type="nf4",
                            compress_statistics=compress)
    _, template = F.quantize_4bit(2 * _X, quant_type="nf4",
                                  compress_statistics=compress)
    back = serialization.from_bytes(template, serialization.to_bytes(qs))
    assert isinstance(back, F.QuantState) and back == qs
    helpers.assert_trees_bitwise_equal(back, qs)
  _, qs8 = F.quantize_blockwise(_X, blocksize=64)
  _, t8 = F.quantize_blockwise(3 * _X, blocksize=64)
  back = serialization.from_bytes(t8, serialization.to_bytes(qs8))
  assert back.quant_type is None and back == qs8


def _dense4bit_bytes(**kw):
  layer = jl.Dense4bit(8, **kw)
  return serialization.to_bytes(layer.init(jax.random.key(0), _X))


@pytest.mark.parametrize("saved,target,message", [
    (dict(quant_type="nf4"), dict(quant_type="fp4"),
     "restoring a QuantState at 'quantized/kernel/quant_state': "
     "`quant_type` is 'nf4' in the state dict, expected 'fp4' (the "
     "target's)."),
    (dict(blocksize=128), dict(blocksize=64),
     "`blocksize` is 128 in the state dict, expected 64"),
    (dict(compress_statistics=False), dict(),
     "restoring a QuantState at 'quantized/kernel/quant_state': `offset` is "
     "absent in the state dict, expected an array (as the target)."),
    (dict(), dict(compress_statistics=False),
     "`offset` is an array in the state dict, expected none (as the "
     "target)."),
    (dict(quant_storage=jnp.float16), dict(),
     "restoring a Params4bit at 'quantized/kernel': `data` is float16[128, 1]"
     " in the state dict, expected uint8[256, 1] (the target's)."),
])
def test_restoring_into_another_layout_is_an_error(saved, target, message):
  data = _dense4bit_bytes(**saved)
  template = jl.Dense4bit(8, **target).init(jax.random.key(1), _X)
  with pytest.raises(ValueError, match=re.escape(message)):
    serialization.from_bytes(template, data)


def test_restoring_a_float_checkpoint_into_a_quantized_target_is_an_error():
  # A float Dense's kernel where the target holds a 4-bit one.
  template = jl.Dense4bit(8).init(jax.random.key(1), _X)
  state = serialization.to_state_dict(template)
  state[jl.QUANTIZED]["kernel"] = np.ones((64, 8), np.float32)
  with pytest.raises(ValueError, match=re.escape(
      "restoring a Params4bit at 'quantized/kernel': expected its state "
      "dict (a dict with keys ['data', 'quant_state']), got ndarray.")):
    serialization.from_state_dict(template, state)
  state[jl.QUANTIZED]["kernel"] = {"data": np.ones(3)}
  with pytest.raises(ValueError, match=re.escape(
      "the state dict must have the keys ['data', 'quant_state'], got "
      "['data'].")):
    serialization.from_state_dict(template, state)


def test_int8_dtype_and_shape_mismatch_are_errors():
  layer = jl.Dense8bit(8, has_fp16_weights=False)
  variables = layer.init(jax.random.key(0), _X)
  template = jl.Dense8bit(16, has_fp16_weights=False).init(
      jax.random.key(1), _X)
  with pytest.raises(ValueError, match=re.escape(
      "restoring an Int8Params at 'quantized/kernel': `CB` is int8[8, 64] in "
      "the state dict, expected int8[16, 64] (the target's).")):
    serialization.from_bytes(template, serialization.to_bytes(variables))
  w = F.Int8Params.from_float(jnp.ones((4, 8)))
  other = F.Int8Params.from_float(jnp.ones((4, 8), jnp.bfloat16))
  with pytest.raises(ValueError, match=re.escape(
      "`dtype` is 'float32' in the state dict, expected 'bfloat16'")):
    serialization.from_bytes(other, serialization.to_bytes(w))
