"""The `jaxbnb` command line.

Errors are one line on stderr, `jaxbnb <command>: error: <message>`:

* a bad argument, or a checkpoint, text or file the command cannot use
  (`ValueError`, `TypeError`, `NotImplementedError`, `KeyError`, `OSError`,
  `ImportError` of an optional package): exit status 2;
* anything else (a bug): exit status 1;
* Ctrl-C: `jaxbnb <command>: interrupted`, exit status 130;
* SIGTERM (`kill`, `timeout`, a job scheduler): `jaxbnb <command>:
  terminated`, exit status 143. It is raised as an exception in the command
  (as Ctrl-C is), so the same cleanup runs: a save removes its temporary
  folder and leaves the old one, `finetune` removes an output folder it
  created that holds no checkpoint yet. Only SIGKILL skips that.

`jaxbnb --debug ...` (the flag may also follow the command) or
`JAXBNB_DEBUG=1` prints the full traceback as well.

Compiled programs are kept in JAX's persistent compilation cache
(`~/.cache/jaxbnb/jax`; `JAXBNB_COMPILATION_CACHE=PATH` or `off`, see
`compile_cache`), so the next run of a command skips most of its compile.

Several hosts: start the same command once per host with `jaxbnb
--coordinator HOST:PORT --num-processes N --process-id I <command> ...`
(or the environment variables `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); `jax.distributed.initialize` then
joins every process's devices, and `--mesh` lays out all of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import traceback

from flax import nnx
import jax
import jax.numpy as jnp

import jaxbnb
from jaxbnb import convert
from jaxbnb import functional as F
from jaxbnb import lora
from jaxbnb import models
from jaxbnb import nnx as jaxbnb_nnx
from jaxbnb import train
# The well-known model names of `jaxbnb estimate` have no public name.
from jaxbnb._src.io import estimate as estimate_lib
# What a save writes (its quantization_config, the default dtypes) and the
# early check that DST is writable have no public name either.
from jaxbnb._src.io import convert as convert_lib
from jaxbnb._src.io import paths
from jaxbnb._src.layers import lora_bias
from jaxbnb._src.layers import modules_to_save
from jaxbnb._src.models import tensor_parallel
# The output-folder rules of `finetune`, checked before the model loads.
from jaxbnb._src.train import loop as train_loop
from jaxbnb._src.train import mesh as train_mesh
from jaxbnb._src.tools import argtypes
from jaxbnb._src.tools import bench
from jaxbnb._src.tools import compile_cache
from jaxbnb._src.tools import demo as demo_lib
from jaxbnb._src.tools.model_source import ModelSource

__all__ = ["USER_ERRORS", "build_parser", "distributed_options",
           "error_message", "folder_bytes", "main"]

# Exceptions that report a bad input (an argument, a checkpoint, a text
# file) or a missing optional package: one line and exit status 2.
USER_ERRORS = (ValueError, TypeError, NotImplementedError, KeyError, OSError,
               ImportError)
EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class _Terminated(KeyboardInterrupt):
  """SIGTERM, raised in the main thread: a `KeyboardInterrupt`, so every
  cleanup that runs for Ctrl-C (`except BaseException`, `finally`) runs."""


@contextlib.contextmanager
def _sigterm_raises():
  """Within: SIGTERM raises `_Terminated` (once; a second SIGTERM during
  the cleanup is ignored). The previous handler is restored on exit."""
  if threading.current_thread() is not threading.main_thread():
    yield  # signal handlers can only be set from the main thread
    return

  def handler(signum, frame):
    del signum, frame
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
    raise _Terminated()

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _demo(args: argparse.Namespace) -> int:
  """Quantizes a random weight matrix and reports bytes and error."""
  dtype = jnp.dtype(args.dtype)
  key = jax.random.key(args.seed)
  w = (jax.random.normal(key, (args.rows, args.cols), jnp.float32)
       / jnp.sqrt(args.cols)).astype(dtype)
  print(f"jaxbnb quant-demo on {jax.devices()[0].platform}: weight "
        f"[{args.rows}, {args.cols}] {dtype.name}")
  print(f"{'format':<22}{'bytes':>14}{'ratio':>8}{'mean|err|':>12}"
        f"{'rel err':>10}{'time':>9}")
  base = jaxbnb_nnx.memory_footprint(w)
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
      nbytes = jaxbnb_nnx.memory_footprint(q)
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


# The 4-bit options: None when not given, so --quant int8 can refuse them.
_4BIT_OPTIONS = (("double_quant", "--double-quant/--no-double-quant", True),
                 ("blocksize", "--blocksize", 64),
                 ("compute_dtype", "--compute-dtype", "bfloat16"))
_INT8_THRESHOLD = 6.0  # transformers' llm_int8_threshold default


def _add_quant_args(p: argparse.ArgumentParser, default: str) -> None:
  # None when not given: a bitsandbytes checkpoint then loads as stored.
  p.set_defaults(quant_default=default)
  p.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"],
                 default=None,
                 help=f"quantize linear layers while loading: 4-bit nf4 / "
                 f"fp4, or LLM.int8 rows (int8) (default {default}; a "
                 "bitsandbytes checkpoint loads as stored)")
  p.add_argument("--double-quant", action=argparse.BooleanOptionalAction,
                 default=None,
                 help="double-quantize the 4-bit absmax (default on)")
  p.add_argument("--blocksize", type=argtypes.blocksize_4bit(), default=None,
                 help="4-bit block size (default 64)")
  p.add_argument("--compute-dtype", choices=_DTYPES, default=None,
                 help="dtype of the 4-bit matmuls (default bfloat16)")
  p.add_argument("--int8-threshold", type=argtypes.number(float, 0),
                 default=None,
                 help="LLM.int8 outlier threshold on the activations, with "
                 f"--quant int8 (default {_INT8_THRESHOLD:g}, as transformers"
                 "; 0: no outlier columns)")
  p.add_argument("--dtype", choices=_DTYPES, default=None,
                 help="dtype of the float weights and activations (default: "
                 "the checkpoint's)")


def _check_quant_args(args) -> None:
  """Refuses options of the other quantization; fills in the defaults."""
  if args.quant is None:
    args.quant = args.quant_default
  if args.quant == "int8":
    given = [flag for attr, flag, _ in _4BIT_OPTIONS
             if getattr(args, attr) is not None]
    if given:
      raise _UsageError(
          f"argument {given[0]}: applies to 4-bit quantization (--quant nf4 "
          "or fp4), not --quant int8 (LLM.int8 rows have no blocks; its "
          "option is --int8-threshold)")
  elif args.int8_threshold is not None:
    raise _UsageError(
        f"argument --int8-threshold: needs --quant int8 (got --quant "
        f"{args.quant})")
  # (Filled for the chosen quantization only, so checking again passes.)
  if args.quant == "int8":
    if args.int8_threshold is None:
      args.int8_threshold = _INT8_THRESHOLD
    return
  for attr, _, default in _4BIT_OPTIONS:
    if getattr(args, attr) is None:
      setattr(args, attr, default)


def _quantization(args):
  _check_quant_args(args)
  if args.quant == "none":
    return None
  if args.quant == "int8":
    return models.QuantizationConfig(
        load_in_8bit=True, llm_int8_threshold=args.int8_threshold)
  try:
    return models.QuantizationConfig(
        load_in_4bit=True, bnb_4bit_quant_type=args.quant,
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=args.compute_dtype,
        bnb_4bit_blocksize=args.blocksize)
  except ValueError as e:
    raise _UsageError(f"argument --blocksize: {e}") from e


def _load_model(args, path: str, mesh=None, arg: str = "MODEL"):
  _check_prequantized(args, path, arg)
  dtype = args.dtype
  return convert.from_pretrained(path, quantization=_quantization(args),
                                 dtype=dtype, param_dtype=dtype,
                                 progress=not args.quiet, mesh=mesh)


def _load_tokenizer(path: str, arg: str):
  try:
    return convert.load_tokenizer(path)
  except (ValueError, NotImplementedError, OSError) as e:
    raise _UsageError(f"argument {arg}: no usable tokenizer: {e}") from e


def _check_destination(src: str, dst: str, overwrite: bool,
                       arg: str = "DST", src_arg: str = "SRC") -> None:
  """Refuses DST early, before a long load, where saving would fail.

  `jaxbnb.convert.save_pretrained` makes the same checks (and is the
  authority); these only spare loading the model first.
  """
  if os.path.isfile(dst):
    raise _UsageError(f"argument {arg}: {dst!r} is a file, not a folder")
  src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
  if os.path.commonpath([src_real, dst_real]) in (src_real, dst_real):
    raise _UsageError(f"argument {arg}: {dst!r} is, contains or lies inside "
                      f"{src_arg} {src!r}; choose another output folder")
  if not overwrite and os.path.isdir(dst) and os.listdir(dst):
    raise _UsageError(f"argument {arg}: folder {dst!r} is not empty; pass "
                      "--overwrite to replace the model in it")
  _check_writable(dst, arg)


def _check_writable(dst: str, arg: str) -> None:
  """Refuses a DST where the save's temporary folder cannot be created
  (a read-only file system, no permission), before the model loads."""
  try:
    paths.check_writable(dst)
  except OSError as e:
    raise _UsageError(
        f"argument {arg}: cannot write {dst!r}: {error_message(e)}") from e


def folder_bytes(path: str | os.PathLike) -> int:
  """Sum of the sizes of the files in folder `path` and its subfolders.

  Examples:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...   with open(os.path.join(d, "a.bin"), "wb") as f:
    ...     _ = f.write(b"1234")
    ...   folder_bytes(d)
    4
  """
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      if not os.path.islink(full):
        total += os.path.getsize(full)
  return total


def _convert(args) -> int:
  src = _existing(args.src, "SRC")
  _check_destination(src, args.dst, args.overwrite)
  t0 = time.perf_counter()
  model = _load_model(args, src, arg="SRC")  # option errors before the load
  _save_with_tokenizer(model, src, args.dst, args)
  note = ", as stored in SRC" if args.prequantized else ""
  print(f"wrote {args.dst} ({_describe_written(model)}{note}; "
        f"{folder_bytes(args.dst) / 2**20:,.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s")
  return 0


def _stored_quantization(path: str) -> dict | None:
  """`checkpoint_info(path)["quantization"]` of a bitsandbytes checkpoint
  (read from its headers), else None."""
  try:
    q = convert.checkpoint_info(path).get("quantization")
  except (ValueError, NotImplementedError, KeyError, OSError):
    return None  # the load reports an unusable checkpoint itself
  return q if q and q.get("method") == "bitsandbytes" else None


def _check_prequantized(args, path: str, arg: str) -> None:
  """Sets `args.prequantized`: whether `path` is a bitsandbytes checkpoint,
  which loads as stored. Then the quantization options not given are the
  checkpoint's (so only what the user passed can conflict), and a --quant
  that cannot apply is refused before the load, naming what was passed."""
  args.prequantized = False
  q = _stored_quantization(path)
  if q is None:
    return
  args.prequantized = True
  stored = "int8" if q["bits"] == 8 else q.get("quant_type")
  if args.quant not in (None, "none", stored):
    what = "LLM.int8" if q["bits"] == 8 else f"4-bit {stored}"
    raise _UsageError(
        f"argument --quant: {args.quant} cannot apply: {arg} {path!r} is "
        f"already quantized (a bitsandbytes {what} checkpoint), which loads "
        f"as stored and cannot be quantized again; omit --quant (or pass "
        f"--quant {stored}) to keep its quantization, or start from the "
        "float checkpoint it was made from")
  if args.quant in (None, "none"):
    # Not asked for: as stored (no quantization to check against).
    args.quant = "none"
    if args.double_quant is None and args.blocksize is None and (
        args.int8_threshold is None) and args.compute_dtype is None:
      return
    args.quant = stored  # an option was passed: check it against the file
  if stored == "int8":
    if args.int8_threshold is None:
      args.int8_threshold = q.get("threshold", _INT8_THRESHOLD)
    return
  for attr, key in (("double_quant", "double_quant"),
                    ("blocksize", "blocksize"),
                    ("compute_dtype", "compute_dtype")):
    if getattr(args, attr) is None and q.get(key) is not None:
      setattr(args, attr, q[key])


def _save_with_tokenizer(model, tokenizer_src, out, args) -> None:
  """`save_pretrained` into `out`, plus the tokenizer of `tokenizer_src`."""
  try:
    tok = convert.load_tokenizer(tokenizer_src)
  except (ValueError, NotImplementedError, OSError) as e:
    tok = None
    print(f"warning: no tokenizer copied ({e})", file=sys.stderr)
  # The tokenizer goes into the temporary folder too: an interrupted save
  # leaves no model folder without its tokenizer.
  convert.save_pretrained(model, out, overwrite=args.overwrite,
                          progress=not args.quiet, tokenizer=tok)


def _describe_written(model) -> str:
  """What `save_pretrained(model)` wrote: "float bfloat16", "int8,
  threshold 6" or e.g. "nf4 + double quant, blocksize 64" (its
  `quantization_config`, not the options asked for)."""
  q = convert_lib.saved_quantization(model)
  if q is None:
    return f"float {jnp.dtype(model.param_dtype).name}"
  if q.load_in_8bit:
    return f"int8, threshold {q.llm_int8_threshold:g}"
  dq = " + double quant" if q.bnb_4bit_use_double_quant else ""
  return f"{q.bnb_4bit_quant_type}{dq}, blocksize {q.bnb_4bit_blocksize}"


def _parse_mesh(args):
  """`--mesh` as a `Mesh` over every device of every process (or None)."""
  if args.mesh is None:
    return None
  try:
    return convert.parse_mesh(args.mesh)
  except ValueError as e:
    raise _UsageError(f"argument {error_message(e)}") from e


def _generate(args) -> int:
  path = _existing(args.model, "MODEL")
  mesh = _parse_mesh(args)
  _check_mesh_heads(path, mesh)
  # On several processes every one runs the same program; one prints.
  main_process = jax.process_index() == 0
  tok = _load_tokenizer(path, "MODEL")
  chat = args.chat
  if chat is None:
    chat = bool(getattr(tok, "chat_template", None))
  elif chat and not getattr(tok, "chat_template", None):
    raise _UsageError("argument --chat: the tokenizer has no chat template")
  if args.system is not None and not chat:
    raise _UsageError("argument --system: needs --chat")
  if args.adapter is not None:
    _adapter_folder(args.adapter)
  if args.temperature == 0 and (args.top_k != 0 or args.top_p != 1.0):
    # As transformers warns: the filters shape sampling, greedy ignores them.
    print("warning: --top-k/--top-p apply only when sampling "
          "(--temperature > 0); decoding greedily", file=sys.stderr)
  model = _load_model(args, path, mesh=mesh)
  if args.adapter is not None:
    model = _apply_adapter(model, args.adapter)
  stream = None
  if args.stream and main_process:
    stream = lambda text: print(text, end="", flush=True)
  try:
    result = models.generate_text(
        model, tok, args.prompt, chat=chat, system=args.system,
        stream=stream, return_result=True,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  except (TypeError, ValueError) as e:
    raise _UsageError(str(e)) from e
  if not main_process:
    return 0
  if args.stream:
    print()
  else:
    print(result.texts[0])
  print(f"[{result.new_tokens} new tokens, prompt {result.prompt_tokens}; "
        f"compile {result.compile_seconds:.1f} s, "
        f"prefill {result.prefill_seconds:.2f} s, decode "
        f"{result.tokens_per_second:.1f} tok/s]", file=sys.stderr)
  return 0


def _adapter_folder(path: str) -> str:
  """Checks that --adapter is a PEFT adapter folder (before a long load)."""
  if not os.path.isdir(path):
    raise _UsageError(f"argument --adapter: {path!r} is not a folder")
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    if not os.path.isfile(os.path.join(path, name)):
      raise _UsageError(f"argument --adapter: {path!r} has no {name}")
  return path


def _apply_adapter(model, path: str):
  """`lora.load_adapter`, its errors as `argument --adapter` errors."""
  try:
    return lora.load_adapter(model, path)
  except (ValueError, NotImplementedError, OSError) as e:
    raise _UsageError(f"argument --adapter: {error_message(e)}") from e


def _read_text(path: str, arg: str) -> str:
  """The UTF-8 text of file `path`; a usage error names what is wrong."""
  if not os.path.isfile(path):
    raise _UsageError(f"argument {arg}: {path!r} is not a file")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _UsageError(
        f"argument {arg}: {path!r} is not UTF-8 text (byte "
        f"0x{data[e.start]:02x} at offset {e.start} is not valid UTF-8; "
        "convert it, e.g. with iconv -t UTF-8)") from e
  if not data:
    raise _UsageError(f"argument {arg}: {path!r} is empty")
  if not text.strip():
    raise _UsageError(f"argument {arg}: {path!r} holds only whitespace")
  return text


def _eval(args) -> int:
  path = _existing(args.model, "MODEL")
  if args.stride is not None and not 1 <= args.stride <= args.window:
    raise _UsageError(f"argument --stride: expected an integer in "
                      f"[1, --window={args.window}], got {args.stride}")
  text = _read_text(args.text, "--text")
  tok = _load_tokenizer(path, "MODEL")
  model = _load_model(args, path)
  try:
    r = models.evaluate_text(model, tok, text, max_tokens=args.max_tokens,
                      window=args.window, stride=args.stride,
                      batch_size=args.batch_size, progress=not args.quiet)
  except ValueError as e:
    raise _UsageError(f"argument --text: {args.text!r}: {e}") from e
  print(f"perplexity {r.perplexity:.4f} (nll {r.nll:.4f}/token, "
        f"{r.num_tokens:,} tokens scored, {r.num_windows} windows of "
        f"{args.window}, stride {args.stride or args.window}; "
        f"{r.seconds:.1f} s)")
  return 0


def _estimate(args) -> int:
  known = estimate_lib.KNOWN_MODELS
  target = args.model
  if target.lower() not in known:
    if not os.path.exists(target):
      raise _UsageError(
          f"argument MODEL_OR_NAME: {target!r} is neither a path nor a known "
          f"model ({', '.join(known)})")
    if os.path.isdir(target):
      _existing(target, "MODEL_OR_NAME")
  try:
    e = models.estimate_memory(target, blocksize=args.blocksize,
                        headroom=args.headroom)
  except (ValueError, FileNotFoundError) as err:
    raise _UsageError(f"argument MODEL_OR_NAME: {err}") from err
  print(e.to_markdown(tokens=args.tokens, batch=args.batch))
  if args.train:
    weights = {"qlora": "nf4+dq", "lora": "bf16"}[args.train]
    t = models.estimate_training_memory(
        target, weights=weights, batch=args.batch, seq=args.seq,
        lora_r=args.lora_r, blocksize=args.blocksize)
    print(f"\n{args.train} training step ({weights} base, LoRA r "
          f"{args.lora_r} on the 7 projections, batch {args.batch} x "
          f"{args.seq}, gradient checkpointing, paged 8-bit AdamW):\n")
    print(t.to_markdown())
  return 0


def _info(args) -> int:
  path = _existing(args.checkpoint, "CHECKPOINT")
  info = convert.checkpoint_info(path)
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
  sizes = info.get("bytes_by_dtype") or {}
  if by_dtype:
    print("  tensors by dtype: " + ", ".join(
        f"{k}: {v} ({sizes.get(k, 0) / 2**20:,.1f} MiB)"
        for k, v in by_dtype.items()))
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

  int_from = lambda lo: argtypes.number(int, lo)
  model_help = "an HF model folder or a .gguf file"
  p = add("convert", _convert,
          "load a model (HF folder or .gguf), quantize it, save it in "
          "HF + bitsandbytes format with its tokenizer")
  p.add_argument("src", metavar="SRC", help=model_help)
  p.add_argument("dst", metavar="DST", help="output folder")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing model folder at DST")
  _add_quant_args(p, "nf4")

  p = add("generate", _generate, "generate text from a prompt",
          ("model", "MODEL", model_help))
  p.add_argument("--prompt", required=True)
  p.add_argument("--chat", action=argparse.BooleanOptionalAction,
                 default=None, help="apply the chat template (default: when "
                 "the tokenizer has one)")
  p.add_argument("--system", default=None, help="system message (chat)")
  p.add_argument("--max-new-tokens", type=argtypes.number(int, 1, 2**31 - 1),
                 default=128)
  p.add_argument("--temperature", type=argtypes.number(float, 0),
                 default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-k", type=argtypes.number(int, 0, 2**31 - 1),
                 default=0,
                 help="sample among the k most likely tokens (0: all); "
                 "only with --temperature > 0")
  p.add_argument("--top-p", type=argtypes.number(float, 0, 1, lo_open=True),
                 default=1.0, help="sample among the most likely tokens "
                 "of total probability p, in (0, 1] (default 1: all); only "
                 "with --temperature > 0")
  p.add_argument("--seed", type=argtypes.number(int, 0, 2**63 - 1),
                 default=0)
  p.add_argument("--stream", action=argparse.BooleanOptionalAction,
                 default=False, help="print text as it is generated")
  p.add_argument("--adapter", metavar="DIR", default=None,
                 help="apply this PEFT LoRA adapter folder (e.g. written by "
                 "`jaxbnb finetune`) to the model")
  p.add_argument("--mesh", default=None, metavar="AXES",
                 help="decode tensor-parallel on a device mesh, e.g. "
                 "'tensor=2' (the KV cache and every linear split over "
                 "'tensor', batch rows over 'data'); the sizes multiply to "
                 "the number of devices of all processes (see "
                 "docs/distributed.md)")
  _add_quant_args(p, "none")

  p = add("eval", _eval, "perplexity of a model on a text file",
          ("model", "MODEL", model_help))
  p.add_argument("--text", required=True, help="UTF-8 text file")
  p.add_argument("--window", type=int_from(2), default=1024)
  p.add_argument("--stride", type=int_from(1), default=None,
                 help="default: --window (non-overlapping windows)")
  p.add_argument("--max-tokens", type=int_from(2), default=None)
  p.add_argument("--batch-size", type=int_from(1), default=1)
  _add_quant_args(p, "none")

  p = add("estimate", _estimate,
          "weight memory per format and which GPUs fit",
          ("model", "MODEL_OR_NAME",
           "a model folder, config.json, .gguf file or a known name"))
  # The bounds estimate_memory checks, so a bad value names its flag.
  p.add_argument("--blocksize",
                 type=argtypes.blocksize_4bit(),
                 default=64, help="4-bit block size (default 64)")
  p.add_argument("--headroom", type=argtypes.number(float, 1), default=1.2,
                 help="multiplier on the weights for GPU fit, >= 1 "
                 "(default 1.2)")
  p.add_argument("--tokens", type=int_from(0), default=0,
                 help="add a bf16 KV cache of this many tokens")
  p.add_argument("--batch", type=int_from(1), default=1,
                 help="sequences (KV cache and --train)")
  p.add_argument("--train", choices=("qlora", "lora"), default=None,
                 help="also predict a LoRA training step's peak memory on "
                 "an NF4 + double quant (qlora) or bf16 (lora) base")
  p.add_argument("--seq", type=int_from(1), default=2048,
                 help="tokens per sequence for --train (default 2048)")
  p.add_argument("--lora-r", type=int_from(1), default=16,
                 help="adapter rank for --train (default 16)")

  p = add("info", _info, "describe a checkpoint without loading it",
          ("checkpoint", "CHECKPOINT", model_help))
  p.add_argument("--json", action="store_true", help="print JSON")


# ---------------------------------------------------------------------------
# Fine-tuning commands: finetune, merge.


def _module_names(text: str) -> tuple[str, ...]:
  """`--modules-to-save`: module names separated by commas."""
  names = tuple(t.strip() for t in text.split(","))
  if not all(re.fullmatch(r"[\w.]+", n) for n in names):
    raise ValueError(f"expected module names separated by commas (e.g. "
                     f"lm_head), got {text!r}")
  return names


def parse_targets(text: str) -> str | tuple[str, ...]:
  r"""`--target`: "all-linear", comma-separated module names, or a regex.

  Names (letters, digits, "_" and ".") select a module whose path equals
  one or ends with "." + it, as PEFT's list form; anything else is a regex
  that must match the whole module path.

  Examples:
    >>> parse_targets("q_proj,v_proj"), parse_targets("all-linear")
    (('q_proj', 'v_proj'), 'all-linear')
    >>> parse_targets(r".*\.(q|v)_proj")
    '.*\\.(q|v)_proj'
  """
  text = text.strip()
  if text.lower() == "all-linear":
    return "all-linear"
  if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", text):
    return tuple(t.strip() for t in text.split(","))
  try:
    re.compile(text)
  except re.error as e:
    raise ValueError(f"expected all-linear, module names separated by "
                     f"commas, or a regex; {text!r} is not a valid regex "
                     f"({e})") from None
  return text


def _checkpoint_config(path: str) -> models.LlamaConfig | None:
  """The checkpoint's config, read without its weights (None if unusable:
  from_pretrained reports that itself)."""
  try:
    return models.LlamaConfig.from_hf(convert.open_checkpoint(path).config)
  except (ValueError, NotImplementedError, KeyError):
    return None


def _check_mesh_heads(path: str, mesh) -> None:
  """Refuses a --mesh tensor axis that does not divide the heads, before
  the weights load."""
  cfg = None if mesh is None else _checkpoint_config(path)
  if cfg is not None:
    try:
      tensor_parallel.check_mesh(mesh, cfg, "argument --mesh")
    except ValueError as e:
      raise _UsageError(error_message(e)) from e


def _check_seq_len(path: str, seq_len: int) -> None:
  """Refuses --seq-len beyond the checkpoint's context, before loading."""
  cfg = _checkpoint_config(path)
  if cfg is None:
    return
  if seq_len > cfg.max_position_embeddings:
    raise _UsageError(
        f"argument --seq-len: {seq_len} exceeds the model's "
        f"max_position_embeddings ({cfg.max_position_embeddings})")


