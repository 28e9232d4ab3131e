"""Regenerates the tiny bitsandbytes-quantized Llama fixtures (tests/io).

Run with torch, transformers and bitsandbytes (>= 0.48, CPU backend is
enough) importable; jaxbnb is never imported here:

  python tests/golden/make_bnb_llama_golden.py --out tests/golden/bnb_llama

Run it on a CUDA machine (`--device cuda`, the default when CUDA is
available) for fixtures that jaxbnb's quantize-on-load must match bit for bit;
bitsandbytes' CPU backend rounds a few codes differently and the tests then
only bound the differences (VERSIONS.txt records the device).

It writes, for a tiny random `LlamaForCausalLM` (hidden 128, 2 layers):
  * ``orig/``: the unquantized bf16 folder (`save_pretrained`), with
    ``logits.npz`` from the float torch model on fixed input ids.
  * ``nf4_dq_bf16/``: ``orig`` loaded by transformers with
    ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute bf16)`` and
    saved again (bnb 4-bit checkpoint format).
  * ``fp4_fp32/``: ``orig`` loaded in float32, fp4, no double quant, compute
    fp32.
  * ``nf4_bf16storage_tied/``: a second random model with tied embeddings,
    nf4 + double quant with ``bnb_4bit_quant_storage=bfloat16``.
Each quantized folder also holds ``logits.npz`` (``input_ids`` int32 [2, 8],
``logits`` float32 [2, 8, vocab]) from the bitsandbytes model.
"""

import argparse
import os
import shutil

import numpy as np
import torch
import transformers
import bitsandbytes as bnb
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

INPUT_IDS = np.array([[1, 17, 42, 99, 5, 63, 120, 7],
                      [1, 3, 88, 14, 101, 27, 56, 90]], np.int32)


def tiny_config(tie: bool) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=128, hidden_size=128, intermediate_size=256,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, rms_norm_eps=1e-5,
      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)


def logits_of(model) -> np.ndarray:
  with torch.no_grad():
    ids = torch.from_numpy(INPUT_IDS).long().to(model.device)
    out = model(ids).logits
  return out.float().cpu().numpy()


def save_logits(folder: str, logits: np.ndarray) -> None:
  np.savez(os.path.join(folder, "logits.npz"), input_ids=INPUT_IDS,
           logits=logits.astype(np.float32))


DEVICE = "cpu"


def quantize(src: str, dst: str, dtype, **bnb_kwargs) -> None:
  qcfg = BitsAndBytesConfig(load_in_4bit=True, **bnb_kwargs)
  model = AutoModelForCausalLM.from_pretrained(
      src, quantization_config=qcfg, dtype=dtype, device_map=DEVICE)
  model.save_pretrained(dst)
  save_logits(dst, logits_of(model))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="tests/golden/bnb_llama")
  parser.add_argument(
      "--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="where bitsandbytes quantizes; the tests compare bit-exactly "
      "with a cuda-made fixture, within bounds with a cpu-made one")
  args = parser.parse_args()
  global DEVICE
  DEVICE = args.device
  out = args.out
  if os.path.exists(out):
    shutil.rmtree(out)
  os.makedirs(out)

  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(tiny_config(False))
  with torch.no_grad():  # norms away from 1 so they are tested too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model = model.to(torch.bfloat16).eval()
  orig = os.path.join(out, "orig")
  model.save_pretrained(orig)
  save_logits(orig, logits_of(model))

  quantize(orig, os.path.join(out, "nf4_dq_bf16"), torch.bfloat16,
           bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.bfloat16)
  quantize(orig, os.path.join(out, "fp4_fp32"), torch.float32,
           bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
           bnb_4bit_compute_dtype=torch.float32)

  torch.manual_seed(1)
  tied = transformers.LlamaForCausalLM(tiny_config(True)).to(torch.bfloat16)
  tmp = os.path.join(out, "_tied_src")
  tied.save_pretrained(tmp)
  quantize(tmp, os.path.join(out, "nf4_bf16storage_tied"), torch.bfloat16,
           bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.bfloat16,
           bnb_4bit_quant_storage=torch.bfloat16)
  shutil.rmtree(tmp)

  with open(os.path.join(out, "VERSIONS.txt"), "w") as f:
    f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}"
            f"\nbitsandbytes {bnb.__version__}\ndevice {DEVICE}\n")


if __name__ == "__main__":
  main()
