"""The `jaxbnb` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
  """Quantizes a random weight matrix and reports bytes and error."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jaxbnb import functional as F  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.layers.quantize_model import memory_footprint  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(args.dtype)
  key = jax.random.key(args.seed)
  w = (jax.random.normal(key, (args.rows, args.cols), jnp.float32)
       / jnp.sqrt(args.cols)).astype(dtype)
  print(f"jaxbnb quant-demo on {jax.devices()[0].platform}: weight "
        f"[{args.rows}, {args.cols}] {dtype.name}")
  print(f"{'format':<22}{'bytes':>14}{'ratio':>8}{'mean|err|':>12}"
        f"{'rel err':>10}{'time':>9}")
  base = memory_footprint(w)
  print(f"{dtype.name:<22}{base:>14,}{1.0:>8.3f}{0.0:>12.2e}{0.0:>10.4f}"
        f"{'':>9}")
  x = jax.random.normal(jax.random.key(args.seed + 1), (args.batch, args.cols),
                        dtype)
  y_ref = x.astype(jnp.float32) @ w.astype(jnp.float32).T
  for quant_type in ("nf4", "fp4"):
    for double in (False, True):
      t0 = time.perf_counter()
      q = F.Params4bit.from_float(w, quant_type=quant_type,
                                  blocksize=args.blocksize,
                                  compress_statistics=double)
      jax.block_until_ready(q)
      elapsed = time.perf_counter() - t0
      wd = q.dequantize().astype(jnp.float32)
      err = jnp.abs(wd - w.astype(jnp.float32))
      rel = float(err.mean() / jnp.abs(w.astype(jnp.float32)).mean())
      nbytes = memory_footprint(q)
      name = f"{quant_type}{' + double quant' if double else ''}"
      print(f"{name:<22}{nbytes:>14,}{nbytes / base:>8.3f}"
            f"{float(err.mean()):>12.2e}{rel:>10.4f}{elapsed:>8.2f}s")
  q = F.Params4bit.from_float(w, quant_type="nf4", compress_statistics=True)
  y = F.matmul_4bit(x, q.data, q.quant_state)
  rel = float(jnp.linalg.norm(y.astype(jnp.float32) - y_ref)
              / jnp.linalg.norm(y_ref))
  print(f"matmul_4bit (nf4 + double quant) x[{args.batch}, {args.cols}]: "
        f"relative error {rel:.4f} vs the {dtype.name} matmul")
  return 0


# ---------------------------------------------------------------------------
# Model commands: convert, generate, eval, estimate, info.


class _UsageError(Exception):
  """A bad command-line value: one line on stderr, exit code 2."""


_DTYPES = ("float32", "float16", "bfloat16")


def _existing(path: str, arg: str, *, gguf_ok: bool = True) -> str:
  """Checks that MODEL/SRC/CHECKPOINT is an HF folder or a .gguf file."""
  import os  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise _UsageError(f"argument {arg}: {path!r} does not exist")
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise _UsageError(f"argument {arg}: folder {path!r} has no config.json")
    return path
  if gguf_ok and path.endswith(".gguf"):
    return path
  raise _UsageError(f"argument {arg}: {path!r} is neither a model folder "
                    "(with config.json) nor a .gguf file")


def _add_quant_args(p: argparse.ArgumentParser, default: str) -> None:
  p.add_argument("--quant", choices=["nf4", "fp4", "none"], default=default,
                 help=f"quantize linear layers while loading (default "
                 f"{default}; a bitsandbytes checkpoint loads as stored)")
  p.add_argument("--double-quant", action=argparse.BooleanOptionalAction,
                 default=True, help="double-quantize the 4-bit absmax")
  p.add_argument("--blocksize", type=int, default=64,
                 help="4-bit block size (default 64)")
  p.add_argument("--compute-dtype", choices=_DTYPES, default="bfloat16",
                 help="dtype of the 4-bit matmuls (default bfloat16)")
  p.add_argument("--dtype", choices=_DTYPES, default=None,
                 help="dtype of the float weights and activations (default: "
                 "the checkpoint's)")


def _quantization(args):
  if args.quant == "none":
    return None
  from jaxbnb._src.layers.quant_config import QuantizationConfig  # pylint: disable=g-import-not-at-top
  try:
    return QuantizationConfig(
        load_in_4bit=True, bnb_4bit_quant_type=args.quant,
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=args.compute_dtype,
        bnb_4bit_blocksize=args.blocksize)
  except ValueError as e:
    raise _UsageError(f"argument --blocksize: {e}") from e


def _load_model(args, path: str):
  from jaxbnb._src.io.convert import from_pretrained  # pylint: disable=g-import-not-at-top

  dtype = args.dtype
  return from_pretrained(path, quantization=_quantization(args), dtype=dtype,
                         param_dtype=dtype, progress=not args.quiet)


