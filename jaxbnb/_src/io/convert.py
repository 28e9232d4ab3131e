"""Loading and saving Hugging Face / bitsandbytes checkpoints.

`from_pretrained` builds a `LlamaForCausalLM` from an HF folder (float or
bitsandbytes 4-bit), or a GGUF file, streaming one tensor at a time: the
model is first built abstractly (`nnx.eval_shape`, no memory), then each
tensor is read, cast or quantized on the device, and stored, so peak host
memory stays near the final model size plus one float tensor.

`save_pretrained` writes the HF + bitsandbytes format (config.json with
`quantization_config`, safetensors with `weight.absmax`,
`weight.quant_state.bitsandbytes__nf4`, ...), which
`transformers.AutoModelForCausalLM.from_pretrained` loads with bitsandbytes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb._src.io.checkpoint_source import CheckpointSource
from jaxbnb._src.io.checkpoint_source import open_checkpoint
from jaxbnb._src.io.checkpoint_source import write_safetensors
from jaxbnb._src.models.llama import LlamaForCausalLM
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.layers.common import QuantizedWeight
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.quant.weights import Params4bit

__all__ = ["from_pretrained", "save_pretrained", "checkpoint_info",
           "parse_size"]

_QS_MARK = ".quant_state.bitsandbytes__"
# bitsandbytes' per-weight tensors besides the quant_state blob.
_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax",
                 ".nested_quant_map")
# Buffers old checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Files save_pretrained owns in a target folder (others are carried over).
_OWN_FILES = re.compile(
    r"^(config\.json|generation_config\.json|model\.safetensors(\.index\.json)?"
    r"|model-\d+-of-\d+\.safetensors)$")
# Fields a pre-quantized checkpoint fixes (compute dtype may be overridden).
_FIXED_FIELDS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                 "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage",
                 "bnb_4bit_blocksize")


# ----------------------------------------------------------------------------
# helpers


def _progress(iterable, total: int, desc: str, enabled: bool):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False)


def _as_quantization(q: Any) -> QuantizationConfig | None:
  if q is None:
    return None
  if isinstance(q, QuantizationConfig):
    return q if q.quantized else None
  if isinstance(q, Mapping):
    q = QuantizationConfig.from_dict(q)
    return q if q.quantized else None
  raise TypeError(
      "from_pretrained: `quantization` must be a QuantizationConfig, a dict "
      f"(HF quantization_config) or None, got {type(q).__name__}.")


def _dtype_or_none(d: Any, name: str):
  if d is None:
    return None
  try:
    return jnp.dtype(d.removeprefix("torch.") if isinstance(d, str) else d)
  except TypeError as e:
    raise ValueError(f"from_pretrained: `{name}` must be a dtype, got "
                     f"{d!r}.") from e


def _read_blob(src: CheckpointSource, name: str) -> dict[str, Any]:
  raw = np.asarray(src.load(name)).astype(np.uint8).tobytes()
  try:
    return json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(
        f"{src.describe(name)} is not a bitsandbytes quant_state JSON blob: "
        f"{e}") from e


@dataclasses.dataclass(frozen=True)
class _Prequant:
  """What a bitsandbytes 4-bit checkpoint holds."""

  config: QuantizationConfig
  groups: dict[str, list[str]]  # "<module>.weight" -> its extra keys


def _detect_prequantized(src: CheckpointSource) -> _Prequant | None:
  """Finds bitsandbytes quantization in the config or the tensor names."""
  names = src.names()
  qc = src.quantization_config
  if qc is not None and qc.get("quant_method", "bitsandbytes") != (
      "bitsandbytes"):
    raise ValueError(
        f"Checkpoint {src.path!r} is quantized with quant_method "
        f"{qc.get('quant_method')!r}; only bitsandbytes checkpoints (or float "
        "ones) can be loaded.")
  scb = [n for n in names if n.endswith(".SCB")]
  if scb or (qc is not None and (qc.get("load_in_8bit") or
                                 qc.get("_load_in_8bit"))):
    raise NotImplementedError(
        f"Checkpoint {src.path!r} is an LLM.int8 (8-bit bitsandbytes) "
        f"checkpoint{' (e.g. tensor ' + repr(scb[0]) + ')' if scb else ''}: "
        "LLM.int8 layers are not in jaxbnb yet. Load the float checkpoint "
        "with quantization=QuantizationConfig.nf4() instead.")
  blobs = [n for n in names if _QS_MARK in n]
  in_config = qc is not None and bool(qc.get("load_in_4bit") or
                                      qc.get("_load_in_4bit"))
  if not blobs and not in_config:
    return None
  if not blobs:
    raise ValueError(
        f"Checkpoint {src.path!r}: config.json says load_in_4bit but no "
        f"tensor has a '{_QS_MARK}nf4|fp4' entry; it is not a saved "
        "bitsandbytes 4-bit checkpoint.")
  groups: dict[str, list[str]] = {}
  for blob in blobs:
    wkey = blob[:blob.index(_QS_MARK)]
    groups[wkey] = []
  for n in names:
    if _QS_MARK in n:
      groups[n[:n.index(_QS_MARK)]].append(n)
      continue
    for suffix in _AUX_SUFFIXES:
      if n.endswith(suffix) and n[:-len(suffix)] in groups:
        groups[n[:-len(suffix)]].append(n)
        break
  first = _read_blob(src, blobs[0])
  blocksize = int(first.get("blocksize", 64))
  if in_config:
    config = QuantizationConfig.from_dict(qc)
  else:
    wkey = blobs[0][:blobs[0].index(_QS_MARK)]
    storage = np.dtype(src.dtype(wkey)).name
    config = QuantizationConfig(
        load_in_4bit=True, bnb_4bit_quant_type=first["quant_type"],
        bnb_4bit_use_double_quant="nested_offset" in first,
        bnb_4bit_quant_storage=storage,
        bnb_4bit_compute_dtype=first.get("dtype", "float32"))
  if config.bnb_4bit_blocksize != blocksize:
    config = dataclasses.replace(config, bnb_4bit_blocksize=blocksize)
  return _Prequant(config, groups)


def _check_conflict(passed: QuantizationConfig, ckpt: QuantizationConfig,
                    path: str) -> None:
  diffs = [f"{f}: passed {getattr(passed, f)!r}, checkpoint "
           f"{getattr(ckpt, f)!r}" for f in _FIXED_FIELDS
           if getattr(passed, f) != getattr(ckpt, f)]
  if passed.skip_modules != ckpt.skip_modules:
    diffs.append(f"llm_int8_skip_modules: passed {list(passed.skip_modules)}"
                 f", checkpoint {list(ckpt.skip_modules)}")
  if diffs:
    raise ValueError(
        f"from_pretrained: `quantization` conflicts with the bitsandbytes "
        f"quantization stored in {path!r} ({'; '.join(diffs)}). Pass "
        "quantization=None to use the checkpoint's, or load the float "
        "checkpoint to quantize differently.")


def _default_param_dtype(src: CheckpointSource, config: Mapping[str, Any]):
  name = config.get("dtype") or config.get("torch_dtype")
  if isinstance(name, str):
    with contextlib.suppress(TypeError):
      dt = jnp.dtype(name.removeprefix("torch."))
      if jnp.issubdtype(dt, jnp.floating):
        return dt
  for n in src.names():
    dt = np.dtype(src.dtype(n))
    if np.issubdtype(dt, np.floating) or dt.name == "bfloat16":
      return jnp.dtype(dt)
  return jnp.dtype(jnp.float32)


def _is_float(dt) -> bool:
  dt = np.dtype(dt)
  return dt.kind == "f" or dt.name in ("bfloat16", "float8_e4m3fn",
                                       "float8_e5m2")


def _shape_error(src, name, expected, got) -> ValueError:
  return ValueError(
      f"{src.path!r}: tensor {src.describe(name)} has shape {list(got)}, "
      f"expected {list(expected)} from config.json.")


# ----------------------------------------------------------------------------
# from_pretrained


def from_pretrained(path: str | os.PathLike | CheckpointSource, *,
                    quantization: QuantizationConfig | Mapping | None = None,
                    dtype: Any = None, param_dtype: Any = None,
                    progress: bool = True) -> LlamaForCausalLM:
  """Loads a Llama-family checkpoint, optionally quantizing it on the fly.

  Tensors are streamed one at a time: float weights are cast to
  `param_dtype`; linears that `quantization` does not skip are quantized on
  the device right away (`Params4bit.from_float` of the `[out, in]` weight),
  so the float model is never held in memory. A bitsandbytes 4-bit
  checkpoint (`quantization_config` with `load_in_4bit`, or
  `*.weight.quant_state.bitsandbytes__*` tensors) is loaded bit-exactly,
  without re-quantization.

  Args:
    path: an HF folder (safetensors, sharded or not, or `pytorch_model.bin`
      with torch installed), a `.gguf` file, or a `CheckpointSource`.
    quantization: a `QuantizationConfig` (or HF `quantization_config` dict)
      to quantize a float checkpoint; None loads it in float. For a
      bitsandbytes checkpoint None means "as stored"; a config that differs
      in quant type, double quant, storage, blocksize or skip modules is an
      error (its compute dtype may differ and is used).
    dtype: activation/compute dtype of the non-quantized layers; default
      `param_dtype`.
    param_dtype: dtype of the float weights; default the checkpoint's
      (config.json `dtype`/`torch_dtype`, else its first float tensor).
    progress: show a tqdm progress bar over the tensors.

  Returns:
    The `LlamaForCausalLM`, every variable filled from the checkpoint.

  Raises:
    FileNotFoundError: missing folder, config.json or weight file.
    ValueError: unsupported architecture, missing / unexpected tensors,
      shape mismatches, truncated files, or a conflicting `quantization`.
    NotImplementedError: for LLM.int8 (8-bit) checkpoints.

  Examples:
    >>> import jaxbnb
    >>> from jaxbnb._src.io.convert import from_pretrained
    >>> from jaxbnb._src.layers.quant_config import QuantizationConfig
    >>> model = from_pretrained("tests/golden/bnb_llama/orig",
    ...                         quantization=QuantizationConfig.nf4(),
    ...                         progress=False)  # doctest: +SKIP
    >>> model.config.num_hidden_layers  # doctest: +SKIP
    2
  """
  src = open_checkpoint(path)
  config = LlamaConfig.from_hf(src.config)
  quantization = _as_quantization(quantization)
  pre = _detect_prequantized(src)
  if pre is not None:
    if quantization is None:
      quantization = pre.config
    else:
      _check_conflict(quantization, pre.config, src.path)
  param_dtype = (_dtype_or_none(param_dtype, "param_dtype")
                 or _default_param_dtype(src, src.config))
  dtype = _dtype_or_none(dtype, "dtype") or param_dtype

  model = nnx.eval_shape(lambda: LlamaForCausalLM(
      config, dtype=dtype, param_dtype=param_dtype, quantization=quantization,
      rngs=nnx.Rngs(0)))
  variables = dict(model.iter_variables())
  names = src.names()
  present = set(names)
  groups = pre.groups if pre is not None else {}
  plan = _plan(src, variables, present, groups, config)

  it = _progress(plan, len(plan), "Loading weights", progress)
  for hf_name, kind in it:
    var = variables[hf_name]
    if kind == "prequantized":
      keys = [hf_name] + groups[hf_name]
      state = {k: src.load(k) for k in keys}
      try:
        value = Params4bit.from_state_dict(state, hf_name[:-len("weight")])
      except ValueError as e:
        raise ValueError(f"{src.path!r}: {src.describe(hf_name)}: {e}") from e
      want = tuple(var.get_value().shape)
      if tuple(value.shape) != want:
        raise _shape_error(src, hf_name, want, value.shape)
    elif kind == "quantize":
      arr = src.load(hf_name)
      w = jnp.asarray(arr).astype(param_dtype)
      del arr
      q = quantization
      value = Params4bit.from_float(
          w, quant_type=q.bnb_4bit_quant_type,
          blocksize=q.bnb_4bit_blocksize,
          compress_statistics=q.bnb_4bit_use_double_quant,
          quant_storage=q.quant_storage)
      del w
    else:
      arr = src.load(hf_name)
      value = jnp.asarray(arr).astype(param_dtype)
      del arr
    var.set_value(value)

  missing = [n for n, v in model.iter_variables() if any(
      isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(
          v.get_value()))]
  if missing:  # a bug, not a user error: every variable had a plan entry
    raise AssertionError(f"from_pretrained: variables left unfilled: "
                         f"{missing[:5]}")
  return model


def _plan(src: CheckpointSource, variables: dict[str, nnx.Variable],
          present: set[str], groups: dict[str, list[str]],
          config: LlamaConfig) -> list[tuple[str, str]]:
  """Checks names and shapes before reading anything; returns the work."""
  plan = []
  missing = []
  used = set()
  for hf_name, var in variables.items():
    value = var.get_value()
    if isinstance(var, QuantizedWeight):
      if hf_name in groups:
        plan.append((hf_name, "prequantized"))
        used.update([hf_name, *groups[hf_name]])
        continue
      if hf_name not in present:
        missing.append(hf_name)
        continue
      if not _is_float(src.dtype(hf_name)):
        raise ValueError(
            f"{src.path!r}: tensor {src.describe(hf_name)} is "
            f"{np.dtype(src.dtype(hf_name)).name} without a bitsandbytes "
            "quant_state; cannot quantize it.")
      if tuple(src.shape(hf_name)) != tuple(value.shape):
        raise _shape_error(src, hf_name, value.shape, src.shape(hf_name))
      plan.append((hf_name, "quantize"))
      used.add(hf_name)
      continue
    if hf_name in groups:
      raise ValueError(
          f"{src.path!r}: tensor {src.describe(hf_name)} is stored 4-bit "
          "quantized but the model keeps this layer in float (check "
          "`llm_int8_skip_modules` of `quantization`).")
    if hf_name not in present:
      missing.append(hf_name)
      continue
    if tuple(src.shape(hf_name)) != tuple(value.shape):
      raise _shape_error(src, hf_name, value.shape, src.shape(hf_name))
    if not _is_float(src.dtype(hf_name)):
      raise ValueError(
          f"{src.path!r}: tensor {src.describe(hf_name)} has dtype "
          f"{np.dtype(src.dtype(hf_name)).name}, expected a float weight.")
    plan.append((hf_name, "float"))
    used.add(hf_name)
  if missing:
    raise ValueError(
        f"Checkpoint {src.path!r} lacks {len(missing)} tensor(s) the model "
        f"needs: {missing[:10]}{' ...' if len(missing) > 10 else ''}.")
  extra = [n for n in src.names() if n not in used
           and not n.endswith(_IGNORED_SUFFIXES)
           and not (n == "lm_head.weight" and config.tie_word_embeddings)]
  if extra:
    raise ValueError(
        f"Checkpoint {src.path!r} has {len(extra)} unexpected tensor(s) for "
        f"a {config.model_type} model: {extra[:10]}"
        f"{' ...' if len(extra) > 10 else ''}.")
  return plan


# ----------------------------------------------------------------------------
# save_pretrained


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like "5GB", "500MB", "2GiB".

  Examples:
    >>> parse_size("5GB"), parse_size("1KiB"), parse_size(123)
    (5000000000, 1024, 123)
  """
  if isinstance(size, bool):
    raise TypeError(f"max_shard_size must be an int or str, got {size!r}.")
  if isinstance(size, int):
    if size <= 0:
      raise ValueError(f"max_shard_size must be positive, got {size}.")
    return size
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)?\s*", str(size), re.I)
  if not m:
    raise ValueError(
        f"max_shard_size must be an int or a string like '5GB', got {size!r}.")
  units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
           "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
           "TIB": 2**40}
  unit = (m.group(2) or "").upper()
  n = int(float(m.group(1)) * units[unit])
  if n <= 0:
    raise ValueError(f"max_shard_size must be positive, got {size!r}.")
  return n