def _finetune_mesh(args):
  """`--mesh` as a `Mesh` (None without it), checked against
  `--batch-size` before anything loads."""
  mesh = _parse_mesh(args)
  if mesh is None:
    return None
  try:
    train_mesh.check_batch_size(args.batch_size, mesh,
                                prefix="argument --batch-size: ")
  except ValueError as e:
    raise _UsageError(error_message(e)) from e
  return mesh


# TrainConfig / LoRAConfig fields and the finetune flags that set them.
_FINETUNE_FLAGS = {
    "steps": "--steps", "batch_size": "--batch-size", "seq_len": "--seq-len",
    "learning_rate": "--lr", "warmup_steps": "--warmup",
    "weight_decay": "--weight-decay", "max_grad_norm": "--max-grad-norm",
    "grad_accum": "--grad-accum", "seed": "--seed",
    "eval_every": "--eval-every", "log_every": "--log-every",
    "save_every": "--save-every", "eval_split": "--eval-split",
    "remat": "--remat", "optimizer": "--optimizer", "r": "--lora-r",
    "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
    "target_modules": "--target", "modules_to_save": "--modules-to-save",
    "bias": "--lora-bias",
    "base_model_name_or_path": "--base-model-name",
}


def _name_the_flag(message: str) -> str:
  """A config's error in the flags' words: `argument --warmup: ...`, the
  first field it names as its flag, every named field spelled as a flag."""
  fields = [f for f in re.findall(r"`(\w+)`", message)
            if f in _FINETUNE_FLAGS]
  if not fields:
    return message
  message = re.sub(r"^\w+: ", "", message)  # "TrainConfig: "
  for f in fields:
    message = message.replace(f"`{f}`", _FINETUNE_FLAGS[f])
  return f"argument {_FINETUNE_FLAGS[fields[0]]}: {message}"