def _load_tokenizer(path: str, arg: str):
  from jaxbnb._src.io.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  try:
    return load_tokenizer(path)
  except (ValueError, NotImplementedError, OSError) as e:
    raise _UsageError(f"argument {arg}: no usable tokenizer: {e}") from e


def _convert(args) -> int:
  import os  # pylint: disable=g-import-not-at-top

  from jaxbnb._src.io.convert import save_pretrained  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.io.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  src = _existing(args.src, "SRC")
  if os.path.isfile(args.dst):
    raise _UsageError(f"argument DST: {args.dst!r} is a file, not a folder")
  t0 = time.perf_counter()
  model = _load_model(args, src)
  save_pretrained(model, args.dst, progress=not args.quiet)
  try:
    tok = load_tokenizer(src)
  except (ValueError, NotImplementedError, OSError) as e:
    print(f"warning: no tokenizer copied ({e})", file=sys.stderr)
  else:
    tok.save_pretrained(args.dst)
  size = sum(os.path.getsize(os.path.join(args.dst, f))
             for f in os.listdir(args.dst))
  what = "float" if args.quant == "none" else (
      f"{args.quant}{' + double quant' if args.double_quant else ''}, "
      f"blocksize {args.blocksize}")
  print(f"wrote {args.dst} ({what}; {size / 2**20:,.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s")
  return 0


