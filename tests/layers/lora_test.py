"""LoRA layers: LoRAConfig, LoRALinear (float and 4-bit bases, DoRA),
apply_lora / merge_lora / unload_lora, training selection, linen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxbnb import functional as F
from jaxbnb import models
from jaxbnb import optim
from jaxbnb.lora import Dense4bitLoRA
from jaxbnb.lora import LoRAConfig
from jaxbnb.lora import LoRALinear
from jaxbnb.lora import apply_lora
from jaxbnb.lora import find_targets
from jaxbnb.lora import merge_lora
from jaxbnb.lora import unload_lora
from jaxbnb.nnx import Linear
from jaxbnb.nnx import Linear4bit
from jaxbnb.nnx import Linear8bitLt
from jaxbnb.nnx import QuantizedWeight
from tests import helpers

CFG = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
Q4 = models.QuantizationConfig.nf4(compute_dtype="float32")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")


def tiny(quantization=None, seed=0):
  return models.LlamaForCausalLM(CFG, quantization=quantization,
                                 rngs=nnx.Rngs(seed))


def float_linear(n_in=64, n_out=32, bias=True, seed=0):
  layer = Linear(n_in, n_out, use_bias=bias, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std=0.1, rngs=nnx.Rngs(seed))
  if bias:
    layer.bias[...] = jax.random.normal(jax.random.key(seed + 7), (n_out,))
  return layer


def q4_linear(n_in=64, n_out=32, bias=True, seed=0):
  return Linear4bit(n_in, n_out, use_bias=bias, quant_type="nf4",
                    dtype=jnp.float32,
                    bias_init=nnx.initializers.normal(1.0),
                    rngs=nnx.Rngs(seed))


def _w64(layer):
  if isinstance(layer, Linear):
    return np.asarray(layer.weight[...], np.float64)
  return np.asarray(layer.weight.get_value().dequantize(), np.float64)


def reference(x, base, a, b, scaling, m=None):
  """float64 numpy: PEFT's LoRA / DoRA output (eval mode)."""
  x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
  w = _w64(base)
  bias = (np.zeros(w.shape[0]) if base.bias is None
          else np.asarray(base.bias[...], np.float64))
  if m is None:
    return x @ w.T + bias + scaling * (x @ a.T @ b.T)
  adapted = w + scaling * b @ a
  norm = np.linalg.norm(adapted, axis=1)
  return x @ (np.asarray(m, np.float64)[:, None] / norm[:, None]
              * adapted).T + bias


# ---------------------------------------------------------------------------
# LoRAConfig


@pytest.mark.parametrize("kw,err", [
    (dict(r=0), ValueError), (dict(r=-2), ValueError),
    (dict(r=2.0), ValueError), (dict(r=True), ValueError),
    (dict(lora_alpha=0), ValueError), (dict(lora_alpha=-1.0), ValueError),
    (dict(lora_alpha=float("inf")), ValueError),
    (dict(lora_alpha=float("nan")), ValueError),
    (dict(lora_dropout=float("nan")), ValueError),
    (dict(lora_dropout=float("inf")), ValueError),
    (dict(lora_dropout=1.0), ValueError), (dict(lora_dropout=-0.1),
                                           ValueError),
    (dict(bias="some"), ValueError),
    (dict(modules_to_save="lm_head"), ValueError),
    (dict(fan_in_fan_out=True), NotImplementedError),
    (dict(init_lora_weights="pissa"), NotImplementedError),
    (dict(init_lora_weights="loftq"), NotImplementedError),
    (dict(init_lora_weights=3), ValueError),
    (dict(target_modules="q_proj(("), ValueError),
    (dict(target_modules=[]), ValueError),
    (dict(target_modules=["q_proj", ""]), ValueError),
])
def test_config_rejects_bad_or_unsupported_values(kw, err):
  with pytest.raises(err, match="LoRAConfig"):
    LoRAConfig(**kw)


def test_config_scaling_and_normalisation():
  assert LoRAConfig(r=16, lora_alpha=32).scaling == 2.0
  assert LoRAConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
  cfg = LoRAConfig(target_modules={"v_proj", "q_proj"}, modules_to_save=[],
                   init_lora_weights="Gaussian")
  assert cfg.target_modules == ("q_proj", "v_proj")
  assert cfg.modules_to_save is None and cfg.init_lora_weights == "gaussian"
  assert LoRAConfig(target_modules="ALL-LINEAR").all_linear
  hash(cfg)  # static metadata of the layers: must hash