def _finetune(args) -> int:
  path = _existing(args.model, "MODEL")
  mesh = _finetune_mesh(args)
  try:
    data = train.read_data(args.data)
  except (ValueError, OSError) as e:
    raise _UsageError(f"argument --data: {error_message(e)}") from e
  try:
    lora_cfg = lora.LoRAConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=args.target,
        modules_to_save=args.modules_to_save, bias=args.lora_bias,
        base_model_name_or_path=args.base_model_name)
    cfg = train.TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        learning_rate=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        grad_accum=args.grad_accum, seed=args.seed,
        eval_every=args.eval_every, log_every=args.log_every,
        save_every=args.save_every, eval_split=args.eval_split,
        remat=args.remat, optimizer=args.optimizer)
  except (ValueError, NotImplementedError) as e:
    raise _UsageError(_name_the_flag(error_message(e))) from e
  if args.resume and args.overwrite:
    raise _UsageError("argument --resume: not allowed with --overwrite")
  try:
    train_loop.check_out_dir(args.out, resume=args.resume,
                             overwrite=args.overwrite)
  except (ValueError, OSError) as e:
    raise _UsageError(f"argument --out: {error_message(e)}") from e
  _check_seq_len(path, args.seq_len)
  tok = _load_tokenizer(path, "MODEL")
  # The data tokenized and split before the (slow) model load, so that
  # data too small for --eval-split is refused at once.
  try:
    data = train.prepare_data(tok, data, cfg.seq_len)
  except ValueError as e:
    raise _UsageError(f"argument --data: {error_message(e)}") from e
  try:
    data.split(cfg.eval_split)
  except ValueError as e:
    raise _UsageError(f"argument --eval-split: {error_message(e)}") from e
  # on a mesh, each device reads and quantizes only its shard of the base
  model = _load_model(args, path, mesh=mesh)
  try:
    targets = lora.find_targets(model, lora_cfg)
  except ValueError as e:
    raise _UsageError(f"argument --target: {error_message(e)}") from e
  try:
    modules_to_save.find_modules_to_save(
        model, lora_cfg.modules_to_save, targets, fn="finetune")
  except (ValueError, NotImplementedError) as e:
    raise _UsageError(
        f"argument --modules-to-save: {error_message(e)}") from e
  result = train.finetune(
      model, tok, data, cfg, lora_cfg, args.out, resume=args.resume,
      overwrite=args.overwrite, rngs=nnx.Rngs(args.seed),
      progress=not args.quiet, mesh=mesh)
  done = (f"steps {result.start_step + 1}-{cfg.steps}" if result.steps
          else "nothing left to train")
  line = f"wrote the adapter to {result.out_dir} ({done}"
  if result.losses:
    line += f"; loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
  if len(result.evals) >= 2:
    line += (f"; held-out perplexity {result.evals[0][2]:.3f} -> "
             f"{result.evals[-1][2]:.3f}")
  elif result.evals:
    line += f"; held-out perplexity {result.evals[-1][2]:.3f}"
  if jax.process_index() == 0:  # on several processes, one reports
    print(line + f"; {result.seconds:.1f} s)")
  return 0


