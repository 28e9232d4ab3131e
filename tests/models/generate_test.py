"""Tests for `jaxbnb._src.models.generate` on tiny random and golden models."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxbnb._src.models import generate as gen_lib
from jaxbnb._src.models.generate import GenerationConfig, generate
from jaxbnb._src.models.llama import LlamaForCausalLM
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.layers.quant_config import QuantizationConfig

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden",
                      "llama")
CFG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=(), initializer_range=0.3)
PROMPTS = [[5, 17, 3, 40, 2, 9, 11], [60, 1], [33, 34, 35, 36]]


@pytest.fixture(scope="module")
def model():
  return LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def gen(model):
  # The Generator `generate(model, ...)` uses, so compiled code is shared.
  return gen_lib._generator_for(model)


def naive_greedy(model, prompts, n, width=32):
  """Full recompute, no cache: the reference for greedy decoding.

  The sequence sits right-padded in a fixed `width` buffer (one compile);
  causal attention makes the padding after position `len - 1` irrelevant.
  """
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0])
  out = []
  for prompt in prompts:
    ids = list(prompt)
    for _ in range(n):
      buf = np.zeros((1, width), np.int32)
      buf[0, :len(ids)] = ids
      logits = forward(state, jnp.asarray(buf))
      ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
    out.append(ids[len(prompt):])
  return out


@pytest.fixture(scope="module")
def reference(model):
  return naive_greedy(model, PROMPTS, 9)


def test_greedy_matches_naive_loop_and_batching(gen, reference):
  batched = gen.generate(PROMPTS, max_new_tokens=9)
  assert batched.sequences == reference
  assert batched.new_tokens == 27 and batched.prompt_tokens == 13
  for p, want in zip(PROMPTS, reference):
    assert gen.generate([p], max_new_tokens=9).sequences == [want]
  assert batched.prefill_seconds > 0 and batched.decode_seconds > 0
  assert batched.tokens_per_second > 0


def test_no_recompile_on_same_shapes(gen):
  gen.generate(PROMPTS, max_new_tokens=9)
  before = gen.num_compiles
  # Same batch; prompt lengths in the same bucket; other traced options.
  gen.generate([[1, 2], [3], [4, 5, 6, 7, 8]], max_new_tokens=7,
               top_k=3, pad_token_id=1, seed=4)
  gen.generate(PROMPTS, max_new_tokens=9, repetition_penalty=1.0)
  assert gen.num_compiles == before


def test_stop_tokens_end_rows(gen, reference):
  stop = reference[0][3]
  assert stop not in reference[0][:3]
  out = gen.generate(PROMPTS, max_new_tokens=9, stop_token_ids=[stop])
  for got, full in zip(out.sequences, reference):
    want = full[:full.index(stop)] if stop in full else full
    assert got == want
  assert out.new_tokens == sum(map(len, out.sequences))
  # A stop as the very first token gives an empty row.
  first = reference[1][0]
  out = gen.generate([PROMPTS[1]], max_new_tokens=9, stop_token_ids=[first])
  assert out.sequences == [[]] and out.new_tokens == 0


def test_default_stop_is_model_eos(reference):
  seq = reference[0]
  stop = seq[2]
  # Same weights (same rngs), but the config names `stop` as EOS.
  m = LlamaForCausalLM(dataclasses.replace(CFG, eos_token_id=(stop,)),
                       rngs=nnx.Rngs(0))
  out = generate(m, PROMPTS[:1], max_new_tokens=9)
  assert out.sequences == [seq[:seq.index(stop)]]


def test_sampling_seeds(gen, reference):
  kw = dict(max_new_tokens=9, do_sample=True, temperature=1.5)
  a = gen.generate(PROMPTS, seed=1, **kw).sequences
  assert gen.generate(PROMPTS, seed=1, **kw).sequences == a
  assert gen.generate(PROMPTS, seed=2, **kw).sequences != a
  # top_k=1 sampling is greedy.
  assert gen.generate(PROMPTS, seed=3, top_k=1, **kw).sequences == reference
  # So are top_p=0 (only the most likely token survives) and a temperature
  # near 0: the options reach every step, not only the first.
  assert gen.generate(PROMPTS, seed=3, top_p=0.0, **kw).sequences == reference
  assert gen.generate(PROMPTS, seed=3, max_new_tokens=9, do_sample=True,
                      temperature=1e-5).sequences == reference


def test_each_sampling_step_draws_with_its_own_key():
  # Uniform logits (a zero output head): a key reused at every step would
  # repeat one token for the whole sequence.
  flat = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
  head = flat.lm_head if flat.lm_head is not None else flat.model.embed_tokens
  head.weight[...] = jnp.zeros_like(head.weight[...])
  out = generate(flat, PROMPTS, max_new_tokens=9, do_sample=True, seed=1)
  assert all(len(set(seq)) > 1 for seq in out.sequences), out.sequences


def test_repetition_penalty_changes_output(gen, reference):
  out = gen.generate(PROMPTS, max_new_tokens=9, repetition_penalty=1e4)
  for p, seq in zip(PROMPTS, out.sequences):
    assert len(set(seq)) == len(seq)  # huge penalty: no repeats
    assert not set(seq) & set(p)
  assert out.sequences != reference or all(
      len(set(r)) == len(r) for r in reference)


def test_stream_deltas_concatenate_to_sequences(gen, reference):
  calls = []
  out = gen.generate(PROMPTS, max_new_tokens=9, stream=calls.append)
  assert len(calls) >= 3  # the prefill's token, then chunks of 4
  assert all(len(c) == len(PROMPTS) for c in calls)
  joined = [sum((c[b] for c in calls), []) for b in range(len(PROMPTS))]
  assert joined == out.sequences == reference


def test_generate_caches_generator_per_model(model):
  generate(model, [[1, 2, 3]], max_new_tokens=3)
  g = gen_lib._GENERATORS[model]
  n = g.num_compiles
  generate(model, [[4, 5]], max_new_tokens=3)
  assert gen_lib._GENERATORS[model] is g and g.num_compiles == n


def test_quantized_model_generates():
  quant = QuantizationConfig.nf4(double_quant=True, compute_dtype="float32")
  cfg = dataclasses.replace(CFG, num_hidden_layers=1)
  m = LlamaForCausalLM(cfg, quantization=quant, rngs=nnx.Rngs(0))
  want = naive_greedy(m, PROMPTS[:1], 5)
  assert generate(m, PROMPTS[:1], max_new_tokens=5).sequences == want


# A fixed list, not a glob: a missing fixture must fail, never vanish from
# the parametrization.
FAMILIES = ["llama3", "mistral", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_greedy(family):
  folder = os.path.join(GOLDEN, family)
  for f in ("config.json", "model.safetensors", "expected.npz"):
    assert os.path.isfile(os.path.join(folder, f)), (
        f"golden fixture {family}/{f} is missing "
        "(tests/golden/make_llama_golden.py)")
  m, exp = _golden_model(family)
  prompts = [row[mask.astype(bool)].tolist()
             for row, mask in zip(exp["padded_ids"], exp["padded_mask"])]
  out = generate(m, prompts, max_new_tokens=exp["greedy"].shape[1],
                 stop_token_ids=())
  assert out.sequences == exp["greedy"].tolist()


def _golden_model(family):
  folder = os.path.join(GOLDEN, family)
  with open(os.path.join(folder, "config.json")) as f:
    cfg = LlamaConfig.from_hf(json.load(f))
  m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  for name, var in m.iter_variables():
    var.set_value(jnp.asarray(tensors[name]))
  return m, np.load(os.path.join(folder, "expected.npz"))


def test_dynamic_rope_greedy_past_max_position_matches_transformers():
  # Left-padded prompts of 10 and 26 tokens, 20 new: past
  # max_position_embeddings=32 the NTK base follows the batch's largest
  # position. With eos, row 1 stops after 3 tokens; transformers keeps
  # feeding it (pad, positions growing), so row 0's base keeps growing too.
  m, exp = _golden_model("dynamic")
  prompts = [row[mask.astype(bool)].tolist()
             for row, mask in zip(exp["prompt_ids"], exp["prompt_mask"])]
  out = generate(m, prompts, max_new_tokens=20, stop_token_ids=())
  assert out.sequences == exp["greedy"].tolist()
  eos = int(exp["eos_id"])
  out = generate(m, prompts, max_new_tokens=20, stop_token_ids=(eos,))
  want = exp["greedy_eos"]
  assert want[1, 2] == eos and out.sequences[1] == want[1, :2].tolist()
  assert out.sequences[0] == want[0].tolist()


@pytest.mark.parametrize("kw,field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(max_length=1), "max_length"),
    # past int32 (token ids and counts) or int64 (the seed): refused here,
    # not an OverflowError deep inside
    (dict(max_new_tokens=2**31), "max_new_tokens"),
    (dict(top_k=2**31), "top_k"),
    (dict(pad_token_id=10**10), "pad_token_id"),
    (dict(stop_token_ids=[2**31]), "stop_token_ids"),
    (dict(seed=2**64), "seed"),
    (dict(max_length=2**31), "max_length"),
])
def test_config_validation(kw, field):
  with pytest.raises(ValueError, match=f"`{field}`"):
    GenerationConfig(**kw)


def test_config_normalizes_stop_ids():
  assert GenerationConfig(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
  assert GenerationConfig(stop_token_ids=5).stop_token_ids == (5,)
  assert GenerationConfig(temperature=0.0).temperature == 0.0  # greedy: ok


def test_pad_token_id_must_be_in_the_vocabulary(gen):
  # Prompts are left-padded to a bucket: an id outside the vocabulary would
  # look up NaN rows that reach every logit (tokens 0, 0, ...).
  vocab = gen.config.vocab_size
  with pytest.raises(ValueError, match=rf"`pad_token_id` must be a token id "
                     rf"in \[0, {vocab}\), got {vocab}"):
    gen.generate(PROMPTS, max_new_tokens=2, pad_token_id=vocab)


def test_bad_arguments(gen):
  with pytest.raises(TypeError, match="unknown generation options"):
    gen.generate(PROMPTS, max_new_token=3)
  with pytest.raises(TypeError, match="wrap a single prompt"):
    gen.generate([1, 2, 3])
  with pytest.raises(ValueError, match=r"`prompts\[1\]` is empty"):
    gen.generate([[1], []])
  with pytest.raises(ValueError, match="outside"):
    gen.generate([[1, 96]])
  with pytest.raises(ValueError, match="max_length"):
    gen.generate([[1, 2, 3]], max_new_tokens=8, max_length=10)
  with pytest.raises(TypeError, match="config"):
    gen.generate([[1]], config={"max_new_tokens": 3})


def test_explicit_max_length(gen, reference):
  # 7-token prompt + 9 new tokens in exactly 16 slots (no bucketing).
  out = gen.generate(PROMPTS, max_new_tokens=9, max_length=16)
  assert out.sequences == reference


def test_benchmark_decode(gen):
  r = gen.benchmark_decode(batch=2, prompt_len=5, steps=3, reps=2)
  assert r["batch"] == 2 and r["steps"] == 3 and len(r["decode_samples_s"]) == 2
  assert r["tokens_per_s"] == pytest.approx(2 * 3 / r["decode_s"])
  n = gen.num_compiles
  gen.benchmark_decode(batch=2, prompt_len=5, steps=3, reps=1)
  assert gen.num_compiles == n


def test_kernel_mode_is_part_of_the_compile_cache_key(model):
  """A program traced under one kernel mode is not reused under another."""
  import jaxbnb  # pylint: disable=import-outside-toplevel
  g = gen_lib.Generator(model)
  g.generate([[1, 2, 3]], max_new_tokens=2)
  n = g.num_compiles
  with jaxbnb.kernel_mode("reference"):
    g.generate([[1, 2, 3]], max_new_tokens=2)
  assert g.num_compiles > n
  m = g.num_compiles
  with jaxbnb.kernel_mode("reference"):
    g.generate([[1, 2, 3]], max_new_tokens=2)
  assert g.num_compiles == m


def _bf16_model(hidden, heads, kv_heads, param_dtype, seed):
  """(config, model): CFG with heads of 32, bf16 compute."""
  cfg = dataclasses.replace(CFG, hidden_size=hidden, intermediate_size=96,
                            num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=32)
  return cfg, LlamaForCausalLM(cfg, dtype=jnp.bfloat16,
                               param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def _spy(monkeypatch, owner, name, record):
  """Wraps `owner.name` to append `record(args, kwargs)` of each call to
  the list it returns."""
  calls, real = [], getattr(owner, name)
  monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(
      record(a, kw)) or real(*a, **kw))
  return calls


def test_decode_attention_kernel_matches_einsum_path(monkeypatch):
  """In a kernel mode, one-token decode steps attend through the Pallas
  kernel (`models/decode_kernel.py`; interpreted here, compiled in
  tests/models/gpu_test.py). On a bf16 model with grouped heads and a
  left-padded batch, teacher-forced steps give the einsum path's logits
  within a few bf16 ulps (the kernel's online softmax rounds other
  intermediates) and the first layer's cache bit for bit; `generate`
  runs through it, and `JAXBNB_ATTENTION=xla` turns it off."""
  import jaxbnb  # pylint: disable=import-outside-toplevel
  from jaxbnb._src.models import decode_kernel  # pylint: disable=import-outside-toplevel
  from jaxbnb._src.models.kv_cache import KVCache  # pylint: disable=import-outside-toplevel
  cfg, model = _bf16_model(128, 4, 2, jnp.bfloat16, seed=1)
  layers = _spy(monkeypatch, decode_kernel.kernel, "decode_attention",
                lambda a, kw: kw["layer"])
  ids = jnp.asarray([[0, 0, 5, 17, 3], [60, 1, 33, 34, 35]], jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  forced = jnp.asarray([[7, 9, 11, 13], [2, 4, 6, 8]], jnp.int32)

  def steps(mode):
    with jaxbnb.kernel_mode(mode):
      cache = KVCache.init(cfg, batch=2, max_len=12, dtype=jnp.bfloat16)
      _, cache = jax.jit(lambda c: model(ids, cache=c, attention_mask=mask))(
          cache)
      step = jax.jit(lambda tok, c: model(tok, cache=c))
      out = []
      for i in range(forced.shape[1]):
        logits, cache = step(forced[:, i:i + 1], cache)
        out.append(np.asarray(logits[:, 0], np.float32))
      return np.stack(out), cache

  got, got_cache = steps("interpret")
  assert sorted(set(layers)) == [0, 1]
  want, want_cache = steps("reference")
  # bf16 hidden states: the logits' ulp near their largest value is 2**-8
  # of it; 3e-2 is ~8 such ulps. A wrong mask, slot or RoPE moves them by
  # O(1).
  assert np.abs(got - want).max() < 3e-2 * np.abs(want).max()
  np.testing.assert_array_equal(np.asarray(got_cache.k[0], np.float32),
                                np.asarray(want_cache.k[0], np.float32))
  np.testing.assert_array_equal(np.asarray(got_cache.v[0], np.float32),
                                np.asarray(want_cache.v[0], np.float32))
  layers.clear()
  with jaxbnb.kernel_mode("interpret"):
    out = gen_lib.Generator(model).generate(PROMPTS, max_new_tokens=4)
  assert sorted(set(layers)) == [0, 1]
  assert [len(s) for s in out.sequences] == [4] * len(PROMPTS)
  with jaxbnb.kernel_mode("interpret"):  # what the kernel does not take
    assert decode_kernel.mode(jnp.bfloat16, 32, jnp.bfloat16, 2)
    assert decode_kernel.mode(jnp.bfloat16, 32, jnp.bfloat16, 32) is None
    assert decode_kernel.mode(jnp.bfloat16, 48, jnp.bfloat16, 2) is None
    assert decode_kernel.mode(jnp.float32, 32, jnp.float32, 2) is None
  monkeypatch.setenv("JAXBNB_ATTENTION", "fast")
  with pytest.raises(ValueError,
                     match="JAXBNB_ATTENTION must be .* got 'fast'"):
    decode_kernel.mode(jnp.bfloat16, 32, jnp.bfloat16, 2)
  layers.clear()
  monkeypatch.setenv("JAXBNB_ATTENTION", "xla")
  with jaxbnb.kernel_mode("interpret"):
    gen_lib.Generator(model).generate(PROMPTS, max_new_tokens=2)
  assert not layers


def test_rms_norm_kernel_at_one_row(monkeypatch):
  """In a kernel mode the one-row decode steps run every RMSNorm through
  the Pallas kernel (`models/norm_kernel.py`; interpreted here, compiled
  in tests/models/gpu_test.py): greedy tokens as the reference path's, and
  the teacher-forced logits within a few bf16 ulps; rows of 2 or more
  (prefill, batches) keep XLA's norm; the gradient through the kernel is
  the reference formula's."""
  import jaxbnb  # pylint: disable=import-outside-toplevel
  from jaxbnb._src.models import llama  # pylint: disable=import-outside-toplevel
  from jaxbnb._src.models import norm_kernel  # pylint: disable=import-outside-toplevel
  cfg, model = _bf16_model(64, 2, 1, jnp.float32, seed=3)
  calls = _spy(monkeypatch, norm_kernel.kernel, "rms_norm",
               lambda a, kw: a[0].shape)
  prompt = [[5, 17, 3, 40, 2]]

  def run(mode):
    with jaxbnb.kernel_mode(mode):
      return gen_lib.Generator(model).generate(prompt, max_new_tokens=5)

  got = run("interpret")
  # 2 layers x 2 norms + the final norm, traced once for the decode step
  assert calls and set(calls) == {(1, 64)}
  assert len(calls) == 2 * cfg.num_hidden_layers + 1
  calls.clear()
  want = run("reference")
  assert not calls
  assert got.sequences == want.sequences
  with jaxbnb.kernel_mode("interpret"):  # two rows: XLA's norm
    gen_lib.Generator(model).generate(prompt * 2, max_new_tokens=2)
  assert not calls

  norm = llama.RMSNorm(64, eps=1e-6, param_dtype=jnp.float32)
  norm.weight[...] = 1 + 0.1 * jnp.arange(64, dtype=jnp.float32) / 64
  x = jnp.linspace(-3, 2, 64, dtype=jnp.float32).reshape(1, 1, 64)

  def loss(norm, x):
    return jnp.sum(norm(x.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)

  grads = {}
  for mode in ("interpret", "reference"):
    calls.clear()
    with jaxbnb.kernel_mode(mode):
      g_norm, g_x = nnx.grad(loss, argnums=(0, 1))(norm, x)
    assert bool(calls) == (mode == "interpret")
    grads[mode] = (np.asarray(g_norm.weight[...]), np.asarray(g_x))
  for a, b in zip(grads["interpret"], grads["reference"]):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-3 * np.abs(b).max())


