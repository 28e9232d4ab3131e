"""LlamaForCausalLM vs transformers (tests/golden/llama, fp32 tiny models)."""

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import jaxbnb
from jaxbnb.functional import Params4bit
from jaxbnb.nnx import Linear, Linear4bit, QuantizedWeight
from jaxbnb.models import KVCache, LlamaConfig, LlamaForCausalLM
from jaxbnb.models import QuantizationConfig

GOLDEN = pathlib.Path(__file__).parent.parent / "golden" / "llama"
NAMES = ["llama3", "qwen2", "mistral"]


def _config(name) -> LlamaConfig:
  return LlamaConfig.from_hf(json.loads((GOLDEN / name / "config.json")
                                        .read_text()))


def _tensors(name) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(GOLDEN / name / "model.safetensors")


def _expected(name):
  return np.load(GOLDEN / name / "expected.npz")


def load(name, *, quantization=None, tensors=None):
  """A tiny stand-in for the converter: abstract model, then set_value."""
  cfg = _config(name)
  tensors = dict(_tensors(name) if tensors is None else tensors)
  model = nnx.eval_shape(lambda: LlamaForCausalLM(
      cfg, quantization=quantization, rngs=nnx.Rngs(0)))
  quantized = {}
  for hf_name, var in model.iter_variables():
    value = tensors.pop(hf_name)
    if isinstance(var, QuantizedWeight):
      quantized[hf_name] = (var, value)
    else:
      assert var.get_value().shape == value.shape, hf_name
      var.set_value(jnp.asarray(value))
  assert not tensors, f"unused checkpoint tensors: {sorted(tensors)}"
  if quantized:  # quantize every weight in one compiled call
    q = quantization
    packed = jax.jit(lambda ws: {n: Params4bit.from_float(
        w, quant_type=q.bnb_4bit_quant_type, blocksize=q.bnb_4bit_blocksize,
        compress_statistics=q.bnb_4bit_use_double_quant,
        quant_storage=q.quant_storage) for n, w in ws.items()})(
            {n: v for n, (_, v) in quantized.items()})
    for n, (var, _) in quantized.items():
      var.set_value(packed[n])
  return model


Q4 = QuantizationConfig.nf4(compute_dtype="float32")


@functools.lru_cache(maxsize=None)
def model4_of(name):
  return load(name, quantization=Q4)


@functools.lru_cache(maxsize=None)
def model_of(name):
  return load(name)


def _jitted(model):
  """model(...) as a jitted function of the split weights."""
  graph, state = nnx.split(model)

  @jax.jit
  def run(state, ids, cache=None, mask=None, positions=None):
    return nnx.merge(graph, state)(ids, positions=positions, cache=cache,
                                   attention_mask=mask)

  return functools.partial(run, state)


@functools.lru_cache(maxsize=None)
def run_of(name):
  return _jitted(model_of(name))


# float32 jaxbnb against float32 transformers (torch, CPU): the same math in
# another summation order. These models have <= 2 layers, K <= 128, so each
# of the ~12 float32 stages on a logit's path (embedding, 2 x (rmsnorm,
# attention with its softmax, MLP), final norm, head) is within ~sqrt(K) * u
# = 7e-7 of the exact value relative to the logit scale, i.e. ~1e-5 in all
# (observed: <= 1.2e-6 of max |logit|). A RoPE, mask, cache or GQA bug moves
# logits by O(1).
REL_FP32 = 1e-5