def _quantized_model_error(path: str) -> _UsageError:
  """The refusal of a quantized MODEL: a merge needs the float weights."""
  return _UsageError(
      f"argument MODEL: {path!r} is a quantized checkpoint; merge into the "
      "float model it was made from (then --quant to quantize the result)")


def _merge(args) -> int:
  path = _existing(args.model, "MODEL")
  _adapter_folder(args.adapter)
  _check_destination(path, args.out, args.overwrite, "OUT", "MODEL")
  if os.path.realpath(args.out) == os.path.realpath(args.adapter):
    raise _UsageError("argument OUT: is the adapter folder; choose another "
                      "output folder")
  quantization = _quantization(args)  # option errors before the load
  if _stored_quantization(path) is not None:
    raise _quantized_model_error(path)
  t0 = time.perf_counter()
  model = convert.from_pretrained(path, dtype=args.dtype,
                                  param_dtype=args.dtype,
                                  progress=not args.quiet)
  if model.quantization is not None:
    raise _quantized_model_error(path)
  model = _apply_adapter(model, args.adapter)
  model = lora.merge_lora(model, requantize=False)
  if quantization is not None:
    # The float tensors get the dtype `jaxbnb convert MODEL --quant` gives
    # them (bfloat16 for a float32 GGUF file): merging first changes the
    # linears' values, not the model's layout.
    dtype = args.dtype or convert_lib.default_param_dtype(path,
                                                          quantizing=True)
    model = convert.from_pretrained(ModelSource(model, path),
                                    quantization=quantization, dtype=dtype,
                                    param_dtype=dtype,
                                    progress=not args.quiet)
  _save_with_tokenizer(model, path, args.out, args)
  print(f"wrote {args.out} (merged; {_describe_written(model)}; "
        f"{folder_bytes(args.out) / 2**20:,.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s")
  return 0