def test_config_matches_as_peft():
  cfg = LoRAConfig(target_modules=["q_proj", "mlp.up_proj"])
  assert cfg.matches("q_proj")
  assert cfg.matches("model.layers.0.self_attn.q_proj")
  assert cfg.matches("model.layers.3.mlp.up_proj")
  assert not cfg.matches("model.layers.0.self_attn.xq_proj")
  assert not cfg.matches("model.layers.0.self_attn.q_proj.base_layer")
  assert not cfg.matches("model.layers.0.up_proj")
  regex = LoRAConfig(target_modules=r".*layers\.1\..*(q|v)_proj")
  assert regex.matches("model.layers.1.self_attn.v_proj")
  assert not regex.matches("model.layers.0.self_attn.v_proj")
  assert not LoRAConfig(target_modules="q_proj").matches(
      "model.layers.0.self_attn.q_proj")  # a regex must match the whole path
  excl = LoRAConfig(target_modules=["q_proj"],
                    exclude_modules=["layers.0.self_attn.q_proj"])
  assert excl.matches("model.layers.1.self_attn.q_proj")
  assert not excl.matches("model.layers.0.self_attn.q_proj")
  assert LoRAConfig().matches("model.layers.0.self_attn.v_proj")  # default


def test_config_dict_round_trip_and_peft_fields():
  cfg = LoRAConfig(r=4, lora_alpha=16, lora_dropout=0.05,
                   target_modules=["q_proj", "v_proj"], use_dora=True,
                   use_rslora=True, init_lora_weights="gaussian",
                   base_model_name_or_path="meta-llama/Llama-3.1-8B")
  d = cfg.to_dict()
  for key, want in dict(peft_type="LORA", task_type="CAUSAL_LM", r=4,
                        lora_alpha=16, lora_dropout=0.05, use_dora=True,
                        use_rslora=True, bias="none", fan_in_fan_out=False,
                        modules_to_save=None, rank_pattern={},
                        alpha_pattern={}, layers_to_transform=None,
                        lora_bias=False, init_lora_weights="gaussian",
                        target_modules=["q_proj", "v_proj"]).items():
    assert d[key] == want, key
  assert LoRAConfig.from_dict(d) == cfg


def test_config_from_dict_keeps_bookkeeping_and_refuses_math_changes():
  d = LoRAConfig(target_modules=["q_proj"]).to_dict()
  d.update(peft_version="0.18.0", revision="main", eva_config=None,
           new_future_field=None, megatron_core="megatron.core",
           qalora_group_size=16)
  cfg = LoRAConfig.from_dict(d)
  out = cfg.to_dict()
  for key in ("peft_version", "revision", "eva_config", "new_future_field",
              "megatron_core", "qalora_group_size"):
    assert out[key] == d[key], key
  assert LoRAConfig.from_dict({**d, "lora_bias": True}).lora_bias
  for key, value in [("use_qalora", True), ("trainable_token_indices", [1]),
                     ("layer_replication", [[0, 1]]),
                     ("alora_invocation_tokens", [5]),
                     ("target_parameters", ["mlp.experts.down_proj"]),
                     ("new_future_field", {"a": 1})]:
    with pytest.raises(NotImplementedError, match=key):
      LoRAConfig.from_dict({**d, key: value})
  with pytest.raises(ValueError, match="peft_type"):
    LoRAConfig.from_dict({**d, "peft_type": "IA3"})


# ---------------------------------------------------------------------------
# targets


def test_all_linear_excludes_the_output_head():
  model = tiny()
  found = find_targets(model, LoRAConfig(target_modules="all-linear"))
  assert len(found) == 2 * 7 and "lm_head" not in found
  assert found[0] == "model.layers.0.mlp.down_proj"  # graph order
  assert find_targets(model, LoRAConfig(target_modules=["lm_head"])) == [
      "lm_head"]
  excl = LoRAConfig(target_modules="all-linear",
                    exclude_modules=["mlp.up_proj"])
  assert len(find_targets(model, excl)) == 2 * 6


def test_targets_that_match_nothing_or_a_non_linear():
  model = tiny()
  with pytest.raises(ValueError, match=r"matches no linear.*q_proj"):
    apply_lora(model, LoRAConfig(target_modules=["qkv"]), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="Attention: LoRA applies to linear"):
    apply_lora(model, LoRAConfig(target_modules=["self_attn"]),
               rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="Embedding"):
    apply_lora(model, LoRAConfig(target_modules=["embed_tokens"]),
               rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="LoRAConfig"):
    apply_lora(model, {"r": 4}, rngs=nnx.Rngs(0))