def test_attention_switch_is_part_of_the_compile_cache_key(monkeypatch):
  """`JAXBNB_ATTENTION` is read while the decode loop is traced, so a
  `Generator` compiles again when it changes (and reuses each program when
  it changes back); a bad value is an error before anything runs."""
  import jaxbnb  # pylint: disable=import-outside-toplevel
  from jaxbnb._src.models import decode_kernel  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(CFG, hidden_size=64, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32)
  model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           rngs=nnx.Rngs(3))
  calls = []
  real = decode_kernel.kernel.decode_attention
  monkeypatch.setattr(decode_kernel.kernel, "decode_attention",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  gen = gen_lib.Generator(model)
  prompts = [[5, 17, 3]]
  with jaxbnb.kernel_mode("interpret"):
    kernel_out = gen.generate(prompts, max_new_tokens=3)
    compiles = gen.num_compiles
    assert calls
    calls.clear()
    monkeypatch.setenv("JAXBNB_ATTENTION", "xla")
    xla_out = gen.generate(prompts, max_new_tokens=3)
    assert gen.num_compiles > compiles and not calls
    compiles = gen.num_compiles
    monkeypatch.setenv("JAXBNB_ATTENTION", "auto")
    again = gen.generate(prompts, max_new_tokens=3)
    assert gen.num_compiles == compiles
    monkeypatch.setenv("JAXBNB_ATTENTION", "fast")
    with pytest.raises(ValueError, match="JAXBNB_ATTENTION must be"):
      gen.generate(prompts, max_new_tokens=3)
  assert again.sequences == kernel_out.sequences
  assert len(xla_out.sequences[0]) == 3