def _add_train_commands(sub) -> None:
  """Adds finetune and merge."""
  int_from = lambda lo: argtypes.number(int, lo)
  model_help = "an HF model folder or a .gguf file"
  help_ = ("train a LoRA/QLoRA adapter on a text or JSONL file; writes a "
           "PEFT adapter, metrics.jsonl, loss.png and checkpoints to OUT")
  p = sub.add_parser("finetune", help=help_, description=help_)
  p.add_argument("model", metavar="MODEL", help=model_help)
  p.add_argument("--data", required=True, metavar="FILE",
                 help="UTF-8 text (one document), or .jsonl with "
                 '{"messages": [...]}, {"prompt": ..., "completion": ...} '
                 'or {"text": ...} per line')
  p.add_argument("--out", required=True, metavar="DIR",
                 help="output folder")
  p.add_argument("--lora-r", type=int_from(1), default=8,
                 help="adapter rank (default 8)")
  p.add_argument("--lora-alpha", type=argtypes.number(float, 0,
                                                      lo_open=True),
                 default=16.0, help="scale numerator (default 16)")
  p.add_argument("--lora-dropout", type=argtypes.number(float, 0, 1,
                                                        hi_open=True),
                 default=0.05, help="adapter dropout (default 0.05)")
  p.add_argument("--target", type=argtypes.from_parser(parse_targets),
                 default="all-linear",
                 help="modules to adapt: all-linear (default), names "
                 "separated by commas (q_proj,v_proj) or a regex on the "
                 "module path")
  p.add_argument("--modules-to-save", type=argtypes.from_parser(_module_names),
                 default=None,
                 metavar="NAMES",
                 help="modules trained whole and saved with the adapter "
                 "(PEFT's modules_to_save), names separated by commas, "
                 "e.g. lm_head (float modules; a tied head is untied)")
  p.add_argument("--lora-bias", choices=lora_bias.BIASES,
                 default="none",
                 help="biases trained with the adapters and saved with them "
                 "(PEFT's bias): none (default), all, or lora_only (the "
                 "adapted linears')")
  p.add_argument("--steps", type=int_from(1), default=100)
  p.add_argument("--batch-size", type=int_from(1), default=4,
                 help="sequences per micro-batch (default 4)")
  p.add_argument("--seq-len", type=int_from(2), default=512,
                 help="tokens per sequence (default 512)")
  p.add_argument("--lr", type=argtypes.number(float, 0, lo_open=True),
                 default=2e-4, help="peak learning rate (default 2e-4)")
  p.add_argument("--warmup", type=int_from(0), default=0,
                 help="warmup steps before the cosine decay (default 0)")
  p.add_argument("--weight-decay", type=argtypes.number(float, 0),
                 default=0.0)
  p.add_argument("--max-grad-norm", type=argtypes.number(float, 0),
                 default=1.0, help="gradient clipping (0: none; default 1)")
  p.add_argument("--grad-accum", type=int_from(1), default=1,
                 help="micro-batches per optimizer step (default 1)")
  p.add_argument("--seed", type=int_from(0), default=0)
  p.add_argument("--eval-split", type=argtypes.number(float, 0, 1,
                                                      hi_open=True),
                 default=0.1, help="fraction held out for the evaluation "
                 "perplexity (default 0.1; 0: none)")
  p.add_argument("--eval-every", type=int_from(0), default=0,
                 help="evaluate every N steps (default 0: before and after)")
  p.add_argument("--log-every", type=int_from(1), default=1)
  p.add_argument("--save-every", type=int_from(0), default=50,
                 help="checkpoint every N steps (default 50; 0: at the end)")
  p.add_argument("--optimizer", choices=train.OPTIMIZERS,
                 default="adamw8bit")
  p.add_argument("--remat", action=argparse.BooleanOptionalAction,
                 default=False,
                 help="recompute each decoder layer in the backward pass")
  p.add_argument("--base-model-name", default=None,
                 help="base_model_name_or_path recorded in "
                 "adapter_config.json (default: MODEL)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in OUT")
  p.add_argument("--overwrite", action="store_true",
                 help="start afresh in a non-empty OUT")
  p.add_argument("--mesh", default=None, metavar="AXES",
                 help="train on a device mesh (FSDP-QLoRA), e.g. "
                 "fsdp=8 or data=2,fsdp=4 (axes data, fsdp, tensor; the "
                 "sizes must multiply to the device count): the 4-bit base, "
                 "adapters and optimizer state are split over fsdp, each "
                 "batch over data x fsdp (see docs/distributed.md)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  _add_quant_args(p, "nf4")
  p.set_defaults(func=_finetune)

  help_ = ("fold a LoRA adapter into a model and save it (float, or "
           "quantized again with --quant)")
  p = sub.add_parser("merge", help=help_, description=help_)
  p.add_argument("model", metavar="MODEL", help=model_help)
  p.add_argument("out", metavar="OUT", help="output folder")
  p.add_argument("--adapter", required=True, metavar="DIR",
                 help="the PEFT adapter folder")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing model folder at OUT")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  _add_quant_args(p, "none")
  p.set_defaults(func=_merge)


class _Parser(argparse.ArgumentParser):
  """An `ArgumentParser` whose errors are one line (no usage block)."""

  def error(self, message: str):
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
  """The `jaxbnb` argument parser with all its subcommands.

  A command-line error prints one line, `jaxbnb <command>: error: argument
  --flag: <message>`, and raises `SystemExit(2)`; `--help` shows the usage.
  """
  parser = _Parser(
      prog="jaxbnb",
      description="bitsandbytes for JAX: 4-bit and 8-bit quantization.",
      epilog="Errors print one line; --debug or JAXBNB_DEBUG=1 adds the "
      "traceback.")
  parser.add_argument("--version", action="version",
                      version=f"jaxbnb {jaxbnb.__version__}")
  parser.add_argument("--debug", action="store_true",
                      help="print the full traceback of an error (also: "
                      "JAXBNB_DEBUG=1); may also follow the command")
  dist = parser.add_argument_group(
      "several hosts", "run one process per host with the same command and "
      "these flags before it (or JAX_COORDINATOR_ADDRESS, "
      "JAX_NUM_PROCESSES, JAX_PROCESS_ID); jax.distributed joins them into "
      "one set of devices for --mesh")
  dist.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                    help="address of process 0, which every process "
                    "connects to")
  dist.add_argument("--num-processes", metavar="N", default=None,
                    type=argtypes.number(int, 1),
                    help="how many processes take part")
  dist.add_argument("--process-id", metavar="I", default=None,
                    type=argtypes.number(int, 0),
                    help="this process's index, 0 ... N-1")
  sub = parser.add_subparsers(dest="command", required=True)
  demo_lib.add_demo_parser(sub)
  demo = sub.add_parser(
      "quant-demo",
      help="quantize a random weight matrix; show bytes and error")
  demo.add_argument("--rows", type=argtypes.number(int, 1), default=4096)
  demo.add_argument("--cols", type=argtypes.number(int, 1), default=4096)
  demo.add_argument("--dtype", default="bfloat16",
                    choices=["float32", "float16", "bfloat16"])
  demo.add_argument("--blocksize", type=argtypes.blocksize_4bit(), default=64)
  demo.add_argument("--batch", type=argtypes.number(int, 1), default=8)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(func=_demo)
  bench.add_parser(sub)
  _add_model_commands(sub)
  _add_train_commands(sub)
  return parser


