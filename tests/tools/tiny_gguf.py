"""Writers of tiny GGUF Llama/Qwen2 files for the tools tests (no download
needed)."""

# `gguf` is slow to import: the writer imports it where it is used.

from __future__ import annotations

import os

import numpy as np

# A tiny byte-level BPE vocabulary: 3 control tokens, the 256 byte letters,
# then a few merges.
CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'"
    " + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY = dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, eps=1e-5,
            theta=10000.0, ctx=128)


def byte_letters() -> list[str]:
  keep = (list(range(ord("!"), ord("~") + 1))
          + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100)))
  chars, extra = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return [chr(c) for _, c in sorted(zip(keep, chars))]


def tiny_tokens() -> list[str]:
  return list(CONTROL) + byte_letters() + [m.replace(" ", "") for m in MERGES]


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's conversion-time Q/K row permutation (HF -> GGUF)."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def tiny_weights(seed: int = 0, *, tied: bool = True,
                 vocab: int | None = None,
                 qkv_bias: bool = False) -> dict[str, np.ndarray]:
  """Random HF-named float32 weights for the TINY shapes (`qkv_bias`:
  q/k/v biases, as Qwen2's)."""
  c = TINY
  vocab = vocab or len(tiny_tokens())
  rng = np.random.default_rng(seed)
  hd = c["hidden"] // c["heads"]

  def mat(o, i):
    return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

  w = {"model.embed_tokens.weight": mat(vocab, c["hidden"]),
       "model.norm.weight": (1 + 0.1 * rng.standard_normal(c["hidden"]))
                            .astype(np.float32)}
  for i in range(c["layers"]):
    p = f"model.layers.{i}."
    w[p + "self_attn.q_proj.weight"] = mat(c["heads"] * hd, c["hidden"])
    w[p + "self_attn.k_proj.weight"] = mat(c["kv_heads"] * hd, c["hidden"])
    w[p + "self_attn.v_proj.weight"] = mat(c["kv_heads"] * hd, c["hidden"])
    w[p + "self_attn.o_proj.weight"] = mat(c["hidden"], c["heads"] * hd)
    if qkv_bias:
      for n, rows in (("q", c["heads"] * hd), ("k", c["kv_heads"] * hd),
                      ("v", c["kv_heads"] * hd)):
        w[p + f"self_attn.{n}_proj.bias"] = (
            0.1 * rng.standard_normal(rows)).astype(np.float32)
    w[p + "mlp.gate_proj.weight"] = mat(c["ffn"], c["hidden"])
    w[p + "mlp.up_proj.weight"] = mat(c["ffn"], c["hidden"])
    w[p + "mlp.down_proj.weight"] = mat(c["hidden"], c["ffn"])
    for n in ("input_layernorm", "post_attention_layernorm"):
      w[p + n + ".weight"] = (1 + 0.1 * rng.standard_normal(c["hidden"])
                              ).astype(np.float32)
  if not tied:
    w["lm_head.weight"] = mat(vocab, c["hidden"])
  return w


_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
  if hf.startswith("model.layers."):
    _, _, i, rest = hf.split(".", 3)
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_TO_GGUF[mod]}.{kind}"
  return {"model.embed_tokens.weight": "token_embd.weight",
          "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}[hf]


def write_tiny_gguf(path: str | os.PathLike, weights: dict[str, np.ndarray],
                    *, arch: str = "llama", q8_names=(), tokenizer=True,
                    tokenizer_model: str = "gpt2", rope_freqs=None,
                    yarn=None, f64_names=(), omit=()) -> str:
  """Writes `weights` (HF names, HF layout) as a llama.cpp-style GGUF.

  `rope_freqs`: a `rope_freqs.weight` tensor (Llama 3.x RoPE, as llama.cpp
  writes it); `yarn`: `(factor, original_context, beta_fast, beta_slow)`
  written as llama.cpp's `rope.scaling.*` keys; `f64_names`: weights
  stored as F64; `omit`: metadata left out ("context_length", "rms_eps").
  """
  import gguf  # pylint: disable=g-import-not-at-top

  c = TINY
  path = os.fspath(path)
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c["layers"])
  if "context_length" not in omit:
    w.add_context_length(c["ctx"])
  w.add_embedding_length(c["hidden"])
  w.add_feed_forward_length(c["ffn"])
  w.add_head_count(c["heads"])
  w.add_head_count_kv(c["kv_heads"])
  w.add_rope_freq_base(c["theta"])
  if "rms_eps" not in omit:
    w.add_layer_norm_rms_eps(c["eps"])
  w.add_rope_dimension_count(c["hidden"] // c["heads"])
  w.add_vocab_size(weights["model.embed_tokens.weight"].shape[0])
  if yarn is not None:
    factor, original, beta_fast, beta_slow = yarn
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(factor)
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_rope_scaling_yarn_beta_fast(beta_fast)
    w.add_rope_scaling_yarn_beta_slow(beta_slow)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
  if tokenizer:
    tokens = tiny_tokens()
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL)))
    w.add_token_merges(list(MERGES))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
  for hf, arr in weights.items():
    arr = np.asarray(arr, np.float32)
    if arch != "llama":  # llama.cpp permutes only llama's Q/K rows
      pass
    elif hf.endswith(("q_proj.weight", "q_proj.bias")):
      arr = permute(arr, c["heads"])
    elif hf.endswith(("k_proj.weight", "k_proj.bias")):
      arr = permute(arr, c["kv_heads"])
    name = gguf_name(hf)
    if hf in q8_names:
      qt = gguf.GGMLQuantizationType.Q8_0
      w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    elif hf in f64_names:
      w.add_tensor(name, arr.astype(np.float64))
    else:
      w.add_tensor(name, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
