"""Writes tests/golden/llama/: tiny random HF models + transformers outputs.

Run with the oracle venv (PyTorch + transformers, CPU is enough):

  .oracle/bin/python tests/golden/make_llama_golden.py

For each model (llama with llama3 RoPE and an untied head; qwen2 with q/k/v
biases and tied embeddings; mistral with an 8-token sliding window and an
explicit head_dim) it saves an HF folder (config.json + fp32
model.safetensors) and expected.npz:
  ids [2, 24], logits [2, 24, V]       plain batch
  short_ids [1, 15], short_logits     the second prompt, unpadded
  padded_ids [2, 24], padded_mask     left-padded batch (row 1 = short_ids)
  padded_logits                       with position_ids = cumsum(mask) - 1
  greedy [2, 10]                      generate(do_sample=False) new tokens
  inv_freq, attention_scaling         the rotary embedding's buffers
rope.npz holds inverse frequencies of more RoPE types (config json per key).

`make_llama_golden.py dynamic` writes only dynamic/ (its own VERSIONS.txt):
a llama with dynamic-NTK RoPE and max_position_embeddings=32, every
measurement on a fresh rotary embedding (transformers keeps the largest
base it has seen), expected.npz:
  ids [2, 48], logits [2, 48, V]      one pass past max_position_embeddings
  decode_ids [1, 48], decode_logits [29, V]   cache: a 20-token prefill's
                                      last logits, then 28 one-token steps
  prompt_ids [2, 26], prompt_mask     left-padded prompts of 10 and 26
  greedy [2, 20]                      generate(do_sample=False), no eos
  eos_id, greedy_eos [2, 20]          with eos_id, which ends row 1 after
                                      3 tokens (pad 0 after it); row 0
                                      goes on with positions still growing
Never imported by the tests (conftest collect_ignore).
"""

import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import modeling_rope_utils

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama")
SEQ, SHORT, NEW = 24, 15, 10

MODELS = {
    "llama3": transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                         "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "qwen2": transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, initializer_range=0.25,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "mistral": transformers.MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, sliding_window=8,
        tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
}

ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 2048},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                    "original_max_position_embeddings": 1024,
                    "mscale": 0.707, "mscale_all_dim": 1.0,
                    "beta_fast": 16, "beta_slow": 2},
}


MAX_POS = {"llama3": 65536, "yarn": 8192}