_DIST_ENV = (("coordinator", "--coordinator", "JAX_COORDINATOR_ADDRESS"),
             ("num_processes", "--num-processes", "JAX_NUM_PROCESSES"),
             ("process_id", "--process-id", "JAX_PROCESS_ID"))


def distributed_options(args: argparse.Namespace,
                        environ=None) -> dict | None:
  """`jax.distributed.initialize` keywords from the flags or environment.

  A flag wins over its environment variable (`JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`).

  Returns:
    None when none is set (one process), else `coordinator_address`,
    `num_processes` and `process_id`.

  Raises:
    ValueError: naming the flag, for a coordinator that is not HOST:PORT,
      a process id outside [0, N), or only some of the three.
  """
  environ = os.environ if environ is None else environ
  got = {}
  for attr, flag, env in _DIST_ENV:
    value = getattr(args, attr, None)
    if value is None and environ.get(env, "").strip():
      value = environ[env].strip()
      if attr != "coordinator":
        if not re.fullmatch(r"[0-9]+", value):
          raise ValueError(f"{flag}: expected an integer from {env}, "
                           f"received {value!r}.")
        value = int(value)
    got[attr] = value
  if all(v is None for v in got.values()):
    return None
  missing = [flag for attr, flag, _ in _DIST_ENV if got[attr] is None]
  if missing:
    raise ValueError(
        f"{missing[0]}: several processes need --coordinator, "
        "--num-processes and --process-id together (or "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); "
        f"missing {', '.join(missing)}.")
  if not re.fullmatch(r"\S+:[0-9]+", got["coordinator"]):
    raise ValueError(f"--coordinator: expected HOST:PORT, received "
                     f"{got['coordinator']!r}.")
  if got["num_processes"] < 1:
    raise ValueError(f"--num-processes: expected an integer >= 1, received "
                     f"{got['num_processes']}.")
  if not 0 <= got["process_id"] < got["num_processes"]:
    raise ValueError(
        f"--process-id: expected 0 ... {got['num_processes'] - 1} (for "
        f"--num-processes {got['num_processes']}), received "
        f"{got['process_id']}.")
  return {"coordinator_address": got["coordinator"],
          "num_processes": got["num_processes"],
          "process_id": got["process_id"]}


