"""LLM.int8 layers: NNX `Linear8bitLt`, linen `Dense8bit`, the factory's
`load_in_8bit` branch, `quantize_params(bits=8)`, `memory_footprint` and
LoRA over an 8-bit base.

The layer numerics are `matmul_8bit`'s (tested against bitsandbytes and a
numpy transcription in tests/quant/int8_matmul_test.py); here each layer is
checked to compute exactly that function of its weight and bias.
"""

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
from jaxbnb import lora
from jaxbnb import nnx as jn
from jaxbnb._src.layers import lora as lora_lib
from jaxbnb.models import QuantizationConfig
from tests import helpers


def _x(shape=(2, 3, 64), dtype=jnp.float32, seed=1):
  x = jax.random.normal(jax.random.key(seed), shape)
  return x.at[..., 5].multiply(10.0).astype(dtype)  # |x| up to ~30: outliers


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_frozen_layer_is_matmul_8bit(threshold, dtype):
  layer = jn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=threshold,
                          bias_init=nnx.initializers.normal(1.0),
                          rngs=nnx.Rngs(0))
  q = layer.weight.get_value()
  assert isinstance(layer.weight, jn.QuantizedWeight)
  assert isinstance(q, F.Int8Params) and q.shape == (32, 64)
  assert q.CB.dtype == jnp.int8 and q.SCB.dtype == jnp.float32
  x = _x(dtype=dtype)
  y = layer(x)
  # bnb: the output has the input's dtype (dtype=None) and the bias is cast
  # to it; nothing else happens around matmul_8bit.
  assert y.dtype == dtype and y.shape == (2, 3, 32)
  helpers.assert_bits_equal(
      y, F.matmul_8bit(x, q, layer.bias[...].astype(dtype),
                       threshold=threshold))
  # dtype= casts the input first and returns that dtype.
  layer.dtype = jnp.bfloat16
  yb = layer(x)
  assert yb.dtype == jnp.bfloat16
  helpers.assert_bits_equal(yb, F.matmul_8bit(
      x.astype(jnp.bfloat16), q, layer.bias[...].astype(jnp.bfloat16),
      threshold=threshold))


def test_trainable_layer_quantizes_its_float_weight_each_call():
  layer = jn.Linear8bitLt(64, 32, threshold=6.0, rngs=nnx.Rngs(0))
  assert layer.has_fp16_weights  # bitsandbytes' default
  assert type(layer.weight) is nnx.Param and layer.weight.shape == (32, 64)
  x = _x()
  helpers.assert_bits_equal(layer(x), F.matmul_8bit_fp16_weights(
      x, layer.weight[...], layer.bias[...], threshold=6.0))
  # Same initial weight, frozen: the same bytes and outputs (both quantize
  # the float16-cast weight, as bnb's Int8Params).
  frozen = jn.Linear8bitLt(64, 32, threshold=6.0, has_fp16_weights=False,
                           rngs=nnx.Rngs(0))
  helpers.assert_bits_equal(frozen(x), layer(x))
  q = F.quantize_int8_weight(layer.weight[...])
  np.testing.assert_array_equal(np.asarray(frozen.weight.get_value().CB),
                                np.asarray(q.CB))