def test_apply_lora_keeps_hf_paths_and_refuses_a_second_adapter():
  model = apply_lora(tiny(Q4), LoRAConfig(target_modules=["q_proj", "v_proj"]),
                     rngs=nnx.Rngs(1))
  attn = model.model.layers[1].self_attn
  assert isinstance(attn.q_proj, LoRALinear)
  assert isinstance(attn.q_proj.base_layer, Linear4bit)
  assert isinstance(attn.k_proj, Linear4bit)
  names = {".".join(map(str, p)) for p, _ in nnx.iter_graph(model)}
  assert "model.layers.1.self_attn.q_proj.lora_A" in names
  assert "model.layers.1.self_attn.q_proj.base_layer.weight" in names
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    apply_lora(model, LoRAConfig(target_modules=["k_proj"]), rngs=nnx.Rngs(1))


# ---------------------------------------------------------------------------
# initialisation


def test_default_init_is_an_identity_adapter():
  base = q4_linear()
  x = jax.random.normal(jax.random.key(0), (3, 64))
  want = base(x)
  layer = LoRALinear(base, LoRAConfig(r=8), rngs=nnx.Rngs(1))
  a = np.asarray(layer.lora_A[...])
  assert a.dtype == np.float32 and layer.lora_B[...].dtype == jnp.float32
  assert np.all(np.abs(a) <= 1 / 8) and a.std() > 0.5 / 8 / np.sqrt(3)
  assert not np.any(np.asarray(layer.lora_B[...]))
  np.testing.assert_array_equal(layer(x), want)


def test_gaussian_and_random_b_inits():
  base = float_linear(256, 128)
  g = LoRALinear(base, LoRAConfig(r=16, init_lora_weights="gaussian"),
                 rngs=nnx.Rngs(1))
  assert abs(float(jnp.std(g.lora_A[...])) - 1 / 16) < 0.005
  assert not np.any(np.asarray(g.lora_B[...]))
  f = LoRALinear(base, LoRAConfig(r=16, init_lora_weights=False),
                 rngs=nnx.Rngs(1))
  b = np.asarray(f.lora_B[...])
  assert np.all(np.abs(b) <= 0.25) and b.std() > 0.1