def _close(actual, expected, rel=REL_FP32):
  err = float(np.max(np.abs(np.asarray(actual) - expected)))
  scale = float(np.max(np.abs(expected)))
  assert err <= rel * scale, f"max abs diff {err} (scale {scale}, rel {rel})"


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  exp = _expected(name)
  ids = jnp.asarray(exp["ids"], jnp.int32)
  logits, cache = run_of(name)(ids, mask=jnp.ones_like(ids))
  assert cache is None and logits.dtype == jnp.float32
  _close(logits, exp["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_equals_unpadded_rows(name):
  exp = _expected(name)
  mask = exp["padded_mask"].astype(bool)
  logits, _ = run_of(name)(jnp.asarray(exp["padded_ids"], jnp.int32),
                           mask=jnp.asarray(mask, jnp.int32))
  logits = np.asarray(logits)
  _close(logits[mask], exp["padded_logits"][mask])
  short = exp["short_ids"].shape[1]
  _close(logits[1, -short:], exp["short_logits"][0])
  _close(logits[0], exp["logits"][0])


@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_and_greedy_tokens_match_transformers(name):
  # Prefill 12 slots of the left-padded batch, feed the rest of the prompt
  # one token at a time (the short row's first real tokens arrive inside the
  # prefill pads; the mistral window of 8 slides across the cache), then
  # decode greedily as transformers' generate(do_sample=False) did.
  exp = _expected(name)
  model = model_of(name)
  ids = jnp.asarray(exp["padded_ids"], jnp.int32)
  mask = jnp.asarray(exp["padded_mask"], jnp.int32)
  run = run_of(name)
  cache = KVCache.init(model.config, batch=2, max_len=34)
  logits, cache = run(ids[:, :12], cache, mask[:, :12])
  out = [logits]
  for t in range(12, ids.shape[1]):
    logits, cache = run(ids[:, t:t + 1], cache, mask[:, t:t + 1])
    out.append(logits)
  out = np.concatenate(out, axis=1)
  real = exp["padded_mask"].astype(bool)
  _close(out[real], exp["padded_logits"][real])
  assert int(cache.index) == ids.shape[1]
  np.testing.assert_array_equal(cache.positions, real.sum(1))
  np.testing.assert_array_equal(cache.mask[:, :ids.shape[1]], real)

  tokens = []
  for _ in range(exp["greedy"].shape[1]):
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
    tokens.append(nxt)
    logits, cache = run(nxt, cache, jnp.ones_like(nxt))
  np.testing.assert_array_equal(np.concatenate(tokens, 1), exp["greedy"])


def test_explicit_positions():
  exp = _expected("llama3")
  run = run_of("llama3")
  ids = jnp.asarray(exp["ids"], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  same, _ = run(ids, positions=pos)
  _close(same, exp["logits"])
  # RoPE is relative: a common shift keeps the logits, a stretch does not.
  # The shift costs precision: float32 angles pos * inv_freq (inv_freq <= 1)
  # are off by up to u * pos on both q and k, which moves the attention
  # scores by ~2 u max_pos relative.
  shifted, _ = run(ids, positions=pos + 100)
  max_pos = int(pos.max()) + 100
  _close(shifted, exp["logits"],
         rel=REL_FP32 + 2 * np.finfo(np.float32).eps * max_pos)
  stretched, _ = run(ids, positions=pos * 3)
  assert not np.allclose(stretched, exp["logits"], atol=1e-2)
  _close(stretched[:, 0], exp["logits"][:, 0])  # sees only itself


# -- dynamic NTK RoPE past max_position_embeddings (golden/llama/dynamic) ----


def test_dynamic_rope_logits_past_max_position_match_transformers():
  # max_position_embeddings=32, 48 tokens: the NTK base is rescaled from
  # seq_len 48 for every position of the pass (plain RoPE: off by ~1).
  exp = _expected("dynamic")
  cfg = _config("dynamic")
  assert cfg.rope_type == "dynamic" and cfg.max_position_embeddings == 32
  ids = jnp.asarray(exp["ids"], jnp.int32)
  logits, _ = run_of("dynamic")(ids)
  _close(logits, exp["logits"])
  _close(logits[:, :32], exp["logits"][:, :32])  # early rows moved too
  short, _ = run_of("dynamic")(ids[:, :32])  # within the limit: default
  assert not np.allclose(short, exp["logits"][:, :32], atol=1e-2)


def test_dynamic_rope_cached_decode_matches_transformers():
  # A 20-token prefill, then one token per step to 48: each step's token
  # gets the base of its own seq_len, cached keys keep theirs (jitted:
  # the base comes from traced positions).
  exp = _expected("dynamic")
  ids = jnp.asarray(exp["decode_ids"], jnp.int32)
  run = run_of("dynamic")
  cache = KVCache.init(_config("dynamic"), batch=1, max_len=48)
  logits, cache = run(ids[:, :20], cache)
  out = [logits[0, -1]]
  for t in range(20, 48):
    logits, cache = run(ids[:, t:t + 1], cache)
    out.append(logits[0, -1])
  _close(np.stack(out), exp["decode_logits"])


@functools.lru_cache(maxsize=None)
def dequantized_float_of(name):
  """The float model whose weights are the 4-bit model's dequantized ones."""
  m4 = model4_of(name)
  deq = jax.jit(lambda vs: {
      n: v.dequantize() if isinstance(v, Params4bit) else v
      for n, v in vs.items()})(
          {n: v.get_value() for n, v in m4.iter_variables()})
  return load(name, tensors={n: np.asarray(v) for n, v in deq.items()})


def test_4bit_model_equals_dequantized_float_model():
  name = "qwen2"  # 4-bit q/k/v with biases
  m4 = model4_of(name)
  linears = dict(m4.named_linears())
  assert isinstance(linears["model.layers.0.self_attn.q_proj"], Linear4bit)
  m_float = dequantized_float_of(name)
  exp = _expected(name)
  ids = jnp.asarray(exp["ids"], jnp.int32)
  # The reference path (the one a CPU runs; on a GPU the fused kernels
  # add in another order, within the matmul bound tested elsewhere).
  with jaxbnb.kernel_mode("reference"):
    l4, _ = _jitted(m4)(ids)
  lf, _ = _jitted(m_float)(ids)
  # The 4-bit linear (dequantize to float32, then the same HIGHEST-precision
  # dot as the float Linear, same shapes) computes exactly what the float
  # layer computes with the dequantized weight: bit-identical logits.
  np.testing.assert_array_equal(np.asarray(l4), np.asarray(lf))
  # ... and 4-bit really changed the weights (the logits move).
  assert not np.allclose(l4, exp["logits"], atol=1e-3)


def test_4bit_abstract_model_and_grads():
  cfg = _config("qwen2")
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(
      cfg, quantization=Q4, rngs=nnx.Rngs(0)))
  w = abstract.model.layers[1].mlp.down_proj.weight.get_value()
  assert isinstance(w, Params4bit) and w.quant_state.shape == (32, 64)
  assert isinstance(w.data, jax.ShapeDtypeStruct)
  untied = nnx.eval_shape(lambda: LlamaForCausalLM(
      _config("llama3"), quantization=Q4, rngs=nnx.Rngs(0)))
  assert isinstance(untied.lm_head, Linear)  # skipped by default
  assert isinstance(untied.model.layers[1].mlp.up_proj, Linear4bit)
  model = model4_of("qwen2")
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  loss = nnx.jit(nnx.grad(lambda m: m(ids)[0].std()))
  grads = loss(model)
  leaves = jax.tree.leaves(nnx.state(grads))
  assert leaves and all(jnp.issubdtype(x.dtype, jnp.floating) for x in leaves)
  assert not jax.tree.leaves(nnx.state(grads, QuantizedWeight))
  bias_grad = grads.model.layers[0].self_attn.q_proj.bias[...]
  assert float(jnp.abs(bias_grad).sum()) > 0
  # Every float parameter's gradient is the dequantized float model's
  # (the backward of a 4-bit linear is g @ W with W dequantized, as the
  # float Linear's), up to float32 summation order (REL_FP32).
  g4 = dict(nnx.to_flat_state(nnx.state(grads, nnx.Param)))
  gf = dict(nnx.to_flat_state(nnx.state(
      loss(dequantized_float_of("qwen2")), nnx.Param)))
  quantized = {n for n, v in model.iter_variables()
               if isinstance(v, QuantizedWeight)}
  assert set(gf) > set(g4)  # the float model also has the 4-bit weights
  assert len(g4) == sum(1 for _ in model.iter_variables()) - len(quantized)
  for path, g in g4.items():
    want = np.asarray(gf[path][...])
    if np.any(want):
      _close(g[...], want, rel=REL_FP32)
    else:
      np.testing.assert_array_equal(g[...], want)


def test_float_grad_matches_finite_difference():
  model = model_of("qwen2")
  ids = jnp.asarray(_expected("qwen2")["ids"][:, :8], jnp.int32)
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits, _ = nnx.merge(graph, params, rest)(ids)
    return jax.nn.logsumexp(logits, axis=-1).mean() - logits[..., 5].mean()

  direction = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  grads = jax.jit(jax.grad(loss))(params)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(
      jax.tree.leaves(grads), jax.tree.leaves(direction)))
  loss_fn = jax.jit(loss)

  def central(h):
    return float(loss_fn(jax.tree.map(lambda p, d: p + h * d, params,
                                      direction))
                 - loss_fn(jax.tree.map(lambda p, d: p - h * d, params,
                                        direction))) / (2 * h)

  eps = 1e-3
  n1, n2 = central(eps), central(eps / 2)
  analytic = float(analytic)
  # The central difference's O(h**2) truncation error dominates (3.5e-3 of
  # the value at h = 1e-3, shrinking 4x per halving); Richardson's
  # (4 N(h/2) - N(h)) / 3 cancels it. What remains is the float32 rounding
  # of the loss differences, taken as 4 ulps of the loss per difference,
  # over 2h, with Richardson's weights.
  ulp_l = float(np.spacing(np.float32(loss_fn(params))))
  rounding = (4 * (4 * ulp_l / eps) + 4 * ulp_l / (2 * eps)) / 3
  richardson = (4 * n2 - n1) / 3
  assert abs(richardson - analytic) <= rounding, (richardson, analytic,
                                                  rounding)
  assert rounding < 2e-3 * abs(analytic)  # tighter than the old 2e-2
  # The plain central difference agrees within its own truncation term.
  assert abs(n1 - analytic) <= abs(n1 - n2) * 4 / 3 * 1.5 + rounding


@pytest.mark.parametrize("name", NAMES)
def test_variable_names_and_parameter_count(name):
  tensors = _tensors(name)
  model = model_of(name)
  names = [n for n, _ in model.iter_variables()]
  assert sorted(names) == sorted(tensors)
  assert model.num_parameters() == sum(t.size for t in tensors.values())
  assert (model.lm_head is None) == model.config.tie_word_embeddings


def test_bf16_model_runs_close_to_float32():
  exp = _expected("llama3")
  m = nnx.eval_shape(lambda: LlamaForCausalLM(
      _config("llama3"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
      rngs=nnx.Rngs(0)))
  for n, var in m.iter_variables():
    var.set_value(jnp.asarray(_tensors("llama3")[n], jnp.bfloat16))
  cache = KVCache.init(m.config, 2, 30, jnp.bfloat16)
  logits, cache = _jitted(m)(jnp.asarray(exp["ids"], jnp.int32), cache)
  assert logits.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
  # bf16 weights and activations: each of the ~8 bf16 roundings on a
  # logit's path (weights, embedding, norms, attention and MLP outputs,
  # residual adds, cache) is within the bf16 unit roundoff 2**-8 relative:
  # 8 * 2**-8 = 0.031 (observed 0.015).
  _close(logits, exp["logits"], rel=8 * 2.0**-8)
  # ... and bf16 really is used (float32 would be within REL_FP32).
  assert not np.allclose(logits, exp["logits"], rtol=0,
                         atol=REL_FP32 * np.abs(exp["logits"]).max())


# -- config ------------------------------------------------------------------


def test_from_hf_reads_each_family():
  llama, qwen, mistral = (_config(n) for n in NAMES)
  assert llama.rope_type == "llama3" and not llama.tie_word_embeddings
  assert llama.rope_scaling_dict["original_max_position_embeddings"] == 64
  assert qwen.attention_bias and not qwen.o_proj_bias
  assert qwen.tie_word_embeddings and qwen.sliding_window is None
  assert qwen.rope_theta == 1e6
  assert mistral.sliding_window == 8 and mistral.head_dim == 16
  assert not mistral.attention_bias and mistral.eos_token_id == (2,)


def test_from_hf_transformers4_keys_and_architectures():
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, rope_theta=500000.0,
              max_position_embeddings=1024)
  cfg = LlamaConfig.from_hf({
      **base, "architectures": ["LlamaForCausalLM"],
      "rope_scaling": {"type": "linear", "factor": 2.0},
      "torch_dtype": "bfloat16", "eos_token_id": [5, 6]})
  assert cfg.model_type == "llama" and cfg.rope_theta == 500000.0
  assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
  assert cfg.torch_dtype == "bfloat16" and cfg.eos_token_id == (5, 6)
  cfg = LlamaConfig.from_hf({
      **base, "model_type": "llama",
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
  assert cfg.rope_scaling_dict["original_max_position_embeddings"] == 1024
  qwen = LlamaConfig.from_hf({**base, "model_type": "qwen2",
                              "use_sliding_window": True,
                              "sliding_window": 16, "max_window_layers": 1})
  assert qwen.layer_types == ("full_attention", "sliding_attention")
  assert [qwen.layer_sliding_window(i) for i in range(2)] == [None, 16]
  assert LlamaConfig.from_hf(qwen.to_hf()) == qwen
  assert hash(cfg) == hash(LlamaConfig.from_hf(cfg.to_hf()))


def test_from_hf_mistral_layer_types_and_bias_keys():
  # A Mistral config with `layer_types` is built by transformers as
  # Ministral: the window on the "sliding_attention" layers only; an
  # `mlp_bias` key is ignored by transformers for Mistral and Qwen2 (their
  # MLPs have no bias); "swish" is transformers' other name for SiLU.
  hf = json.loads((GOLDEN / "mistral" / "config.json").read_text())
  cfg = LlamaConfig.from_hf(
      {**hf, "layer_types": ["full_attention", "sliding_attention"]})
  assert [cfg.layer_sliding_window(i) for i in range(2)] == [None, 8]
  assert cfg.to_hf()["layer_types"] == ["full_attention", "sliding_attention"]
  assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
  assert LlamaConfig.from_hf({**hf, "layer_types": None}) == _config("mistral")
  for name in ("mistral", "qwen2"):
    base = json.loads((GOLDEN / name / "config.json").read_text())
    assert not LlamaConfig.from_hf({**base, "mlp_bias": True}).mlp_bias
  llama = json.loads((GOLDEN / "llama3" / "config.json").read_text())
  assert LlamaConfig.from_hf({**llama, "mlp_bias": True}).mlp_bias
  assert LlamaConfig.from_hf({**llama, "hidden_act": "swish"}).hidden_act \
      == "swish"
  with pytest.raises(NotImplementedError, match="hidden_act 'gelu'"):
    LlamaConfig.from_hf({**llama, "hidden_act": "gelu"})


def test_mistral_layer_types_set_the_window_per_layer():
  # The golden Mistral (window 8 on both layers) with `layer_types` naming
  # both layers sliding: transformers' logits; with the first layer full,
  # the logits past the window change.
  exp = _expected("mistral")
  ids = jnp.asarray(exp["ids"], jnp.int32)
  tensors = _tensors("mistral")

  def logits(layer_types):
    cfg = dataclasses.replace(_config("mistral"), layer_types=layer_types)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    for n, var in model.iter_variables():
      var.set_value(jnp.asarray(tensors[n]))
    return np.asarray(_jitted(model)(ids)[0])

  _close(logits(("sliding_attention", "sliding_attention")), exp["logits"])
  mixed = logits(("full_attention", "sliding_attention"))
  _close(mixed[:, :8], exp["logits"][:, :8])
  assert not np.allclose(mixed[:, 8:], exp["logits"][:, 8:], atol=1e-3)


# transformers 5.25 (`standardize_rope_params`, run again when the rotary
# embedding is built): for llama3 and yarn a top-level
# `original_max_position_embeddings` overwrites the rope dict's; the rope
# dict's comes next, then `max_position_embeddings`; other types ignore it.
_YARN4 = {"type": "yarn", "factor": 4.0}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0}


@pytest.mark.parametrize("extra, want", [
    (dict(original_max_position_embeddings=16, rope_scaling=_YARN4), 16),
    (dict(original_max_position_embeddings=16,
          rope_scaling={**_YARN4, "original_max_position_embeddings": 32}),
     16),
    (dict(original_max_position_embeddings=16,
          rope_parameters={"rope_type": "yarn", "factor": 4.0,
                           "rope_theta": 1e4,
                           "original_max_position_embeddings": 32}), 16),
    (dict(rope_scaling={**_YARN4, "original_max_position_embeddings": 32}),
     32),
    (dict(rope_scaling=_YARN4), 128),
    (dict(original_max_position_embeddings=16, rope_scaling=_LLAMA3), 16),
    (dict(original_max_position_embeddings=16,
          rope_scaling={"type": "dynamic", "factor": 4.0}), None),
    (dict(original_max_position_embeddings=16,
          rope_scaling={"type": "linear", "factor": 4.0}), None),
    (dict(original_max_position_embeddings=16), None),
])
def test_from_hf_original_max_position_precedence(extra, want):
  cfg = LlamaConfig.from_hf(dict(
      model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=4,
      max_position_embeddings=128, **extra))
  assert cfg.rope_scaling_dict.get("original_max_position_embeddings") == want
  assert LlamaConfig.from_hf(cfg.to_hf()) == cfg


def test_from_hf_null_top_level_original_max_position():
  # transformers fails too (None / float) when it builds the model.
  with pytest.raises(ValueError, match="original_max_position_embeddings"):
    LlamaConfig.from_hf(dict(
        model_type="llama", vocab_size=64, hidden_size=64,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        original_max_position_embeddings=None, rope_scaling=_YARN4))


@pytest.mark.parametrize("name", NAMES)
def test_to_hf_round_trips_and_transformers_reads_it(name):
  transformers = pytest.importorskip("transformers")
  cfg = _config(name)
  assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
  hf = transformers.AutoConfig.for_model(**cfg.to_hf())
  assert type(hf).__name__.lower().startswith(cfg.model_type)
  assert LlamaConfig.from_hf(hf.to_dict()) == cfg


@pytest.mark.parametrize("change, error, match", [
    ({"model_type": "gpt2"}, ValueError, "model_type 'gpt2'.*llama"),
    ({"num_key_value_heads": 3}, ValueError, "num_key_value_heads"),
    ({"hidden_size": 30}, ValueError, "hidden_size"),
    ({"hidden_act": "gelu"}, NotImplementedError, "gelu"),
    ({"rope_scaling": {"type": "yarn"}}, ValueError, "factor"),
    ({"rope_scaling": {"type": "longrope", "factor": 2}},
     NotImplementedError, "longrope"),
    ({"vocab_size": None}, ValueError, "vocab_size"),
])
def test_bad_configs(change, error, match):
  d = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
       "intermediate_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, **change}
  with pytest.raises(error, match=match):
    LlamaConfig.from_hf(d)


def test_bad_model_arguments():
  cfg = _config("mistral")
  with pytest.raises(TypeError, match="LlamaConfig"):
    LlamaForCausalLM(cfg.to_hf(), rngs=nnx.Rngs(0))
  model = model_of("mistral")
  ids = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="input_ids"):
    model(ids[0])
  with pytest.raises(ValueError, match="attention_mask"):
    model(ids, attention_mask=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="cache"):
    model(ids, cache=KVCache.init(cfg, batch=3, max_len=8))
  with pytest.raises(ValueError, match="max_len"):
    model(ids, cache=KVCache.init(cfg, batch=2, max_len=3))


@pytest.mark.parametrize("norms", [False, True])
def test_decode_mlp_runs_down_on_gate_up_partials(monkeypatch, norms):
  """With `gemv_4bit.SWIGLU_FUSED` on, at a one-row decode step of 4-bit
  bf16 layers the table GEMV serves (widths of 4096, as Llama-3-8B's), a
  layer's MLP is one `matmul_4bit_swiglu`: interpreted on the CPU, its
  logits and cache are bit for bit those of the three matmuls apart,
  which it replaces, its residual add made with down's partials' sum
  (`split_sum.add_splits`); the prefill (several rows) composes them. With
  `NORM_FUSED` on too (`norms`), the layer's two RMSNorms are made in
  the q/k/v and gate/up GEMVs' programs: the logits and cache within a
  few bf16 ulps of the unfused path (the norm kernel's sum of squares
  runs in another order)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.quant import kernels  # pylint: disable=g-import-not-at-top
  from pallas_kernels import gemv_4bit  # pylint: disable=g-import-not-at-top
  from pallas_kernels import gemv_4bit_lut  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gemv_4bit, "SWIGLU_FUSED", True)
  monkeypatch.setattr(gemv_4bit, "NORM_FUSED", norms)
  cfg = dataclasses.replace(
      _config("llama3"), vocab_size=64, hidden_size=4096,
      intermediate_size=4096, num_hidden_layers=1, num_attention_heads=32,
      num_key_value_heads=8, head_dim=128)
  model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           quantization=QuantizationConfig.nf4(
                               double_quant=True, compute_dtype="bfloat16"),
                           rngs=nnx.Rngs(5))
  layer = model.model.layers[0]
  for norm, scale in ((layer.input_layernorm, 0.3),
                      (layer.post_attention_layernorm, -0.2)):
    norm.weight[...] = (1 + scale * jnp.linspace(-1, 1, 4096)).astype(
        jnp.bfloat16)
  calls = []
  for name in ("gemv_swiglu", "gemv_group"):
    real = getattr(gemv_4bit_lut, name)
    monkeypatch.setattr(gemv_4bit_lut, name, (
        lambda *a, real=real, name=name, **kw: calls.append(
            (name, a[0].shape, kw.get("rms_norm") is not None))
        or real(*a, **kw)))
  from pallas_kernels import split_sum  # pylint: disable=g-import-not-at-top
  adds = []
  real_add = split_sum.add_splits
  monkeypatch.setattr(split_sum, "add_splits", lambda *a, **kw: (
      adds.append(a[1].shape) or real_add(*a, **kw)))
  ids = jnp.asarray([[5, 17, 3]], jnp.int32)
  graph, state = nnx.split(model)

  def decode():  # a new jitted function a call: the switches are traced
    run = jax.jit(lambda state, ids, cache: nnx.merge(graph, state)(
        ids, cache=cache))
    cache = KVCache.init(cfg, batch=1, max_len=8, dtype=jnp.bfloat16)
    _, cache = run(state, ids, cache)
    out = []
    for tok in (7, 9):
      logits, cache = run(state, jnp.asarray([[tok]], jnp.int32), cache)
      out.append(np.asarray(logits, np.float32))
    return np.stack(out), np.asarray(cache.k, np.float32)

  with jaxbnb.kernel_mode("interpret"):
    fused, fused_k = decode()
    step = {c for c in calls if c[1] == (1, 4096)}
    assert ("gemv_swiglu", (1, 4096), norms) in step, calls
    assert adds == [(1, 4096)], adds  # traced once: one layer
    adds.clear()
    # q/k/v: the group launch, its norm made in the build with NORM_FUSED
    assert [c for c in step if c[0] == "gemv_group" and c[2] == norms], calls
    calls.clear()
    monkeypatch.setattr(kernels, "swiglu_serves", lambda *a, **kw: False)
    monkeypatch.setattr(kernels, "norm_serves", lambda *a, **kw: False)
    apart, apart_k = decode()
  assert not [c for c in calls if c[0] == "gemv_swiglu" or c[2]], calls
  assert not adds, adds
  assert np.abs(fused).max() > 0
  if not norms:
    np.testing.assert_array_equal(fused, apart)
    np.testing.assert_array_equal(fused_k, apart_k)
  else:
    assert np.abs(fused - apart).max() < 3e-2 * np.abs(apart).max()
    np.testing.assert_allclose(fused_k, apart_k, rtol=2.0**-6,
                               atol=2.0**-6 * np.abs(apart_k).max())


def test_grouped_projections_share_one_gemv(monkeypatch):
  """With the kernels (interpret mode on CPU) a layer's q/k/v and its
  gate/up each take one GEMV launch (`matmul_4bit_group`); the logits are
  those of one launch per projection, up to the order of float32 sums."""
  from jaxbnb._src.models import llama  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.quant import kernels  # pylint: disable=g-import-not-at-top
  m4 = model4_of("llama3")
  ids = jnp.asarray(_expected("llama3")["ids"], jnp.int32)[:, :4]
  graph, state = nnx.split(m4)
  traced = []  # the GEMV launches each trace makes: weights per launch
  one, group = kernels.gemv, kernels.gemv_group
  monkeypatch.setattr(kernels, "gemv", lambda *a: traced.append(1) or one(*a))
  monkeypatch.setattr(kernels, "gemv_group", lambda x, ps, qss, mode: (
      traced.append(len(qss)) or group(x, ps, qss, mode)))
  run = jax.jit(lambda s, i: nnx.merge(graph, s)(i)[0])
  with jaxbnb.kernel_mode("interpret"):
    grouped, launches = run(state, ids), list(traced)
    monkeypatch.setattr(llama, "_grouped_weight", lambda layer: None)
    traced.clear()
    single = jax.jit(lambda s, i: nnx.merge(graph, s)(i)[0])(state, ids)
  layers = m4.config.num_hidden_layers
  assert sorted(launches) == sorted([3, 1, 2, 1] * layers), launches
  assert traced == [1] * 7 * layers, traced
  _close(grouped, np.asarray(single))