@pytest.mark.parametrize("has_fp16_weights", [True, False])
def test_training_step(has_fp16_weights):
  model = jn.Linear8bitLt(64, 8, has_fp16_weights=has_fp16_weights,
                          threshold=6.0, rngs=nnx.Rngs(0))
  before_w = jax.tree.map(np.asarray, model.weight.get_value())
  before_b = np.asarray(model.bias[...])
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  x, target = _x((16, 64)), jax.random.normal(jax.random.key(2), (16, 8))

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      return jnp.mean((model(x) - target) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss, grads

  loss0, grads = step(model, opt)
  # Adam's first update is lr * g / (|g| + 1e-8): lr for every parameter
  # with |g| >> 1e-8, up to float32 rounding of the bias (zero at init).
  np.testing.assert_allclose(
      np.abs(np.asarray(model.bias[...]) - before_b), 1e-3, rtol=1e-5)
  loss1, _ = step(model, opt)
  assert float(loss1) < float(loss0)
  leaves = jax.tree.leaves(nnx.state(opt, nnx.optimizer.OptState))
  if has_fp16_weights:
    # The float weight trains (grad = g.T @ x through the quantizer).
    assert grads["weight"][...].shape == (8, 64)
    moved = np.abs(np.asarray(model.weight[...]) - before_w)
    assert moved.min() > 0
  else:
    # The int8 weight is not an nnx.Param: no gradient, no optimizer state,
    # bytes unchanged.
    assert "weight" not in grads
    after = model.weight.get_value()
    np.testing.assert_array_equal(np.asarray(after.CB), before_w.CB)
    helpers.assert_bits_equal(after.SCB, before_w.SCB)
    assert not any(getattr(l, "dtype", None) == jnp.int8 for l in leaves)


@pytest.mark.parametrize("source", ["nnx.Linear", "jaxbnb.Linear"])
@pytest.mark.parametrize("has_fp16_weights", [False, True])
def test_from_linear(source, has_fp16_weights):
  if source == "nnx.Linear":
    lin = nnx.Linear(64, 32, bias_init=nnx.initializers.normal(1.0),
                     rngs=nnx.Rngs(0))
    w, b = lin.kernel[...].T, lin.bias[...]
  else:
    lin = jn.Linear(64, 32, use_bias=True, dtype=jnp.float32,
                    param_dtype=jnp.float32, init_std=0.1, rngs=nnx.Rngs(0))
    w, b = lin.weight[...], lin.bias[...]
  layer = jn.Linear8bitLt.from_linear(lin, threshold=6.0,
                                      has_fp16_weights=has_fp16_weights)
  assert layer.threshold == 6.0 and layer.has_fp16_weights == has_fp16_weights
  assert (layer.in_features, layer.out_features) == (64, 32)
  x = _x()
  helpers.assert_bits_equal(layer(x), F.matmul_8bit(
      x, F.quantize_int8_weight(w), b, threshold=6.0))
  # The int8 error against the float layer: the weight's rounding (<= half
  # a step SCB/254 plus the fp16 cast 2**-11 |w|) and the activations' (half
  # a step per row, absmax over non-outlier columns / 254, plus 2**-11
  # |x|; outlier columns exact but for the weight), and the float16
  # epilogue rounding (one ulp).
  x2 = np.asarray(x, np.float64).reshape(-1, 64)
  w64, b64 = np.asarray(w, np.float64), np.asarray(b, np.float64)
  exact = x2 @ w64.T + b64
  scb = np.asarray(F.quantize_int8_weight(w).SCB, np.float64)
  cols = (np.abs(x2) >= 6).any(0)
  step = np.where(cols, 0, np.abs(x2)).max(1, keepdims=True) / 254
  x_err = np.where(cols, 0, step + 2.0 ** -11 * np.abs(x2))
  bound = (np.abs(x2) @ (scb[:, None] / 254 + 2.0 ** -11 * np.abs(w64)).T
           + x_err @ np.abs(w64).T * (1 + 1 / 127)
           + 2 * helpers.ulp(np.abs(exact) + 1e-3, np.float16))
  helpers.assert_within(np.asarray(layer(x)).reshape(-1, 32), exact, bound,
                        "vs float")
  with pytest.raises(TypeError, match="must be an nnx.Linear or a jaxbnb "
                     "Linear, got Linear4bit"):
    jn.Linear8bitLt.from_linear(jn.Linear4bit(64, 32, rngs=nnx.Rngs(0)))


def test_constructor_errors():
  with pytest.raises(ValueError, match=r"Linear8bitLt: `threshold` must be "
                     r">= 0, got -1\.0"):
    jn.Linear8bitLt(8, 4, threshold=-1.0, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"Linear8bitLt: `threshold` must be a "
                     r"float >= 0, got '6'"):
    jn.Linear8bitLt(8, 4, threshold="6", rngs=nnx.Rngs(0))
  # numpy scalars are thresholds, as matmul_8bit takes them.
  for t in (np.float32(6.0), np.int64(6)):
    assert jn.Linear8bitLt(8, 4, threshold=t, rngs=nnx.Rngs(0)).threshold == 6.0
  with pytest.raises(ValueError, match="`rngs` is required"):
    jn.Linear8bitLt(8, 4)
  with pytest.raises(ValueError, match=r"`weight` must have shape "
                     r"\[out_features, in_features\]=\[4, 8\], got \[8, 4\]"):
    jn.Linear8bitLt(8, 4, weight=jnp.ones((8, 4)), use_bias=False)
  q = F.quantize_int8_weight(jnp.ones((4, 8)))
  with pytest.raises(ValueError, match="needs has_fp16_weights=False"):
    jn.Linear8bitLt(8, 4, weight=q, use_bias=False)
  with pytest.raises(ValueError, match=r"\[out_features, in_features\]="
                     r"\[5, 8\], got \[4, 8\]"):
    jn.Linear8bitLt(8, 5, weight=q, use_bias=False, has_fp16_weights=False)
  layer = jn.Linear8bitLt(8, 4, weight=q, use_bias=False,
                          has_fp16_weights=False)
  with pytest.raises(ValueError, match=r"`inputs` must have shape "
                     r"\[\.\.\., in_features\] with in_features=8"):
    layer(jnp.ones((2, 7)))


def test_jit_vmap_grad_of_the_layer():
  layer = jn.Linear8bitLt(64, 16, has_fp16_weights=False, threshold=6.0,
                          rngs=nnx.Rngs(0))
  x = _x((4, 5, 64))
  y = layer(x)
  helpers.assert_bits_equal(nnx.jit(lambda m, x: m(x))(layer, x), y)
  y_v = jax.vmap(layer)(x)  # each slice picks its own outlier columns
  helpers.assert_bits_equal(y_v, jnp.stack([layer(xi) for xi in x]))
  dx = jax.grad(lambda x: layer(x).sum())(x)
  # dx = 1 @ (CB * SCB/127): column sums of the dequantized weight, over
  # N = 16 rows in float32 (16 * eps * sum|W|).
  q = layer.weight.get_value()
  wd = np.asarray(q.CB, np.float64) * (np.asarray(q.SCB, np.float32)
                                       * np.float32(1 / 127))[:, None]
  helpers.assert_within(dx, np.broadcast_to(wd.sum(0), x.shape),
                        16 * helpers.F32_EPS * np.abs(wd).sum(0), "dx")


# --------------------------------------------------------------------------
# linen
# --------------------------------------------------------------------------


@pytest.mark.parametrize("has_fp16_weights", [False, True])
def test_dense8bit(has_fp16_weights):
  layer = jl.Dense8bit(features=32, has_fp16_weights=has_fp16_weights,
                       threshold=6.0, bias_init=nn.initializers.normal(1.0))
  x = _x()
  variables = layer.init(jax.random.key(0), x)
  b = variables["params"]["bias"]
  if has_fp16_weights:
    assert sorted(variables) == ["params"]
    kernel = variables["params"]["kernel"]
    assert kernel.shape == (64, 32)  # Flax's [in, out]
    want = F.matmul_8bit_fp16_weights(x, kernel.T, b, threshold=6.0)
  else:
    assert sorted(variables) == ["params", "quantized"]
    assert "kernel" not in variables["params"]
    q = variables["quantized"]["kernel"]
    assert isinstance(q, F.Int8Params) and q.shape == (32, 64)
    want = F.matmul_8bit(x, q, b, threshold=6.0)
  y = layer.apply(variables, x)
  assert y.dtype == jnp.float32 and y.shape == (2, 3, 32)
  helpers.assert_bits_equal(y, want)
  # Gradients w.r.t. "params" reach the bias (and the float kernel).
  grads = jax.grad(lambda p: layer.apply({**variables, "params": p},
                                         x).sum())(variables["params"])
  assert sorted(grads) == sorted(variables["params"])


def test_dense8bit_matches_the_nnx_layer_and_checks_shapes():
  lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  layer = jn.Linear8bitLt.from_linear(lin, threshold=6.0)
  variables = {"params": {"bias": lin.bias[...]},
               "quantized": {"kernel": layer.weight.get_value()}}
  x = _x()
  dense = jl.Dense8bit(features=32, has_fp16_weights=False, threshold=6.0)
  helpers.assert_bits_equal(dense.apply(variables, x), layer(x))
  with pytest.raises(ValueError, match=r"expected \[features, in_features\]"
                     r"=\[16, 64\]"):
    jl.Dense8bit(features=16, has_fp16_weights=False).apply(variables, x)
  with pytest.raises(ValueError, match="Dense8bit: `threshold` must be"):
    jl.Dense8bit(features=32, threshold=-2.0).init(jax.random.key(0), x)


# --------------------------------------------------------------------------
# factory, quantize_params, memory_footprint
# --------------------------------------------------------------------------


def test_factory_load_in_8bit():
  q = QuantizationConfig(load_in_8bit=True, llm_int8_threshold=5.0,
                         llm_int8_skip_modules=["lm_head"])
  assert jn.weight_format(q, "model.layers.0.mlp.up_proj") == "int8"
  layer = jn.make_linear(64, 32, use_bias=False, path="mlp.up_proj",
                         dtype=jnp.bfloat16, param_dtype=jnp.float32,
                         init_std=0.02, quantization=q, rngs=nnx.Rngs(0))
  assert isinstance(layer, jn.Linear8bitLt)
  assert not layer.has_fp16_weights and layer.threshold == 5.0
  y = layer(jnp.ones((2, 64), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16  # a bf16 model stays bf16
  head = jn.make_linear(64, 32, use_bias=False, path="lm_head",
                        dtype=jnp.bfloat16, param_dtype=jnp.float32,
                        init_std=0.02, quantization=q, rngs=nnx.Rngs(0))
  assert isinstance(head, jn.Linear)
  from jaxbnb._src.layers import factory  # pylint: disable=g-import-not-at-top
  w = jax.random.normal(jax.random.key(0), (32, 64))
  stored = factory.quantize_weight(q, "mlp.up_proj", w)
  assert isinstance(stored, F.Int8Params) and stored.dtype == "float32"
  np.testing.assert_array_equal(np.asarray(stored.CB),
                                np.asarray(F.quantize_int8_weight(w).CB))


def test_quantize_params_bits_8_nnx_and_linen():
  model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)),
                         nnx.Linear(32, 16, rngs=nnx.Rngs(1)))
  x = _x((4, 64))
  first = model.layers[0]
  want0 = F.matmul_8bit(x, F.quantize_int8_weight(first.kernel[...].T),
                        first.bias[...], threshold=6.0)
  jn.quantize_params(model, bits=8, threshold=6.0, skip_modules=["layers/1"])
  assert isinstance(model.layers[0], jn.Linear8bitLt)
  assert type(model.layers[1]) is nnx.Linear
  assert not model.layers[0].has_fp16_weights
  helpers.assert_bits_equal(model.layers[0](x), want0)
  # Linen: kernels move to "quantized" as Int8Params for Dense8bit.
  params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
  out = jl.quantize_params(params, bits=8)
  q = out["quantized"]["dense"]["kernel"]
  assert isinstance(q, F.Int8Params) and q.shape == (32, 64)
  assert sorted(out["params"]["dense"]) == ["bias"]
  y = jl.Dense8bit(32, has_fp16_weights=False).apply(
      {"params": out["params"]["dense"], "quantized": {"kernel": q}}, x)
  helpers.assert_bits_equal(y, F.matmul_8bit(
      x, F.quantize_int8_weight(jnp.ones((32, 64))), jnp.zeros(32)))
  with pytest.raises(ValueError, match="`bits` must be 4 or 8, got 3"):
    jn.quantize_params(params, bits=3)
  with pytest.raises(ValueError, match="`threshold` applies to bits=8 only"):
    jn.quantize_params(params, threshold=6.0)