def randomize(model, gen):
  """Norm weights and biases away from 1/0, so those paths are tested."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def build_model(name, config, seed):
  """A randomized float32 eager model of `config`, saved in OUT/`name`;
  returns `(model, folder)`."""
  torch.manual_seed(seed)
  gen = torch.Generator().manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      config, dtype=torch.float32, attn_implementation="eager")
  randomize(model, gen)
  model.eval()
  folder = os.path.join(OUT, name)
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


def make_model(name, config, seed):
  model, folder = build_model(name, config, seed)

  rng = np.random.default_rng(seed)
  ids = rng.integers(3, config.vocab_size, size=(2, SEQ)).astype(np.int64)
  short = ids[1:, :SHORT].copy()
  padded = np.zeros_like(ids)
  mask = np.zeros_like(ids)
  padded[0], mask[0] = ids[0], 1
  padded[1, SEQ - SHORT:], mask[1, SEQ - SHORT:] = short[0], 1
  t = torch.from_numpy
  with torch.no_grad():
    logits = model(t(ids)).logits.numpy()
    short_logits = model(t(short)).logits.numpy()
    pos = (t(mask).cumsum(-1) - 1).clamp(min=0)
    padded_logits = model(t(padded), attention_mask=t(mask),
                          position_ids=pos).logits.numpy()
    gc = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
        pad_token_id=0, eos_token_id=None, bos_token_id=1)
    out = model.generate(t(padded), attention_mask=t(mask),
                         generation_config=gc).numpy()
  greedy = out[:, SEQ:]
  assert greedy.shape == (2, NEW), greedy.shape
  rotary = model.model.rotary_emb
  np.savez_compressed(
      os.path.join(folder, "expected.npz"), ids=ids, logits=logits,
      short_ids=short, short_logits=short_logits, padded_ids=padded,
      padded_mask=mask, padded_logits=padded_logits, greedy=greedy,
      inv_freq=rotary.inv_freq.numpy(),
      attention_scaling=np.float32(rotary.attention_scaling))
  print(name, "greedy", greedy.tolist())


def make_rope():
  arrays = {}
  for key, params in ROPE.items():
    cfg = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=64,
        num_hidden_layers=1, max_position_embeddings=MAX_POS.get(key, 4096),
        rope_parameters=dict(params))
    fn = modeling_rope_utils.ROPE_INIT_FUNCTIONS[params["rope_type"]] if (
        params["rope_type"] != "default") else (
            transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
            .compute_default_rope_parameters)
    inv, scale = fn(cfg)
    arrays[key + "/config"] = np.array(json.dumps(cfg.to_dict()))
    arrays[key + "/inv_freq"] = inv.numpy().astype(np.float32)
    arrays[key + "/attention_factor"] = np.float32(scale)
  np.savez_compressed(os.path.join(OUT, "rope.npz"), **arrays)


DYNAMIC = transformers.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=32, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                     "factor": 4.0},
    tie_word_embeddings=False, initializer_range=0.1,
    bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_dynamic(seed=7):
  model, folder = build_model("dynamic", DYNAMIC, seed)
  rotary = model.model.rotary_emb

  def fresh():  # what a newly loaded model starts from
    rotary.inv_freq = rotary.original_inv_freq.clone()
    rotary.max_seq_len_cached = rotary.original_max_seq_len

  rng = np.random.default_rng(seed)
  ids = rng.integers(3, DYNAMIC.vocab_size, size=(2, 48)).astype(np.int64)
  t = torch.from_numpy
  with torch.no_grad():
    fresh()
    logits = model(t(ids)).logits.numpy()
    fresh()
    decode_ids = ids[:1]
    out = model(t(decode_ids[:, :20]), use_cache=True)
    steps = [out.logits[0, -1].numpy()]
    cache = out.past_key_values
    for i in range(20, 48):
      out = model(t(decode_ids[:, i:i + 1]), past_key_values=cache,
                  use_cache=True)
      cache = out.past_key_values
      steps.append(out.logits[0, -1].numpy())
    prompt = np.zeros((2, 26), np.int64)
    mask = np.zeros((2, 26), np.int64)
    prompt[0, 16:], mask[0, 16:] = ids[0, :10], 1
    prompt[1], mask[1] = ids[1, :26], 1

    # No eos but the one asked for (generate would merge the model's 2 in;
    # min_new_tokens would then mask it out of the logits).
    model.generation_config.eos_token_id = None

    def greedy(eos):
      fresh()
      gc = transformers.GenerationConfig(
          do_sample=False, max_new_tokens=20, pad_token_id=0,
          eos_token_id=eos, bos_token_id=1)
      out = model.generate(t(prompt), attention_mask=t(mask),
                           generation_config=gc).numpy()[:, 26:]
      return np.pad(out, ((0, 0), (0, 20 - out.shape[1])))

    plain = greedy(None)
    eos_id = int(plain[1, 2])
    assert eos_id not in plain[1, :2] and eos_id not in plain[0], plain
    with_eos = greedy(eos_id)
    assert (with_eos[1, 3:] == 0).all() and with_eos[1, 2] == eos_id
  np.savez_compressed(
      os.path.join(folder, "expected.npz"), ids=ids, logits=logits,
      decode_ids=decode_ids, decode_logits=np.stack(steps),
      prompt_ids=prompt, prompt_mask=mask, greedy=plain,
      eos_id=np.int64(eos_id), greedy_eos=with_eos)
  with open(os.path.join(folder, "VERSIONS.txt"), "w") as f:
    f.write(f"torch {torch.__version__}\ntransformers "
            f"{transformers.__version__}\npython {sys.version.split()[0]}\n")
  print("dynamic greedy", plain.tolist(), "eos", eos_id, with_eos.tolist())


def main():
  if sys.argv[1:] == ["dynamic"]:
    os.makedirs(OUT, exist_ok=True)
    make_dynamic()
    return
  os.makedirs(OUT, exist_ok=True)
  for seed, (name, config) in enumerate(MODELS.items()):
    make_model(name, config, seed)
  make_rope()
  with open(os.path.join(OUT, "VERSIONS.txt"), "w") as f:
    f.write(f"torch {torch.__version__}\ntransformers "
            f"{transformers.__version__}\npython {sys.version.split()[0]}\n")


if __name__ == "__main__":
  main()