def test_bf16_adapters():
  layer = LoRALinear(float_linear(), LoRAConfig(init_lora_weights=False),
                     lora_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  assert layer.lora_A[...].dtype == jnp.bfloat16
  assert layer(jnp.ones((2, 64))).dtype == jnp.float32


def test_initial_arrays_are_checked():
  with pytest.raises(ValueError, match=r"lora_A.*\[4, 64\].*\[4, 32\]"):
    LoRALinear(float_linear(), LoRAConfig(r=4), lora_A=jnp.zeros((4, 32)),
               lora_B=jnp.zeros((32, 4)))
  with pytest.raises(ValueError, match="rngs"):
    LoRALinear(float_linear(), LoRAConfig(r=4))
  with pytest.raises(TypeError, match="base_layer"):
    LoRALinear(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("make", [float_linear, q4_linear],
                         ids=["float", "nf4"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_forward_matches_peft_formula(make, variant):
  base = make()
  cfg = LoRAConfig(r=4, lora_alpha=12, use_rslora=variant == "rslora",
                   use_dora=variant == "dora", init_lora_weights=False)
  layer = LoRALinear(base, cfg, rngs=nnx.Rngs(3))
  if variant == "dora":
    m = layer.lora_magnitude_vector[...]
    # PEFT's init: the row norms of the (dequantized) adapted weight.
    np.testing.assert_allclose(m, np.linalg.norm(
        _w64(base) + cfg.scaling * np.asarray(layer.lora_B[...], np.float64)
        @ np.asarray(layer.lora_A[...], np.float64), axis=1), rtol=1e-5)
    layer.lora_magnitude_vector[...] = m * jax.random.uniform(
        jax.random.key(5), m.shape, minval=0.5, maxval=1.5)
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  want = reference(x, base, layer.lora_A[...], layer.lora_B[...],
                   cfg.scaling, None if variant != "dora"
                   else layer.lora_magnitude_vector[...])
  got = layer(x)
  assert got.dtype == jnp.float32 and got.shape == (2, 5, 32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, base(x), atol=1e-3)


def test_dora_on_4bit_equals_dora_on_its_dequantized_weight():
  q4 = q4_linear()
  fl = float_linear()
  fl.weight[...] = q4.weight.get_value().dequantize()
  fl.bias[...] = q4.bias[...]
  cfg = LoRAConfig(r=4, use_dora=True, init_lora_weights=False)
  a = LoRALinear(q4, cfg, rngs=nnx.Rngs(3))
  b = LoRALinear(fl, cfg, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(a.lora_magnitude_vector[...],
                                b.lora_magnitude_vector[...])
  x = jax.random.normal(jax.random.key(0), (4, 64))
  np.testing.assert_allclose(a(x), b(x), rtol=1e-6, atol=1e-6)


def test_bfloat16_base_adds_the_float32_term_then_rounds():
  base = Linear(64, 32, use_bias=False, dtype=jnp.bfloat16,
                param_dtype=jnp.bfloat16, init_std=0.1, rngs=nnx.Rngs(0))
  layer = LoRALinear(base, LoRAConfig(r=4, init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (3, 64)).astype(jnp.bfloat16)
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  delta = (x.astype(jnp.float32) @ layer.lora_A[...].T
           @ layer.lora_B[...].T) * layer.scaling
  want = (base(x).astype(jnp.float32) + delta).astype(jnp.bfloat16)
  np.testing.assert_array_equal(y, want)


def test_bfloat16_4bit_base_rounds_the_term_first():
  # PEFT's bitsandbytes Linear4bit casts the adapter term to the output
  # dtype before the add (its float Linear adds in float32).
  base = Linear4bit(64, 32, use_bias=False, quant_type="nf4",
                    dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  layer = LoRALinear(base, LoRAConfig(r=4, init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (3, 64)).astype(jnp.bfloat16)
  delta = (x.astype(jnp.float32) @ layer.lora_A[...].T
           @ layer.lora_B[...].T) * layer.scaling
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, base(x) + delta.astype(jnp.bfloat16))


@pytest.mark.parametrize("dora", [False, True])
def test_4bit_base_with_bfloat16_compute_keeps_a_float32_input_s_dtype(dora):
  # bitsandbytes' Linear4bit returns the input's dtype whatever its compute
  # dtype, and PEFT adds the adapter term in that dtype: a float32 model
  # with bfloat16 compute keeps a small adapter term that bfloat16 would
  # round away.
  base = Linear4bit(64, 32, use_bias=False, quant_type="nf4",
                    dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  layer = LoRALinear(base, LoRAConfig(r=4, init_lora_weights=False,
                                      use_dora=dora), rngs=nnx.Rngs(1))
  layer.lora_B[...] = layer.lora_B[...] * 1e-4
  x = jax.random.normal(jax.random.key(0), (3, 64))
  y = layer(x)
  assert y.dtype == jnp.float32
  base_y = base(x).astype(jnp.float32)
  assert np.abs(np.asarray(y - base_y)).max() > 0
  if not dora:
    delta = (x @ layer.lora_A[...].T @ layer.lora_B[...].T) * layer.scaling
    np.testing.assert_array_equal(y, base_y + delta)


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_only_in_training(dora):
  cfg = LoRAConfig(r=4, lora_dropout=0.5, use_dora=dora,
                   init_lora_weights=False)
  layer = LoRALinear(q4_linear(), cfg, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (8, 64))
  y_eval = layer(x)
  np.testing.assert_allclose(y_eval, reference(
      x, layer.base_layer, layer.lora_A[...], layer.lora_B[...], cfg.scaling,
      layer.lora_magnitude_vector[...] if dora else None), rtol=1e-5,
                             atol=1e-5)
  layer.train()
  y1, y2 = layer(x), layer(x)
  assert not np.allclose(y1, y_eval) and not np.allclose(y1, y2)
  layer.eval()
  np.testing.assert_array_equal(layer(x), y_eval)


def test_dropout_zeroes_or_doubles_the_adapter_input():
  # in=4 and r=4: B @ A [8, 4] has full column rank, so dropout(x) can be
  # solved for from the output.
  layer = LoRALinear(float_linear(4, 8), LoRAConfig(
      r=4, lora_dropout=0.5, init_lora_weights=False), rngs=nnx.Rngs(1))
  layer.train()
  x = jax.random.normal(jax.random.key(0), (16, 4))
  delta = np.asarray(layer(x) - layer.base_layer(x), np.float64)
  ba = np.asarray(layer.lora_B[...] @ layer.lora_A[...], np.float64)
  xd = np.linalg.lstsq(ba * layer.scaling, delta.T, rcond=None)[0].T
  ratio = xd / np.asarray(x, np.float64)
  assert np.all((np.abs(ratio) < 1e-3) | (np.abs(ratio - 2) < 1e-3)), ratio
  assert 0.2 < np.mean(np.abs(ratio) < 1e-3) < 0.8
  assert LoRALinear(q4_linear(), LoRAConfig(r=4), rngs=nnx.Rngs(1)
                    ).lora_dropout is None


def test_model_train_and_eval_switch_the_dropout():
  model = apply_lora(tiny(), LoRAConfig(r=4, lora_dropout=0.3,
                                        init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  ids = jnp.array([[1, 2, 3, 4, 5]])
  a = model(ids)[0]
  np.testing.assert_array_equal(model(ids)[0], a)  # starts in eval mode
  model.train()
  assert not np.allclose(model(ids)[0], a)
  model.eval()
  np.testing.assert_array_equal(model(ids)[0], a)


def test_jit_of_the_split_model():
  model = apply_lora(tiny(Q4), LoRAConfig(r=4, use_dora=True,
                                          target_modules="all-linear",
                                          init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  ids = jnp.array([[1, 2, 3, 4, 5]])
  graph, state = nnx.split(model)
  run = jax.jit(lambda s, i: nnx.merge(graph, s)(i)[0])
  np.testing.assert_allclose(run(state, ids), model(ids)[0], rtol=1e-6,
                             atol=1e-6)


# ---------------------------------------------------------------------------
# training selects exactly the adapters


def _loss(model, ids):
  logits, _ = model(ids)
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


@pytest.mark.parametrize("quantization", [None, Q4], ids=["float", "nf4"])
@pytest.mark.parametrize("tx", ["adamw", "adamw8bit"])
def test_one_optimizer_step_changes_only_the_adapters(quantization, tx):
  model = apply_lora(tiny(quantization),
                     LoRAConfig(r=4, target_modules="all-linear",
                                use_dora=True),
                     rngs=nnx.Rngs(1))
  before = jax.tree.map(np.array, nnx.state(model))
  tx = (optax.adamw(1e-2) if tx == "adamw"
        else optim.adamw8bit(1e-2, min_8bit_size=64))
  opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  ids = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, ids)
  assert {type(v) for v in jax.tree.leaves(
      grads, is_leaf=lambda x: isinstance(x, nnx.Variable))} == {
          nnx.LoRAParam}
  opt.update(model, grads)
  after = nnx.state(model)
  flat_before = dict(nnx.to_flat_state(before))
  changed = set()
  for path, var in nnx.to_flat_state(after):
    old, new = flat_before[path], var
    for a, b in zip(jax.tree.leaves(old.get_value()),
                    jax.tree.leaves(new.get_value()), strict=True):
      if isinstance(var, nnx.LoRAParam):
        if not np.array_equal(a, b):
          changed.add(path)
      else:
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
  n_lora = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  assert len(changed) == n_lora == 2 * 7 * 3
  if quantization is not None:
    assert any(isinstance(v, QuantizedWeight)
               for _, v in nnx.to_flat_state(after))


def test_dora_gradient_detaches_the_norm():
  base = q4_linear()
  layer = LoRALinear(base, LoRAConfig(r=4, use_dora=True,
                                      init_lora_weights=False),
                     rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(0), (6, 64))
  w = base.weight.get_value().dequantize()
  s = layer.scaling

  def ref(a, b, m):
    norm = jax.lax.stop_gradient(jnp.linalg.norm(w + s * b @ a, axis=1))
    mns = m / norm
    base_out = x @ w.T
    lora = x @ a.T @ b.T
    return jnp.sum(jnp.sin(base_out + (mns - 1) * base_out + mns * lora * s))

  def loss(layer):
    return jnp.sum(jnp.sin(layer(x) - base.bias[...]))

  g = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
  with jax.default_matmul_precision("highest"):
    ga, gb, gm = jax.grad(ref, argnums=(0, 1, 2))(
        layer.lora_A[...], layer.lora_B[...], layer.lora_magnitude_vector[...])
  for got, want in ((g["lora_A"], ga), (g["lora_B"], gb),
                    (g["lora_magnitude_vector"], gm)):
    np.testing.assert_allclose(got[...], want, rtol=2e-4,
                               atol=2e-4 * float(jnp.max(jnp.abs(want))))


# ---------------------------------------------------------------------------
# merge / unload


@pytest.mark.parametrize("dora", [False, True])
def test_merge_float_model_equals_adapted_model(dora):
  model = apply_lora(tiny(), LoRAConfig(r=4, use_dora=dora,
                                        target_modules="all-linear",
                                        init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  ids = jnp.array([[1, 2, 3, 4, 5, 6]])
  want = model(ids)[0]
  merged = merge_lora(model)
  assert merged is model
  assert not any(isinstance(n, LoRALinear) for _, n in nnx.iter_graph(model))
  assert isinstance(model.model.layers[0].mlp.up_proj, Linear)
  assert not nnx.state(model, nnx.LoRAParam)
  got = model(ids)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_merge_layer_values():
  base = float_linear()
  layer = LoRALinear(base, LoRAConfig(r=4, init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  merged = layer.merge()
  want = base.weight[...] + layer.scaling * layer.lora_B[...] @ layer.lora_A[
      ...]
  np.testing.assert_allclose(merged.weight[...], want, rtol=1e-6, atol=1e-6)
  assert layer.base_layer is base  # the LoRA layer is left as it was
  assert not np.allclose(base.weight[...], merged.weight[...])


@pytest.mark.parametrize("dora", [False, True])
def test_merge_4bit_requantize_or_float(dora):
  cfg = LoRAConfig(r=4, use_dora=dora, init_lora_weights=False)
  x = jax.random.normal(jax.random.key(0), (5, 64))
  layer = LoRALinear(q4_linear(), cfg, rngs=nnx.Rngs(1))
  want = layer(x)
  wf = layer.merged_weight()
  as_float = layer.merge(requantize=False)
  assert isinstance(as_float, Linear) and as_float.weight.dtype == jnp.float32
  np.testing.assert_allclose(as_float(x), want, rtol=1e-5, atol=1e-5)
  requant = layer.merge(requantize=True)
  assert isinstance(requant, Linear4bit)
  q_old = layer.base_layer.weight.get_value()
  q_new = requant.weight.get_value()
  assert q_new == F.Params4bit.from_float(
      wf, quant_type="nf4", blocksize=64, compress_statistics=True)
  assert q_new.quant_state.quant_type == q_old.quant_state.quant_type
  assert q_new.quant_state.nested == q_old.quant_state.nested
  assert q_new.quant_storage == q_old.quant_storage
  # the 4-bit rounding of the merged weight: a real but small error
  err = float(jnp.linalg.norm(requant(x) - want) / jnp.linalg.norm(want))
  assert 1e-4 < err < 0.15, err


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_merge_int8_as_peft(dtype):
  # PEFT's `Linear8bitLt.merge`: the adapter added to the float32
  # `int8_vectorwise_dequant(CB, SCB)` (never rounded to the layer dtype),
  # then `bnb.nn.Int8Params(merged)`: cast to float16, quantized by rows.
  w = jax.random.normal(jax.random.key(0), (64, 128)) * 0.05
  base = Linear8bitLt(128, 64, use_bias=False, has_fp16_weights=False,
                      threshold=6.0, weight=w.astype(dtype))
  layer = LoRALinear(base, LoRAConfig(r=4, init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  q = base.weight.get_value()
  want = F.quantize_int8_weight(
      F.int8_vectorwise_dequant(q.CB, q.SCB) + layer.delta_weight())
  got = layer.merge().weight.get_value()
  np.testing.assert_array_equal(np.asarray(got.CB), np.asarray(want.CB))
  np.testing.assert_array_equal(np.asarray(got.SCB), np.asarray(want.SCB))
  # The rounding to `dtype` first would change some codes: the test can
  # tell the two apart.
  rounded = F.quantize_int8_weight(
      F.int8_vectorwise_dequant(q.CB, q.SCB).astype(dtype).astype(jnp.float32)
      + layer.delta_weight())
  assert (np.asarray(rounded.CB) != np.asarray(want.CB)).any()


def test_merge_4bit_model():
  model = apply_lora(tiny(Q4), LoRAConfig(r=4, target_modules="all-linear",
                                          init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  ids = jnp.array([[1, 2, 3, 4, 5, 6]])
  want = model(ids)[0]
  float_copy = merge_lora(nnx.clone(model), requantize=False)
  assert isinstance(float_copy.model.layers[0].self_attn.q_proj, Linear)
  got = float_copy(ids)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))
  merge_lora(model)
  assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
  assert np.isfinite(np.asarray(model(ids)[0])).all()


def test_unload_restores_the_base_and_errors_without_adapters():
  model = tiny(Q4)
  ids = jnp.array([[1, 2, 3]])
  want = model(ids)[0]
  apply_lora(model, LoRAConfig(r=4, init_lora_weights=False),
             rngs=nnx.Rngs(1))
  assert not np.allclose(model(ids)[0], want)
  unload_lora(model)
  np.testing.assert_array_equal(model(ids)[0], want)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    merge_lora(model)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    unload_lora(model)


def test_a_single_layer_as_the_model():
  layer = apply_lora(float_linear(), LoRAConfig(target_modules=".*"),
                     rngs=nnx.Rngs(0))
  assert isinstance(layer, LoRALinear)
  assert isinstance(merge_lora(layer), Linear)


# ---------------------------------------------------------------------------
# linen


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_linen_and_nnx_agree_exactly(dora, rslora):
  x = jax.random.normal(jax.random.key(1), (3, 7, 64))
  linen = Dense4bitLoRA(32, r=4, lora_alpha=16, use_rslora=rslora,
                        use_dora=dora, init_lora_weights=False,
                        quant_type="nf4",
                        bias_init=jax.nn.initializers.normal(1.0))
  variables = linen.init(jax.random.key(0), x)
  params = variables["params"]
  assert sorted(params) == sorted(
      ["base_layer", "lora_A", "lora_B"]
      + (["lora_magnitude_vector"] if dora else []))
  assert params["lora_A"].shape == (4, 64)
  assert params["lora_B"].shape == (32, 4)
  w = variables["quantized"]["base_layer"]["kernel"]
  base = Linear4bit(64, 32, weight=w, bias=params["base_layer"]["bias"],
                    quant_type="nf4")
  layer = LoRALinear(
      base, LoRAConfig(r=4, lora_alpha=16, use_rslora=rslora, use_dora=dora),
      lora_A=params["lora_A"], lora_B=params["lora_B"],
      lora_magnitude_vector=params.get("lora_magnitude_vector"))
  if dora:
    np.testing.assert_array_equal(params["lora_magnitude_vector"],
                                  LoRALinear(base, layer.config,
                                             lora_A=params["lora_A"],
                                             lora_B=params["lora_B"]
                                             ).lora_magnitude_vector[...])
  np.testing.assert_array_equal(linen.apply(variables, x), layer(x))


def test_linen_grads_reach_the_adapters_and_dropout_needs_a_flag():
  x = jax.random.normal(jax.random.key(1), (4, 64))
  linen = Dense4bitLoRA(32, r=4, lora_dropout=0.5, init_lora_weights=False,
                        quant_type="nf4")
  variables = linen.init(jax.random.key(0), x, deterministic=True)
  assert "kernel" not in variables["params"]["base_layer"]

  def loss(params, rng):
    y = linen.apply({**variables, "params": params}, x, deterministic=False,
                    rngs={"dropout": rng})
    return jnp.sum(y ** 2)

  g = jax.grad(loss)(variables["params"], jax.random.key(2))
  assert float(jnp.abs(g["lora_A"]).sum()) > 0
  assert float(jnp.abs(g["lora_B"]).sum()) > 0
  y_eval = linen.apply(variables, x, deterministic=True)
  y_train = linen.apply(variables, x, deterministic=False,
                        rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(y_eval, y_train)
  with pytest.raises(ValueError, match="deterministic"):
    linen.apply(variables, x)


@pytest.mark.parametrize("lora_dtype", [jnp.int8, "int32", "float33",
                                        jnp.bool_])
def test_lora_dtype_must_be_a_float_dtype(lora_dtype):
  model = tiny(Q4)
  with pytest.raises(TypeError, match="apply_lora: `lora_dtype` must be a "
                     "floating-point dtype"):
    apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"),
               rngs=nnx.Rngs(1), lora_dtype=lora_dtype)
  assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
  with pytest.raises(TypeError, match="LoRALinear: `lora_dtype`"):
    LoRALinear(q4_linear(), LoRAConfig(r=4), lora_dtype=lora_dtype,
               rngs=nnx.Rngs(1))


class _FlaxModel(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(32, 64, rngs=rngs)
    self.down = nnx.Linear(64, 32, rngs=rngs)


@pytest.mark.parametrize("targets", ["all-linear", ["up"]])
def test_plain_flax_linears_are_refused_with_the_way_out(targets):
  with pytest.raises(NotImplementedError,
                     match="flax.nnx.Linear is not supported.*quantize_params"):
    apply_lora(_FlaxModel(nnx.Rngs(0)), LoRAConfig(target_modules=targets),
               rngs=nnx.Rngs(1))
  with pytest.raises(TypeError,
                     match="flax.nnx.Linear is not supported.*quantize_params"):
    LoRALinear(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), LoRAConfig(r=2),
               rngs=nnx.Rngs(1))


# ---------------------------------------------------------------------------
# rank_pattern, alpha_pattern, layers_to_transform (PEFT's rules; the files
# PEFT writes with them are in tests/io/peft_test.py's golden cases)


def test_patterns_and_layers_select_as_peft_does():
  model = tiny()
  n = len(model.model.layers)
  cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                   rank_pattern={"model.layers.1.mlp.up_proj": 6,
                                 "q_proj": 2},
                   alpha_pattern={r"mlp\.up_proj": 3},
                   layers_to_transform=[1], layers_pattern="layers")
  assert sorted(find_targets(model, cfg)) == [
      "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
  model = apply_lora(model, cfg, rngs=nnx.Rngs(0))
  q = model.model.layers[1].self_attn.q_proj
  up = model.model.layers[1].mlp.up_proj
  assert (q.r, q.scaling, q.lora_A.shape[0]) == (2, 4.0, 2)
  assert (up.r, up.scaling, up.lora_B.shape[1]) == (6, 0.5, 6)
  assert not isinstance(model.model.layers[0].mlp.up_proj, LoRALinear)
  assert n == 2
  # an exact module name skips the layer filter (PEFT: `key in targets`)
  exact = LoRAConfig(target_modules=["model.layers.0.self_attn.q_proj"],
                     layers_to_transform=1)
  assert exact.matches("model.layers.0.self_attn.q_proj")
  # no layers_pattern: the first number after any name
  assert LoRAConfig(target_modules=["q_proj"], layers_to_transform=0).matches(
      "model.layers.0.self_attn.q_proj")
  assert not LoRAConfig(target_modules=["q_proj"],
                        layers_to_transform=(2, 3)).matches(
                            "model.layers.0.self_attn.q_proj")
  d = cfg.to_dict()
  assert d["rank_pattern"] == {"model.layers.1.mlp.up_proj": 6, "q_proj": 2}
  assert d["layers_to_transform"] == [1] and d["layers_pattern"] == "layers"
  assert LoRAConfig.from_dict(d) == cfg


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules="all-linear", layers_to_transform=[0]),
     "`layers_to_transform` cannot be used when `target_modules` is a str"),
    (dict(target_modules=r".*q_proj", layers_pattern="layers",
          layers_to_transform=0),
     "`layers_to_transform` cannot be used when `target_modules` is a str"),
    (dict(layers_pattern="layers"), "`layers_pattern` needs"),
    (dict(layers_to_transform=[0, -1]), "`layers_to_transform` must be"),
    (dict(rank_pattern={"q_proj": 0}), r"`rank_pattern\['q_proj'\]` must be a "
     "positive int, got 0"),
    (dict(alpha_pattern={"q_proj": float("nan")}),
     r"`alpha_pattern\['q_proj'\]` must be a finite number > 0"),
    (dict(rank_pattern={"(q_proj": 2}), "`rank_pattern` key '\\(q_proj' is "
     "not a valid regex"),
    (dict(rank_pattern=[1, 2]), "`rank_pattern` must be a dict"),
])
def test_pattern_and_layer_options_are_checked(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoRAConfig(**kwargs)


# ---------------------------------------------------------------------------
# lora_bias: a bias on B (PEFT's `lora_B.bias`; golden case qwen2_lora_bias
# in tests/io/peft_test.py)


@pytest.mark.parametrize("kw,match", [
    (dict(lora_bias=True, use_dora=True), "not supported with DoRA"),
    (dict(lora_bias=True, init_lora_weights="gaussian"),
     "needs `init_lora_weights` True or False"),
    (dict(lora_bias=1), "`lora_bias` must be a bool"),
])
def test_lora_bias_config_checks_as_peft(kw, match):
  with pytest.raises(ValueError, match=match):
    LoRAConfig(**kw)


@pytest.mark.parametrize("make", [float_linear, q4_linear],
                         ids=["float", "nf4"])
def test_lora_bias_forward_merge_and_training(make):
  base = make()
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  zero = LoRALinear(base, LoRAConfig(r=4, lora_bias=True), rngs=nnx.Rngs(3))
  assert not np.asarray(zero.lora_B_bias[...]).any()  # PEFT's zeros
  helpers.assert_bits_equal(zero(x), base(x))
  layer = LoRALinear(base, LoRAConfig(r=4, lora_alpha=12, lora_bias=True,
                                      init_lora_weights=False),
                     rngs=nnx.Rngs(3))
  b = np.asarray(layer.lora_B_bias[...], np.float64)
  assert np.abs(b).max() <= 0.5 and np.abs(b).max() > 0  # 1/sqrt(r)
  want = reference(x, base, layer.lora_A[...], layer.lora_B[...],
                   layer.scaling) + layer.scaling * b
  got = layer(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # merged: base bias + scaling * b
  for merged in (layer.merge(requantize=False), layer.merge()):
    np.testing.assert_allclose(
        merged.bias[...], np.asarray(base.bias[...]) + layer.scaling * b,
        rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(layer.merge(requantize=False)(x), got,
                             rtol=1e-5, atol=1e-5)
  # trained with the adapters
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2),
                   argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
  assert np.asarray(grads.lora_B_bias[...]).any()


def test_lora_bias_on_a_base_without_bias_warns_and_cannot_merge():
  with pytest.warns(UserWarning, match="cannot be merged"):
    layer = LoRALinear(float_linear(bias=False),
                       LoRAConfig(r=4, lora_bias=True), rngs=nnx.Rngs(3))
  with pytest.raises(ValueError, match="no bias to fold B's bias into"):
    layer.merge()
  unload_lora(layer)  # unloading is fine