def _generate(args) -> int:
  from jaxbnb._src.models.generate import generate_text  # pylint: disable=g-import-not-at-top

  path = _existing(args.model, "MODEL")
  tok = _load_tokenizer(path, "MODEL")
  chat = args.chat
  if chat is None:
    chat = bool(getattr(tok, "chat_template", None))
  elif chat and not getattr(tok, "chat_template", None):
    raise _UsageError("argument --chat: the tokenizer has no chat template")
  if args.system is not None and not chat:
    raise _UsageError("argument --system: needs --chat")
  model = _load_model(args, path)
  stream = None
  if args.stream:
    stream = lambda text: print(text, end="", flush=True)
  try:
    result = generate_text(
        model, tok, args.prompt, chat=chat, system=args.system,
        stream=stream, return_result=True,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  except (TypeError, ValueError) as e:
    raise _UsageError(str(e)) from e
  if args.stream:
    print()
  else:
    print(result.texts[0])
  print(f"[{result.new_tokens} new tokens, prompt {result.prompt_tokens}; "
        f"prefill {result.prefill_seconds:.2f} s, decode "
        f"{result.tokens_per_second:.1f} tok/s]", file=sys.stderr)
  return 0


def _eval(args) -> int:
  import os  # pylint: disable=g-import-not-at-top

  from jaxbnb._src.models.perplexity import evaluate_text  # pylint: disable=g-import-not-at-top

  path = _existing(args.model, "MODEL")
  if not os.path.isfile(args.text):
    raise _UsageError(f"argument --text: {args.text!r} is not a file")
  for name in ("window", "batch_size"):
    if getattr(args, name) < 1:
      raise _UsageError(f"argument --{name.replace('_', '-')}: must be >= 1")
  if args.stride is not None and not 1 <= args.stride <= args.window:
    raise _UsageError(f"argument --stride: must be in 1..{args.window}")
  with open(args.text, encoding="utf-8") as f:
    text = f.read()
  tok = _load_tokenizer(path, "MODEL")
  model = _load_model(args, path)
  try:
    r = evaluate_text(model, tok, text, max_tokens=args.max_tokens,
                      window=args.window, stride=args.stride,
                      batch_size=args.batch_size, progress=not args.quiet)
  except ValueError as e:
    raise _UsageError(str(e)) from e
  print(f"perplexity {r.perplexity:.4f} (nll {r.nll:.4f}/token, "
        f"{r.num_tokens:,} tokens scored, {r.num_windows} windows of "
        f"{args.window}, stride {args.stride or args.window}; "
        f"{r.seconds:.1f} s)")
  return 0


def _estimate(args) -> int:
  import os  # pylint: disable=g-import-not-at-top

  from jaxbnb._src.io.estimate import KNOWN_MODELS, estimate_memory  # pylint: disable=g-import-not-at-top

  target = args.model
  if target.lower() not in KNOWN_MODELS:
    if not os.path.exists(target):
      raise _UsageError(
          f"argument MODEL_OR_NAME: {target!r} is neither a path nor a known "
          f"model ({', '.join(KNOWN_MODELS)})")
    if os.path.isdir(target):
      _existing(target, "MODEL_OR_NAME")
  try:
    e = estimate_memory(target, blocksize=args.blocksize,
                        headroom=args.headroom)
  except (ValueError, FileNotFoundError) as err:
    raise _UsageError(f"argument MODEL_OR_NAME: {err}") from err
  print(e.to_markdown(tokens=args.tokens, batch=args.batch))
  return 0


def _info(args) -> int:
  import json  # pylint: disable=g-import-not-at-top

  from jaxbnb._src.io.convert import checkpoint_info  # pylint: disable=g-import-not-at-top

  path = _existing(args.checkpoint, "CHECKPOINT")
  info = checkpoint_info(path)
  if args.json:
    print(json.dumps(info, indent=1, default=str))
    return 0
  cfg = info.get("config") or {}
  print(f"{info.get('path', path)}")
  print(f"  architecture: {info.get('architecture')} "
        f"({info.get('model_type')}; "
        f"{'supported' if info.get('supported') else 'NOT supported'})")
  if cfg:
    print("  config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
  print(f"  parameters: {info.get('num_parameters', 0):,} in "
        f"{info.get('num_tensors', 0)} tensors, "
        f"{info.get('total_bytes', 0) / 2**20:,.1f} MiB")
  by_dtype = info.get("tensors_by_dtype") or {}
  if by_dtype:
    print("  tensors by dtype: " + ", ".join(
        f"{k}: {v}" for k, v in by_dtype.items()))
  q = info.get("quantization")
  if q:
    print("  quantization: " + ", ".join(f"{k}={v}" for k, v in q.items()))
  else:
    print("  quantization: none")
  return 0


def _add_model_commands(sub) -> None:
  """Adds convert, generate, eval, estimate and info."""
  def add(name, func, help_, model_arg=None):
    p = sub.add_parser(name, help=help_, description=help_)
    if model_arg:
      p.add_argument(model_arg[0], metavar=model_arg[1], help=model_arg[2])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=func)
    return p

  models = "an HF model folder or a .gguf file"
  p = add("convert", _convert,
          "load a model (HF folder or .gguf), quantize it, save it in "
          "HF + bitsandbytes format with its tokenizer")
  p.add_argument("src", metavar="SRC", help=models)
  p.add_argument("dst", metavar="DST", help="output folder")
  _add_quant_args(p, "nf4")

  p = add("generate", _generate, "generate text from a prompt",
          ("model", "MODEL", models))
  p.add_argument("--prompt", required=True)
  p.add_argument("--chat", action=argparse.BooleanOptionalAction,
                 default=None, help="apply the chat template (default: when "
                 "the tokenizer has one)")
  p.add_argument("--system", default=None, help="system message (chat)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0 = greedy (default)")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stream", action=argparse.BooleanOptionalAction,
                 default=False, help="print text as it is generated")
  _add_quant_args(p, "none")

  p = add("eval", _eval, "perplexity of a model on a text file",
          ("model", "MODEL", models))
  p.add_argument("--text", required=True, help="UTF-8 text file")
  p.add_argument("--window", type=int, default=1024)
  p.add_argument("--stride", type=int, default=None,
                 help="default: --window (non-overlapping windows)")
  p.add_argument("--max-tokens", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=1)
  _add_quant_args(p, "none")

  p = add("estimate", _estimate,
          "weight memory per format and which GPUs fit",
          ("model", "MODEL_OR_NAME",
           "a model folder, config.json, .gguf file or a known name"))
  p.add_argument("--blocksize", type=int, default=64)
  p.add_argument("--headroom", type=float, default=1.2,
                 help="multiplier on the weights for GPU fit (default 1.2)")
  p.add_argument("--tokens", type=int, default=0,
                 help="add a bf16 KV cache of this many tokens")
  p.add_argument("--batch", type=int, default=1)

  p = add("info", _info, "describe a checkpoint without loading it",
          ("checkpoint", "CHECKPOINT", models))
  p.add_argument("--json", action="store_true", help="print JSON")


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `jaxbnb` console script."""
  from jaxbnb import __version__  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="jaxbnb",
      description="bitsandbytes for JAX: 4-bit and 8-bit quantization.")
  parser.add_argument("--version", action="version",
                      version=f"jaxbnb {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  from jaxbnb._src.tools import demo as demo_lib  # pylint: disable=g-import-not-at-top
  demo_lib.add_demo_parser(sub)
  demo = sub.add_parser(
      "quant-demo",
      help="quantize a random weight matrix; show bytes and error")
  demo.add_argument("--rows", type=int, default=4096)
  demo.add_argument("--cols", type=int, default=4096)
  demo.add_argument("--dtype", default="bfloat16",
                    choices=["float32", "float16", "bfloat16"])
  demo.add_argument("--blocksize", type=int, default=64)
  demo.add_argument("--batch", type=int, default=8)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(func=_demo)
  from jaxbnb._src.tools import bench  # pylint: disable=g-import-not-at-top
  bench.add_parser(sub)
  _add_model_commands(sub)
  args = parser.parse_args(argv)
  for name in ("rows", "cols", "batch"):
    if getattr(args, name, 1) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  try:
    return args.func(args)
  except _UsageError as e:
    print(f"jaxbnb {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