def test_memory_footprint_int8_is_half_of_fp16():
  lin = nnx.Linear(1024, 1024, param_dtype=jnp.float16, rngs=nnx.Rngs(0))
  fp16 = jn.memory_footprint(lin)
  assert fp16 == 2 * 1024 * 1024 + 2 * 1024
  layer = jn.Linear8bitLt.from_linear(lin)
  # CB int8 (1 B/element) + SCB float32 per row + the fp16 bias.
  assert jn.memory_footprint(layer) == 1024 * 1024 + 4 * 1024 + 2 * 1024
  assert abs(jn.memory_footprint(layer) / fp16 - 0.5) < 0.005
  assert F.quantize_int8_weight(lin.kernel[...].T).nbytes == 1024 * 1028


# --------------------------------------------------------------------------
# LoRA over an 8-bit base
# --------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_over_a_frozen_8bit_base(use_dora):
  base = jn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0,
                         rngs=nnx.Rngs(0))
  cfg = lora.LoRAConfig(r=4, lora_alpha=8, use_dora=use_dora,
                        init_lora_weights=False)
  layer = lora.LoRALinear(base, cfg, rngs=nnx.Rngs(1))
  x = _x()
  y = layer(x)
  assert y.shape == (2, 3, 32) and y.dtype == jnp.float32
  wd = base.weight.get_value().dequantize()
  if use_dora:  # the magnitude starts at ||W + s B A|| of the int8 weight
    helpers.assert_bits_equal(
        layer.lora_magnitude_vector[...],
        lora_lib.dora_weight_norm(wd, layer.lora_A[...], layer.lora_B[...], 2.0))
  # Merge: dequantize + add + requantize (PEFT's 8-bit merge), i.e. the
  # Int8Params of the float16-cast merged weight.
  merged = lora.merge_lora(layer)
  assert isinstance(merged, jn.Linear8bitLt) and merged.threshold == 6.0
  want = F.quantize_int8_weight(layer.merged_weight())
  np.testing.assert_array_equal(np.asarray(merged.weight.get_value().CB),
                                np.asarray(want.CB))


def test_lora_over_a_trainable_8bit_base_and_float_merge():
  base = jn.Linear8bitLt(64, 32, threshold=6.0, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base, lora.LoRAConfig(r=4, init_lora_weights=False),
                          rngs=nnx.Rngs(1))
  assert layer(_x()).shape == (2, 3, 32)
  merged = layer.merge()
  assert merged.has_fp16_weights and type(merged.weight) is nnx.Param
  helpers.assert_bits_equal(merged.weight[...], layer.merged_weight())