def _host(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _iter_module_tensors(model: LlamaForCausalLM
                         ) -> Iterator[dict[str, np.ndarray]]:
  """Yields the checkpoint tensors of each weight, in model order."""
  for hf_name, var in model.iter_variables():
    value = var.get_value()
    if isinstance(value, Params4bit):
      yield value.state_dict(hf_name[:-len("weight")])
    else:
      yield {hf_name: _host(value)}


def _hf_config(model: LlamaForCausalLM) -> dict[str, Any]:
  cfg = model.config.to_hf()
  cfg["dtype"] = jnp.dtype(model.param_dtype).name
  q = model.quantization
  if q is not None and q.quantized:
    cfg["quantization_config"] = q.to_dict()
  return cfg


def _write_json(path: str, data: Mapping[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_pretrained(model: LlamaForCausalLM, path: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB",
                    progress: bool = True) -> None:
  """Saves `model` as an HF folder that transformers + bitsandbytes load.

  Writes `config.json` (with `quantization_config` for a 4-bit model),
  `generation_config.json`, and `model.safetensors`, or
  `model-0000k-of-0000n.safetensors` shards plus
  `model.safetensors.index.json` when the tensors exceed `max_shard_size`.
  4-bit linears are written in bitsandbytes' format
  (`Params4bit.state_dict`), float tensors as they are (bf16 stays bf16). A
  tied head writes no `lm_head.weight`.

  The write is atomic: everything goes to a temporary folder beside `path`
  which then replaces it; on any error the temporary folder is removed and
  an existing `path` is left untouched. Files of an existing `path` that
  are not checkpoint files (e.g. tokenizer files) are kept.

  Args:
    model: a `LlamaForCausalLM` (float or 4-bit).
    path: the output folder.
    max_shard_size: largest shard, bytes or a string like "5GB" / "2GiB"
      (a single weight larger than this gets a shard of its own).
    progress: show a tqdm progress bar.

  Raises:
    TypeError: if `model` is not a `LlamaForCausalLM`.
    ValueError: for a bad `max_shard_size` or a `path` that is a file.
  """
  if not isinstance(model, LlamaForCausalLM):
    raise TypeError("save_pretrained: `model` must be a LlamaForCausalLM, "
                    f"got {type(model).__name__}.")
  limit = parse_size(max_shard_size)
  target = os.path.abspath(os.fspath(path))
  if os.path.exists(target) and not os.path.isdir(target):
    raise ValueError(f"save_pretrained: {target!r} exists and is not a "
                     "folder.")
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-",
                         dir=parent)
  try:
    _write_folder(model, tmp, limit, progress)
    if os.path.isdir(target):
      for entry in os.listdir(target):  # keep tokenizer files and the like
        if not _OWN_FILES.match(entry):
          src_p, dst_p = os.path.join(target, entry), os.path.join(tmp, entry)
          if os.path.isdir(src_p):
            shutil.copytree(src_p, dst_p, symlinks=True)
          else:
            shutil.copy2(src_p, dst_p, follow_symlinks=False)
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-",
                             dir=parent)
      os.rmdir(old)
      os.rename(target, old)
      try:
        os.rename(tmp, target)
      except BaseException:
        os.rename(old, target)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_folder(model: LlamaForCausalLM, folder: str, limit: int,
                  progress: bool) -> None:
  cfg = _hf_config(model)
  _write_json(os.path.join(folder, "config.json"), cfg)
  gen = {"bos_token_id": model.config.bos_token_id,
         "eos_token_id": cfg.get("eos_token_id"),
         "pad_token_id": model.config.pad_token_id}
  _write_json(os.path.join(folder, "generation_config.json"),
              {k: v for k, v in gen.items() if v is not None})

  n_vars = sum(1 for _ in model.iter_variables())
  shards: list[tuple[str, list[str], int]] = []  # (temp name, keys, bytes)
  current: dict[str, np.ndarray] = {}
  size = 0

  def flush():
    nonlocal current, size
    if not current:
      return
    name = f"shard-{len(shards):05d}.tmp"
    write_safetensors(os.path.join(folder, name), current)
    shards.append((name, list(current), size))
    current, size = {}, 0

  for tensors in _progress(_iter_module_tensors(model), n_vars,
                           "Saving weights", progress):
    nbytes = sum(a.nbytes for a in tensors.values())
    if current and size + nbytes > limit:
      flush()
    current.update(tensors)
    size += nbytes
  flush()

  n = len(shards)
  if n == 1:
    os.rename(os.path.join(folder, shards[0][0]),
              os.path.join(folder, "model.safetensors"))
    return
  weight_map = {}
  total = 0
  for i, (tmp_name, keys, nbytes) in enumerate(shards):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.rename(os.path.join(folder, tmp_name), os.path.join(folder, final))
    weight_map.update({k: final for k in keys})
    total += nbytes
  _write_json(os.path.join(folder, "model.safetensors.index.json"),
              {"metadata": {"total_size": total},
               "weight_map": dict(sorted(weight_map.items()))})


# ----------------------------------------------------------------------------
# checkpoint_info


def checkpoint_info(path: str | os.PathLike | CheckpointSource
                    ) -> dict[str, Any]:
  """Summarizes a checkpoint without loading its weights.

  Reads config.json, the tensor headers and the small bitsandbytes
  quant_state JSON blobs only.

  Args:
    path: an HF folder, a `.gguf` file or a `CheckpointSource`.

  Returns:
    A dict with `path`, `architecture`, `model_type`, `supported`
    (whether `from_pretrained` can load the architecture), `config` (the
    main hyperparameters), `num_parameters` (logical: a 4-bit weight counts
    its float elements), `num_tensors`, `tensors_by_dtype`,
    `bytes_by_dtype`, `total_bytes`, `shards` (file names), and
    `quantization`: None, or a dict with `method` ("bitsandbytes"),
    `bits`, `quant_type`, `double_quant`, `blocksize`, `quant_storage`,
    `compute_dtype`, `quantized_linears`.

  Examples:
    >>> from jaxbnb._src.io.convert import checkpoint_info
    >>> info = checkpoint_info(
    ...     "tests/golden/bnb_llama/nf4_dq_bf16")  # doctest: +SKIP
    >>> info["quantization"]["quant_type"], info["config"]["num_hidden_layers"]
    ... # doctest: +SKIP
    ('nf4', 2)
  """
  src = open_checkpoint(path)
  cfg = src.config
  archs = cfg.get("architectures") or []
  supported = True
  try:
    LlamaConfig.from_hf(cfg)
  except (ValueError, NotImplementedError):
    supported = False
  by_dtype: dict[str, int] = collections.Counter()
  bytes_by: dict[str, int] = collections.Counter()
  names = src.names()
  blobs = {n[:n.index(_QS_MARK)]: n for n in names if _QS_MARK in n}
  aux = {n for w in blobs for n in names if n.startswith(w + ".")}
  params = 0
  first_blob = None
  for n in names:
    dt = np.dtype(src.dtype(n)).name
    shape = tuple(src.shape(n))
    nbytes = math.prod(shape) * np.dtype(src.dtype(n)).itemsize
    by_dtype[dt] += 1
    bytes_by[dt] += nbytes
    if n in blobs:
      blob = _read_blob(src, blobs[n])
      first_blob = first_blob or blob
      params += math.prod(blob.get("shape", ()))
    elif n not in aux and not n.endswith(_IGNORED_SUFFIXES):
      params += math.prod(shape)
  quant = None
  qc = src.quantization_config
  if blobs or any(n.endswith(".SCB") for n in names) or (
      qc and qc.get("quant_method", "bitsandbytes") == "bitsandbytes"):
    eight = any(n.endswith(".SCB") for n in names) or bool(
        qc and qc.get("load_in_8bit"))
    quant = {"method": "bitsandbytes", "bits": 8 if eight else 4,
             "quantized_linears": len(blobs) if not eight else sum(
                 n.endswith(".SCB") for n in names)}
    if not eight:
      fb = first_blob or {}
      storage = (np.dtype(src.dtype(next(iter(blobs)))).name if blobs
                 else (qc or {}).get("bnb_4bit_quant_storage"))
      quant.update(
          quant_type=fb.get("quant_type", (qc or {}).get(
              "bnb_4bit_quant_type")),
          double_quant=("nested_offset" in fb) if fb else bool(
              (qc or {}).get("bnb_4bit_use_double_quant")),
          blocksize=fb.get("blocksize", 64),
          quant_storage=storage,
          compute_dtype=(qc or {}).get("bnb_4bit_compute_dtype"))
  elif qc:
    quant = {"method": qc.get("quant_method")}
  keys = ("vocab_size", "hidden_size", "intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "max_position_embeddings", "tie_word_embeddings",
          "rope_theta", "rope_parameters", "sliding_window")
  summary = {k: cfg[k] for k in keys if k in cfg}
  summary["dtype"] = cfg.get("dtype", cfg.get("torch_dtype"))
  files = src.files() if hasattr(src, "files") else [src.path]
  return {
      "path": os.fspath(src.path),
      "architecture": archs[0] if archs else cfg.get("model_type"),
      "model_type": cfg.get("model_type"),
      "supported": supported,
      "config": summary,
      "num_parameters": int(params),
      "num_tensors": len(names),
      "tensors_by_dtype": dict(by_dtype),
      "bytes_by_dtype": dict(bytes_by),
      "total_bytes": int(sum(bytes_by.values())),
      "shards": [os.path.basename(f) for f in files],
      "quantization": quant,
  }
