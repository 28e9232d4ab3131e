"""Regenerates the LLM.int8 fixtures from bitsandbytes (tests/golden/bnb_int8).

Run with torch, transformers and bitsandbytes importable (jaxbnb is never
imported here), from the repository root:

  python tests/golden/make_bnb_int8_golden.py --out tests/golden/bnb_int8

It needs CUDA: on a CPU, bitsandbytes runs `Linear8bitLt` as
`MatMul8bitFp` (the weight dequantized, then a float matmul), not the int8
product with its epilogue, so a CPU-made file would not hold bitsandbytes'
LLM.int8 numerics (measured: threshold-0 outputs up to 0.3 apart, against
bit-identical CUDA outputs in tests/golden/bnb_8bit.npz). On CUDA the int8
products go through cuBLASLt and the outlier columns through a cuBLAS fp16
matmul; VERSIONS.txt records the versions and the device.

It writes:
  * ``matmul.npz``: `Linear8bitLt(has_fp16_weights=False)` forwards for
    M = 1, 5, 16 and 40 rows of fp16 and bf16 activations with planted
    outlier columns, K = 256 -> N = 96, with a bias, at thresholds 0 and 6:
    per case ``A``, ``W`` (fp16), ``bias``, ``CB``, ``SCB``, the outlier
    columns of `int8_vectorwise_quant(A.half(), 6.0)` (``cols``), and
    ``out_t0`` / ``out_t6``.
  * ``llama_int8_t6/``, ``llama_int8_t1.5/``: tests/golden/bnb_llama/orig
    loaded by transformers with `BitsAndBytesConfig(load_in_8bit=True,
    llm_int8_threshold=...)` in float16 and saved again (transformers'
    int8 checkpoint: `weight` int8, `SCB`, `weight_format`), each with
    ``logits.npz`` (``input_ids`` [2, 8], ``logits`` float32) from that
    model: what jaxbnb must compute from the saved folder and from
    quantize-on-load of ``orig``. Threshold 1.5 makes outlier columns
    common in this tiny model; 6 (transformers' default) rarely fires.
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
OUTLIER_COLS = (3, 70, 71, 200)
K, N = 256, 96


def matmul_cases(device: str) -> dict:
  out = {}
  gen = torch.Generator().manual_seed(0)
  w = (torch.randn(N, K, generator=gen) / 8).half()
  for dtype in (torch.float16, torch.bfloat16):
    for m in (1, 5, 16, 40):
      a = torch.randn(m, K, generator=gen)
      for j, c in enumerate(OUTLIER_COLS):
        a[j % m, c] = (-1) ** j * (8.0 + 5 * j)
      a = a.to(dtype)
      bias = torch.randn(N, generator=gen).to(dtype)
      key = f"{str(dtype).split('.')[-1]}_m{m}"
      cols = bnb.functional.int8_vectorwise_quant(a.half(), 6.0)[2]
      out[f"{key}/A"] = a.float().numpy()
      out[f"{key}/W"] = w.numpy()
      out[f"{key}/bias"] = bias.float().numpy()
      out[f"{key}/cols"] = (np.zeros(0, np.int64) if cols is None
                            else cols.cpu().numpy())
      for thr in (0.0, 6.0):
        lin = bnb.nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False,
                                  threshold=thr)
        lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False,
                                       has_fp16_weights=False)
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
        lin = lin.to(device)
        with torch.no_grad():
          y = lin(a.to(device))
        assert y.dtype == dtype, (y.dtype, dtype)
        out[f"{key}/out_t{thr:g}"] = y.float().cpu().numpy()
        out[f"{key}/CB"] = lin.weight.data.cpu().numpy()
        scb = lin.weight.SCB if lin.state.SCB is None else lin.state.SCB
        out[f"{key}/SCB"] = scb.cpu().numpy()
  return out


def llama_int8(src: str, dst: str, threshold: float, device: str) -> None:
  qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
  model = AutoModelForCausalLM.from_pretrained(
      src, quantization_config=qcfg, dtype=torch.float16, device_map=device)
  model.save_pretrained(dst)
  with torch.no_grad():
    ids = torch.from_numpy(INPUT_IDS).long().to(model.device)
    logits = model(ids).logits.float().cpu().numpy()
  np.savez(os.path.join(dst, "logits.npz"), input_ids=INPUT_IDS,
           logits=logits)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="tests/golden/bnb_int8")
  parser.add_argument("--src", default="tests/golden/bnb_llama/orig")
  args = parser.parse_args()
  if not torch.cuda.is_available():
    raise SystemExit("make_bnb_int8_golden.py: needs a CUDA device (see the "
                     "module docstring).")
  args.device = "cuda"
  if os.path.exists(args.out):
    shutil.rmtree(args.out)
  os.makedirs(args.out)
  np.savez_compressed(os.path.join(args.out, "matmul.npz"),
                      **matmul_cases(args.device))
  for thr in (6.0, 1.5):
    llama_int8(args.src, os.path.join(args.out, f"llama_int8_t{thr:g}"), thr,
               args.device)
  with open(os.path.join(args.out, "VERSIONS.txt"), "w") as f:
    f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}"
            f"\nbitsandbytes {bnb.__version__}\ndevice "
            f"{torch.cuda.get_device_name()}\n")


if __name__ == "__main__":
  main()