def _debug_from_env() -> bool:
  return os.environ.get("JAXBNB_DEBUG", "").strip().lower() not in (
      "", "0", "false", "no", "off")


def error_message(e: BaseException) -> str:
  """One line saying what went wrong, without the exception's type.

  Examples:
    >>> error_message(KeyError("no tensor 'w'"))
    "no tensor 'w'"
    >>> error_message(FileNotFoundError(2, "No such file or directory", "x"))
    "No such file or directory: 'x'"
    >>> error_message(ValueError("two\\n  lines"))
    'two lines'
  """
  if isinstance(e, OSError) and e.strerror and e.filename is not None:
    text = f"{e.strerror}: {e.filename!r}"
  elif isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  else:
    text = str(e)
  text = " ".join(line.strip() for line in text.splitlines() if line.strip())
  return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `jaxbnb` console script.

  Args:
    argv: the arguments after `jaxbnb` (default: `sys.argv[1:]`).

  Returns:
    The exit status: 0, or 2 for a bad argument or input, 1 for an
    unexpected error. Either error prints one line on stderr (see the module
    docstring).

  Raises:
    SystemExit: from argparse (status 2 for a bad command line, 0 for
      `--help`), with status 130 on Ctrl-C and 143 on SIGTERM.
  """
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  # `--debug` is a global flag; after the command it is accepted too.
  unknown = [a for a in extra if a != "--debug"]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  debug = args.debug or bool(extra) or _debug_from_env()
  prog = f"jaxbnb {args.command}"
  try:
    dist = distributed_options(args)
  except ValueError as e:
    parser.error(f"argument {error_message(e)}")
  try:
    with _sigterm_raises():
      if dist is not None:
        jax.distributed.initialize(**dist)
      compile_cache.enable()
      return args.func(args)
  except _Terminated:
    _print_error(f"{prog}: terminated", debug)
    raise SystemExit(EXIT_TERMINATED) from None
  except KeyboardInterrupt:
    _print_error(f"{prog}: interrupted", debug)
    raise SystemExit(EXIT_INTERRUPTED) from None
  except (_UsageError, *USER_ERRORS) as e:
    _print_error(f"{prog}: error: {error_message(e)}", debug)
    return EXIT_USAGE
  except Exception as e:  # pylint: disable=broad-except
    hint = "" if debug else " (unexpected: --debug shows the traceback)"
    _print_error(f"{prog}: error: {type(e).__name__}: {error_message(e)}"
                 + hint, debug)
    return EXIT_INTERNAL


def _print_error(line: str, debug: bool) -> None:
  """Prints `line` on stderr, after the traceback being handled if `debug`."""
  sys.stdout.flush()
  if debug:
    traceback.print_exc()
  print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
  sys.exit(main())
