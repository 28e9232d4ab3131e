"""Loading and saving Hugging Face / bitsandbytes checkpoints.

`from_pretrained` builds a `LlamaForCausalLM` from an HF folder (float or
bitsandbytes-quantized), or a GGUF file, streaming one tensor at a time: the
model is first built abstractly (`nnx.eval_shape`, no memory), then each
tensor is read, cast or quantized on the device, and stored, so peak host
memory stays near the final model size plus one float tensor.

`save_pretrained` writes the HF + bitsandbytes format (config.json with
`quantization_config`, safetensors with `weight.absmax`,
`weight.quant_state.bitsandbytes__nf4`, ... for 4-bit; int8 `weight`, `SCB`
and `weight_format` for LLM.int8), which
`transformers.AutoModelForCausalLM.from_pretrained` loads with bitsandbytes.

Quantized weights go through their interface (`QuantizedArray`: `state_dict`,
`from_state_dict`, `weights.FORMATS`); which format a layer gets is
`layers.factory.quantize_weight`'s decision. Only reading a checkpoint's
keys knows bitsandbytes' naming (`_quantized_weights`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from jaxbnb._src.io import paths
from jaxbnb._src.io import processes
from jaxbnb._src.io import sharding as sharding_lib
from jaxbnb._src.io.checkpoint_source import CheckpointSource
from jaxbnb._src.io.checkpoint_source import open_checkpoint
from jaxbnb._src.io.checkpoint_source import write_safetensors
from jaxbnb._src.io.gguf_source import GGUFSource
from jaxbnb._src.layers.common import QuantizedWeight
from jaxbnb._src.layers.factory import quantize_weight
from jaxbnb._src.layers.factory import weight_format
from jaxbnb._src.layers.lora import check_no_lora
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.layers.skip import hf_skips
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.models.llama import LlamaForCausalLM
from jaxbnb._src.quant import ops as quant_ops
from jaxbnb._src.quant import weights
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.state import to_numpy

__all__ = ["from_pretrained", "save_pretrained", "checkpoint_info",
           "iter_checkpoint_tensors", "parse_size"]

_QS_MARK = ".quant_state.bitsandbytes__"
# bitsandbytes' per-weight tensors besides the 4-bit quant_state blob.
_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax",
                 ".nested_quant_map")
# LLM.int8's per-module tensors besides the int8 weight.
_INT8_SUFFIXES = (".SCB", ".weight_format")
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
# The same for an LLM.int8 checkpoint (its threshold may be overridden: it
# only applies to the activations).
_FIXED_FIELDS_INT8 = ("load_in_4bit", "load_in_8bit")


# ----------------------------------------------------------------------------
# helpers


def _progress(iterable, total: int, desc: str, enabled: bool):
  if not enabled:
    return iterable
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
    dt = jnp.dtype(d.removeprefix("torch.") if isinstance(d, str) else d)
  except TypeError as e:
    raise ValueError(f"from_pretrained: `{name}` must be a dtype, got "
                     f"{d!r}.") from e
  if dt.name not in validation.FLOAT_DTYPES:
    # float64 would be truncated to float32 without jax_enable_x64
    raise ValueError(f"from_pretrained: `{name}` must be one of "
                     f"{', '.join(validation.FLOAT_DTYPES)}, got {dt.name}.")
  return dt


def _read_blob(src: CheckpointSource, name: str) -> dict[str, Any]:
  raw = np.asarray(src.load(name)).astype(np.uint8).tobytes()
  try:
    return json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(
        f"{src.describe(name)} is not a bitsandbytes quant_state JSON blob: "
        f"{e}") from e


def _quantized_weights(names: list[str]) -> dict[str, tuple[str, list[str]]]:
  """The bitsandbytes-quantized weights among a checkpoint's tensor names.

  The format shows in the keys: a 4-bit weight `<m>.weight` comes with a
  `<m>.weight.quant_state.bitsandbytes__nf4|fp4` JSON blob (and `absmax`,
  `quant_map`, `nested_absmax`, `nested_quant_map`); an LLM.int8 weight
  with its row scales `<m>.SCB` (and `<m>.weight_format`).

  Returns:
    `{"<m>.weight": (format, [its other tensor names])}`, with the formats
    of `weights.FORMATS`.
  """
  found: dict[str, tuple[str, list[str]]] = {}
  for n in names:
    if _QS_MARK in n:
      found[n[:n.index(_QS_MARK)]] = (weights.Params4bit.format, [])
    elif n.endswith(".SCB"):
      found[n[:-len("SCB")] + "weight"] = (weights.Int8Params.format, [])
  for n in names:
    if _QS_MARK in n:
      owner = n[:n.index(_QS_MARK)]
    elif n.endswith(_AUX_SUFFIXES):
      owner = n[:n.rindex(".")]
    elif n.endswith(_INT8_SUFFIXES):
      owner = n[:n.rindex(".")] + ".weight"
    else:
      continue
    if owner in found:
      found[owner][1].append(n)
  return found


@dataclasses.dataclass(frozen=True)
class _Prequant:
  """What a bitsandbytes-quantized checkpoint holds."""

  config: QuantizationConfig
  groups: dict[str, tuple[str, list[str]]]  # see _quantized_weights


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
  groups = _quantized_weights(names)
  fmts = {fmt for fmt, _ in groups.values()}
  if len(fmts) > 1:
    int8 = next(w for w, (f, _) in groups.items()
                if f == weights.Int8Params.format)
    four = next(w for w, (f, _) in groups.items()
                if f == weights.Params4bit.format)
    raise ValueError(
        f"Checkpoint {src.path!r} mixes LLM.int8 weights (e.g. {int8!r}) and "
        f"4-bit weights (e.g. {four!r}); a model has one quantization.")
  in_config_4 = qc is not None and bool(qc.get("load_in_4bit") or
                                        qc.get("_load_in_4bit"))
  in_config_8 = qc is not None and bool(qc.get("load_in_8bit") or
                                        qc.get("_load_in_8bit"))
  if weights.Int8Params.format in fmts or (in_config_8 and not groups):
    return _detect_int8(src, qc if in_config_8 else None, groups,
                        conflicting_4bit=in_config_4)
  if not groups and not in_config_4:
    return None
  if not groups:
    raise ValueError(
        f"Checkpoint {src.path!r}: config.json says load_in_4bit but no "
        f"tensor has a '{_QS_MARK}nf4|fp4' entry; it is not a saved "
        "bitsandbytes 4-bit checkpoint.")
  if in_config_8:
    raise ValueError(
        f"Checkpoint {src.path!r}: config.json says load_in_8bit but its "
        "tensors are bitsandbytes 4-bit ones (quant_state entries).")
  wkey, (_, extra) = next(iter(groups.items()))
  first = _read_blob(src, next(n for n in extra if _QS_MARK in n))
  blocksize = int(first.get("blocksize", 64))
  if in_config_4:
    config = QuantizationConfig.from_dict(qc)
  else:
    storage = np.dtype(src.dtype(wkey)).name
    config = QuantizationConfig(
        load_in_4bit=True, bnb_4bit_quant_type=first["quant_type"],
        bnb_4bit_use_double_quant="nested_offset" in first,
        bnb_4bit_quant_storage=storage,
        bnb_4bit_compute_dtype=first.get("dtype", "float32"))
  if config.bnb_4bit_blocksize != blocksize:
    config = dataclasses.replace(config, bnb_4bit_blocksize=blocksize)
  return _Prequant(config, groups)


# bitsandbytes' `utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING`.
_WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


def _detect_int8(src: CheckpointSource, qc: dict[str, Any] | None,
                 groups: dict[str, tuple[str, list[str]]],
                 conflicting_4bit: bool) -> _Prequant:
  """An LLM.int8 checkpoint: int8 `weight` + `SCB` (+ `weight_format`).

  Every `weight_format` (a uint8 scalar) is read and checked here, before
  any weight: only 0 ("row") exists since bitsandbytes 0.45; the tiled
  layouts older versions saved after a forward pass are refused.
  """
  if conflicting_4bit:
    raise ValueError(
        f"Checkpoint {src.path!r}: config.json says load_in_4bit but its "
        "tensors are LLM.int8 ones (`SCB` entries).")
  if not groups and qc is not None and qc.get("llm_int8_has_fp16_weight"):
    # bitsandbytes writes no SCB for has_fp16_weights=True: float weights,
    # quantized here on load (jaxbnb's int8 linears are frozen).
    return _Prequant(QuantizationConfig.from_dict(qc), {})
  if not groups:
    raise ValueError(
        f"Checkpoint {src.path!r}: config.json says load_in_8bit but no "
        "tensor has an `SCB` entry; it is not a saved bitsandbytes LLM.int8 "
        "checkpoint.")
  present = set(src.names())
  for wkey, (_, extra) in groups.items():
    if wkey not in present:
      raise ValueError(
          f"Checkpoint {src.path!r} has {extra[0]!r} but no {wkey!r}.")
    if np.dtype(src.dtype(wkey)) != np.int8:
      raise ValueError(
          f"{src.path!r}: tensor {src.describe(wkey)} has dtype "
          f"{np.dtype(src.dtype(wkey)).name} beside an `SCB` entry; an "
          "LLM.int8 weight is int8.")
    for n in extra:
      if n.endswith(".SCB"):
        _check_scb(src, n, wkey)
      if not n.endswith(".weight_format"):
        continue
      raw = np.asarray(src.load(n))
      value = int(raw.reshape(-1)[0]) if raw.size == 1 else None
      if value != 0:
        shown = (f"{value} ({_WEIGHT_FORMATS[value]!r})"
                 if value in _WEIGHT_FORMATS else repr(raw.tolist()))
        raise ValueError(
            f"{src.path!r}: tensor {src.describe(n)} is weight_format "
            f"{shown}; only 0 ('row') is supported. Tiled int8 layouts "
            "come from bitsandbytes <= 0.44 saving after a forward pass; "
            "re-save the model with bitsandbytes >= 0.45 (or load the float "
            "checkpoint with load_in_8bit).")
  config = (QuantizationConfig.from_dict(qc) if qc is not None
            else QuantizationConfig(load_in_8bit=True))
  return _Prequant(config, groups)


def _check_scb(src: CheckpointSource, scb: str, wkey: str) -> None:
  """`SCB` (from its metadata, before any weight is read): float32, one row
  scale per row of the int8 weight, as bitsandbytes writes it."""
  dtype = np.dtype(src.dtype(scb))
  if dtype != np.float32:
    raise ValueError(
        f"{src.path!r}: tensor {src.describe(scb)} has dtype {dtype.name}; "
        "an LLM.int8 row scale `SCB` is float32 (as bitsandbytes writes "
        "it).")
  wshape = tuple(int(d) for d in src.shape(wkey))
  got = tuple(int(d) for d in src.shape(scb))
  if len(wshape) == 2 and got != wshape[:1]:
    raise ValueError(
        f"{src.path!r}: tensor {src.describe(scb)} has shape {list(got)}; "
        f"expected [{wshape[0]}], one row scale per row of "
        f"{src.describe(wkey)} {list(wshape)}.")


def _bits(q: QuantizationConfig) -> str:
  if q.load_in_8bit:
    return "LLM.int8 (load_in_8bit)"
  return f"4-bit {q.bnb_4bit_quant_type} (load_in_4bit)"


def _check_conflict(passed: QuantizationConfig, ckpt: QuantizationConfig,
                    path: str) -> None:
  if passed.load_in_8bit != ckpt.load_in_8bit:
    # The other kind's fields (e.g. an int8 config's default quant type
    # "fp4") are no one's choice: say what differs, the kind.
    raise ValueError(
        f"from_pretrained: `quantization` asks for {_bits(passed)} but "
        f"{path!r} is a bitsandbytes {_bits(ckpt)} checkpoint, which loads "
        "as stored (a quantized checkpoint cannot be quantized again). Pass "
        "quantization=None to use the checkpoint's, or load the float "
        "checkpoint to quantize differently.")
  fixed = _FIXED_FIELDS_INT8 if ckpt.load_in_8bit else _FIXED_FIELDS
  diffs = [f"{f}: passed {getattr(passed, f)!r}, checkpoint "
           f"{getattr(ckpt, f)!r}" for f in fixed
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


def _checkpoint_dtype(src: CheckpointSource) -> jnp.dtype:
  """The float dtype of a checkpoint: config.json's, else its first float
  tensor's, else float32."""
  name = src.config.get("dtype") or src.config.get("torch_dtype")
  if isinstance(name, str):
    with contextlib.suppress(TypeError):
      dt = jnp.dtype(name.removeprefix("torch."))
      if jnp.issubdtype(dt, jnp.floating):
        return dt
  for n in src.names():
    if n.endswith(_AUX_SUFFIXES + _INT8_SUFFIXES):  # float32 statistics
      continue
    dt = np.dtype(src.dtype(n))
    if np.issubdtype(dt, np.floating) or dt.name == "bfloat16":
      return jnp.dtype(dt)
  return jnp.dtype(jnp.float32)


def _default_param_dtype(src: CheckpointSource, quantizing: bool):
  """The float weights' dtype when the caller names none.

  The checkpoint's own dtype (transformers' `dtype="auto"`, which
  transformers + bitsandbytes also keep for the tensors `load_in_4bit`
  leaves unquantized), except that a GGUF file reporting float32 (llama.cpp-
  quantized tensors, which decode to float32) quantized on load keeps its
  unquantized tensors (embeddings, norms, the head) in bfloat16: the file
  holds them in 8 bits or fewer, and float32 embeddings would make the
  4-bit model nearly twice the size. A float32 Hugging Face checkpoint
  stays float32.
  """
  dt = _checkpoint_dtype(src)
  if quantizing and dt == jnp.float32 and isinstance(src, GGUFSource):
    return jnp.dtype(jnp.bfloat16)
  return dt


def default_param_dtype(path: str | os.PathLike | CheckpointSource, *,
                        quantizing: bool) -> jnp.dtype:
  """The `param_dtype` `from_pretrained(path)` picks when given none.

  Args:
    path: an HF folder, a `.gguf` file or a `CheckpointSource`.
    quantizing: whether the load quantizes a float checkpoint (a
      `quantization` is passed and `path` is not pre-quantized).

  Returns:
    The checkpoint's float dtype, or bfloat16 for a float32 GGUF file being
    quantized (see docs/models.md, "Dtypes"). `jaxbnb merge --quant` uses it
    so that merging and quantizing give the float tensors the dtype `jaxbnb
    convert` gives them.
  """
  src = path if isinstance(path, CheckpointSource) else open_checkpoint(path)
  return _default_param_dtype(src, quantizing)


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


def _open_everywhere(path, mesh) -> CheckpointSource:
  """`open_checkpoint(path)`; on a mesh spanning several processes, each
  opens its own (a host may have its own copy), and a checkpoint that one
  of them cannot open or read is an error in all of them, naming that
  process and its error (instead of the others waiting forever for it)."""
  if mesh is None or not processes.several():
    return open_checkpoint(path)
  src, error = None, None
  try:
    src = open_checkpoint(path)
  except (OSError, ValueError, NotImplementedError) as e:
    error = e
  failed = [(i, m) for i, m in enumerate(processes.errors_of_all(
      None if error is None else f"{type(error).__name__}: {error}"))
            if m is not None]
  if error is not None:
    raise error
  if failed:
    i, message = failed[0]
    raise ValueError(
        f"from_pretrained: process {i} of {jax.process_count()} could not "
        f"open its checkpoint: {message}")
  return src


def _with_generation_eos(config: LlamaConfig,
                         generation_config: Mapping | None) -> LlamaConfig:
  """`config` with generation_config.json's `eos_token_id` where it has one.

  transformers' `generate` stops on the generation config's EOS ids, which
  instruct checkpoints use to add end-of-turn tokens that config.json does
  not list (Llama 3 Instruct: `<|eot_id|>`).
  """
  eos = (generation_config or {}).get("eos_token_id")
  if eos is None:
    return config
  ids = [eos] if isinstance(eos, int) else list(eos)
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise ValueError(
        "generation_config.json: eos_token_id must be an int or a list of "
        f"ints, got {eos!r}.")
  return dataclasses.replace(config, eos_token_id=tuple(ids))


def from_pretrained(path: str | os.PathLike | CheckpointSource, *,
                    quantization: QuantizationConfig | Mapping | None = None,
                    dtype: Any = None, param_dtype: Any = None,
                    progress: bool = True, mesh: jax.sharding.Mesh | None = None,
                    sharding: sharding_lib.ShardingRules | Mapping | None = None
                    ) -> LlamaForCausalLM:
  """Loads a Llama-family checkpoint, optionally quantizing it on the fly.

  Tensors are streamed one at a time: float weights are cast to
  `param_dtype`; linears that `quantization` does not skip are quantized on
  the device right away (`quantize_weight` of the `[out, in]` weight), so
  the float model is never held in memory. A bitsandbytes 4-bit checkpoint
  (`quantization_config` with `load_in_4bit`, or
  `*.weight.quant_state.bitsandbytes__*` tensors) or LLM.int8 checkpoint
  (`load_in_8bit`, or int8 `*.weight` with `*.SCB` and `*.weight_format`
  tensors) is loaded bit-exactly, without re-quantization.

  The model remembers `path`: `save_pretrained` and `save_checkpoint`
  refuse to write into (or around) the checkpoint it came from.

  Args:
    path: an HF folder (safetensors, sharded or not, or `pytorch_model.bin`
      with torch installed), a `.gguf` file, or a `CheckpointSource`.
    quantization: a `QuantizationConfig` (or HF `quantization_config` dict)
      to quantize a float checkpoint; None loads it in float. For a
      bitsandbytes checkpoint None means "as stored"; a config that differs
      in bits, quant type, double quant, storage, blocksize or skip modules
      is an error (its compute dtype, or LLM.int8 threshold, may differ and
      is used). `QuantizationConfig(load_in_8bit=True)` quantizes to
      LLM.int8 rows (`quantize_int8_weight`: the weight cast to float16,
      row absmax), `lm_head` kept in float by default as in transformers.
    dtype: activation/compute dtype of the non-quantized layers; default
      `param_dtype`.
    param_dtype: dtype of the float (unquantized) weights; default the
      checkpoint's (config.json `dtype`/`torch_dtype`, else its first float
      tensor), except that a quantized GGUF file quantized on load gets
      bfloat16 (its tensors decode to float32 but are stored in <= 8 bits). A pre-quantized checkpoint
      keeps its stored dtype.
    progress: show a tqdm progress bar over the tensors.
    mesh: a `jax.sharding.Mesh` (axes among "data", "fsdp", "tensor") to
      load onto: every parameter becomes a `jax.Array` sharded by
      `sharding`'s rules, and each device receives only its slice (float
      tensors of a safetensors folder are read slice by slice; a 4-bit
      weight without double quantization is quantized one row shard at a
      time). See `ShardingRules` and docs/distributed.md.
    sharding: a `ShardingRules` (or a dict of its fields); default
      `ShardingRules()`: FSDP over "fsdp", tensor parallelism over
      "tensor", where the mesh has them. Needs `mesh`.

  Returns:
    The `LlamaForCausalLM`, every variable filled from the checkpoint.

  Raises:
    FileNotFoundError: missing folder, config.json or weight file.
    ValueError: unsupported architecture, missing / unexpected tensors,
      shape mismatches, truncated files, a conflicting `quantization`, or
      an LLM.int8 checkpoint with a tiled `weight_format` (1, 2 or 3, from
      bitsandbytes <= 0.44; the message names the tensor and the value),
      or, with `mesh`, an axis that does not divide the dimension it splits,
      a row shard cutting a 4-bit block, or an axis the mesh lacks (the
      message names the axis, the parameter and the dimension).

  Examples:
    >>> from jaxbnb import convert, models
    >>> model = convert.from_pretrained(
    ...     "tests/golden/bnb_llama/orig",
    ...     quantization=models.QuantizationConfig.nf4(),
    ...     progress=False)  # doctest: +SKIP
    >>> model.config.num_hidden_layers  # doctest: +SKIP
    2
  """
  if sharding is not None and mesh is None:
    raise ValueError("from_pretrained: `sharding` needs a `mesh`.")
  rules = sharding_lib.resolve(sharding) if mesh is not None else None
  src = _open_everywhere(path, mesh)
  config = _with_generation_eos(LlamaConfig.from_hf(src.config),
                                getattr(src, "generation_config", None))
  quantization = _as_quantization(quantization)
  pre = _detect_prequantized(src)
  if pre is not None:
    if quantization is None:
      quantization = pre.config
    else:
      _check_conflict(quantization, pre.config, src.path)
  param_dtype = (_dtype_or_none(param_dtype, "param_dtype")
                 or _default_param_dtype(
                     src, quantizing=pre is None and quantization is not None))
  dtype = _dtype_or_none(dtype, "dtype") or param_dtype

  model = nnx.eval_shape(lambda: LlamaForCausalLM(
      config, dtype=dtype, param_dtype=param_dtype, quantization=quantization,
      rngs=nnx.Rngs(0)))
  variables = dict(model.iter_variables())
  groups = pre.groups if pre is not None else {}
  plan = _plan(src, variables, set(src.names()), groups, config)
  specs = {}
  if mesh is not None:  # every spec checked before anything is read
    for hf_name, _ in plan:
      value = variables[hf_name].get_value()
      specs[hf_name] = (
          sharding_lib.quantized_specs(rules, hf_name, value, mesh)
          if isinstance(value, weights.QuantizedArray) else
          sharding_lib.param_spec(rules, hf_name, value.shape, mesh))

  for hf_name, kind in _progress(plan, len(plan), "Loading weights", progress):
    var = variables[hf_name]
    if mesh is not None:
      var.set_value(_load_sharded(src, hf_name, kind, var.get_value(),
                                  specs[hf_name], mesh, groups, quantization,
                                  param_dtype))
      continue
    if kind == "prequantized":
      value = _load_prequantized(src, hf_name, groups, param_dtype,
                                 var.get_value().shape)
    elif kind == "quantize":
      w = jnp.asarray(src.load(hf_name)).astype(param_dtype)
      value = quantize_weight(quantization, hf_name[:-len(".weight")], w)
      del w
    else:
      value = jnp.asarray(src.load(hf_name)).astype(param_dtype)
    var.set_value(value)

  missing = [n for n, v in model.iter_variables() if any(
      isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(
          v.get_value()))]
  if missing:  # a bug, not a user error: every variable had a plan entry
    raise AssertionError(f"from_pretrained: variables left unfilled: "
                         f"{missing[:5]}")
  paths.record_source(model, src.path)
  return model


def _load_prequantized(src, hf_name, groups, param_dtype, want_shape):
  """A bitsandbytes-quantized weight as stored, checked against the model's
  `want_shape`."""
  fmt, extra = groups[hf_name]
  state = {k: src.load(k) for k in (hf_name, *extra)}
  kwargs = {}
  if fmt == weights.Int8Params.format:
    # bitsandbytes stores no original dtype for int8 rows: the model's.
    kwargs["dtype"] = jnp.dtype(param_dtype).name
  try:
    value = weights.FORMATS[fmt].from_state_dict(
        state, hf_name[:-len("weight")], **kwargs)
  except ValueError as e:
    raise ValueError(f"{src.path!r}: {src.describe(hf_name)}: {e}") from e
  if tuple(value.shape) != tuple(want_shape):
    raise _shape_error(src, hf_name, want_shape, value.shape)
  return value


def _prequantized_rows(src, hf_name, groups, param_dtype, want_shape):
  """`shard(row0, rows)`: rows `row0 : row0 + rows` of a bitsandbytes-
  quantized weight, reading only their part of the row-ordered tensors.

  A 4-bit weight's packed bytes and absmax (codes) run row after row, so
  whole rows are a contiguous range of each; the small statistics (code
  tables, double quantization's nested absmax and offset) are read whole,
  once, and belong to the whole tensor (the shard's absmax codes index
  them by their global block, as `quantized_specs` lays them out). An int8
  weight reads its rows and row scales. A shard is a weight of shape
  `[rows, in]`. The recorded shape is checked here, once.
  """
  fmt, extra = groups[hf_name]
  out, inn = (int(d) for d in want_shape)
  is_4bit = fmt == weights.Params4bit.format
  qs_key = next((k for k in extra if "quant_state." in k), None)
  meta = None
  if is_4bit:
    meta = json.loads(bytes(np.asarray(src.load(qs_key)).astype(np.uint8))
                      .decode("utf-8"))
    got = tuple(int(d) for d in meta["shape"])
  else:
    got = tuple(src.shape(hf_name))
  if got != (out, inn):
    raise _shape_error(src, hf_name, want_shape, got)
  if is_4bit:  # elements of each row-ordered tensor per weight row
    per_row = {hf_name: inn / 2 / np.dtype(src.dtype(hf_name)).itemsize}
    per_row.update({k: inn / int(meta["blocksize"]) for k in extra
                    if k.endswith(".absmax")})
  else:
    per_row = {k: 1 for k in (hf_name, *extra)
               if len(src.shape(k)) and src.shape(k)[0] == out}
  small = {k: src.load(k) for k in extra if k not in per_row and k != qs_key}
  if is_4bit:
    _check_whole_absmax(src, hf_name, extra, meta, small, out * inn)

  def rows_of(key, row0, rows):
    lo, hi = row0 * per_row[key], (row0 + rows) * per_row[key]
    if lo != int(lo) or hi != int(hi):
      raise ValueError(f"{src.path!r}: {src.describe(key)}: rows {row0}.."
                       f"{row0 + rows} do not start at a whole element.")
    nd = len(src.shape(key))
    return src.load_slice(key, (slice(int(lo), int(hi)),)
                          + (slice(None),) * (nd - 1))

  def shard(row0, rows):
    state = dict(small)
    state.update({k: rows_of(k, row0, rows) for k in per_row})
    if is_4bit:
      state[qs_key] = np.frombuffer(
          json.dumps(dict(meta, shape=[rows, inn])).encode("utf-8"), np.uint8)
    return _load_prequantized(_Given(src, state), hf_name, groups,
                              param_dtype, (rows, inn))
  return shard


def _check_whole_absmax(src, hf_name, extra, meta, small, n) -> None:
  """The whole tensor's absmax and nested absmax lengths, checked once for
  a weight loaded row shard by row shard: each shard's `from_state_dict`
  sees the whole nested absmax (its codes index it by their global block)
  and can only ask for at least its own blocks' worth."""
  nb = -(-n // int(meta["blocksize"]))
  for k in extra:
    if k.endswith(".weight.absmax") and tuple(src.shape(k)) != (nb,):
      raise ValueError(
          f"{src.path!r}: tensor {src.describe(k)} has shape "
          f"{list(src.shape(k))}; expected [{nb}], one per "
          f"{meta['blocksize']} elements of {hf_name!r} "
          f"{list(meta['shape'])}.")
  nested = next((k for k in small if k.endswith(".nested_absmax")), None)
  if nested is None or "nested_blocksize" not in meta:
    return  # from_state_dict reports a missing nested entry
  nbs = int(meta["nested_blocksize"])
  nnb = -(-nb // nbs)
  got = int(np.asarray(small[nested]).size)
  if got != nnb:
    raise ValueError(
        f"{src.path!r}: tensor {src.describe(nested)} has {got} entries; "
        f"expected {nnb}, one per {nbs} absmax codes of {hf_name!r} "
        f"(ceil({nb} / {nbs})).")


class _Given:
  """A checkpoint source answering `load` from `state` (already read)."""

  def __init__(self, src, state):
    self.path, self._src, self._state = src.path, src, state

  def load(self, name):
    return self._state[name]

  def describe(self, name):
    return self._src.describe(name)


def _local_row_shards(data_spec, mesh, shape, n) -> list[int]:
  """The row shards (of `n`) that this process's devices hold, in order."""
  per = shape[0] // n
  where = NamedSharding(mesh, data_spec).addressable_devices_indices_map(
      tuple(shape))
  return sorted({(idx[0].start or 0) // per for idx in where.values()})


def _quantize_rows_nested(abstract, spec, data_spec, mesh, n, quantization,
                          module, read, param_dtype):
  """A 4-bit weight with double quantization, quantized row shard by row
  shard.

  Each process reads and quantizes only the row shards its devices hold
  (float32 absmax); then the whole tensor's absmax (every shard's, in row
  order; on several processes exchanged with `process_allgather`, a
  float per block) is double-quantized at once, so the bytes are those of
  the whole tensor quantized in one piece: the offset is the mean of all
  of them.
  """
  out, inn = (int(d) for d in abstract.shape)
  rows = out // n
  per = rows * inn // abstract.quant_state.blocksize
  single = dataclasses.replace(quantization, bnb_4bit_use_double_quant=False)
  mine = _local_row_shards(data_spec, mesh, abstract.data.shape, n)
  parts = {i: quantize_weight(single, module, jnp.asarray(read(
      (slice(i * rows, (i + 1) * rows), slice(None)))).astype(param_dtype))
           for i in mine}
  local = np.concatenate(
      [np.asarray(parts[i].quant_state.absmax, np.float32) for i in mine])
  if jax.process_count() == 1:
    full = local  # every shard is this process's, in order
  else:
    k = int(np.max(multihost_utils.process_allgather(np.int32(len(mine)))))
    ids = np.full(k, -1, np.int32)
    ids[:len(mine)] = mine
    vals = np.zeros(k * per, np.float32)
    vals[:local.size] = local
    all_ids = np.asarray(multihost_utils.process_allgather(ids))
    all_vals = np.asarray(multihost_utils.process_allgather(vals))
    full = np.zeros(n * per, np.float32)
    for pid_ids, pid_vals in zip(all_ids, all_vals):
      for j, i in enumerate(pid_ids):
        if i >= 0:
          full[i * per:(i + 1) * per] = pid_vals[j * per:(j + 1) * per]
  first = parts[mine[0]].quant_state
  whole = quant_ops.double_quantize(dataclasses.replace(
      first, absmax=jnp.asarray(full), shape=(out, inn)))

  def make(i):
    qs = dataclasses.replace(whole, absmax=whole.absmax[i * per:(i + 1) * per],
                             shape=(rows, inn))
    return weights.Params4bit(parts[i].data, qs)
  return sharding_lib.build_by_rows(abstract, spec, mesh, n, make)


def _load_sharded(src, hf_name, kind, abstract, spec, mesh, groups,
                  quantization, param_dtype):
  """One parameter of `from_pretrained(..., mesh=mesh)`, already sharded.

  Float tensors are read slice by slice; a weight quantized on load is
  quantized one row shard at a time (its rows hold whole blocks, quantized
  independently: the same bytes as the whole tensor quantized at once;
  double quantization then runs once over every shard's absmax); a
  pre-quantized one reads its rows' ranges (`_prequantized_rows`).
  Other sources build the tensor whole on the host and slice it.
  """
  read = sharding_lib.slice_reader(src, hf_name)
  if kind == "float":
    return sharding_lib.read_sharded(
        abstract.shape, spec, mesh, read,
        lambda a: np.asarray(a).astype(param_dtype))
  module = hf_name[:-len(".weight")]
  data_spec = jax.tree.leaves(spec, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec))[0]
  n = sharding_lib.row_shards(data_spec, mesh)  # row shards
  rows = abstract.shape[0] // n
  if kind == "quantize":
    nested = (isinstance(abstract, weights.Params4bit)
              and abstract.quant_state.offset is not None)
    if n > 1 and nested:
      return _quantize_rows_nested(abstract, spec, data_spec, mesh, n,
                                   quantization, module, read, param_dtype)
    if n > 1 and not nested:
      return sharding_lib.build_by_rows(
          abstract, spec, mesh, n, lambda i: quantize_weight(
              quantization, module, jnp.asarray(read(
                  (slice(i * rows, (i + 1) * rows), slice(None))
              )).astype(param_dtype)))
    w = jnp.asarray(src.load(hf_name)).astype(param_dtype)
    value = quantize_weight(quantization, module, w)
    del w
  else:
    fmt, extra = groups[hf_name]
    by_rows = hasattr(src, "load_slice") and (
        fmt != weights.Params4bit.format
        or any("quant_state." in k for k in extra))
    if n > 1 and by_rows:
      shard = _prequantized_rows(src, hf_name, groups, param_dtype,
                                 abstract.shape)
      return sharding_lib.build_by_rows(abstract, spec, mesh, n,
                                        lambda i: shard(i * rows, rows))
    value = _load_prequantized(src, hf_name, groups, param_dtype,
                               abstract.shape)
  host = jax.tree.map(np.asarray, value)
  del value
  return sharding_lib.place(host, spec, mesh)


def _plan(src: CheckpointSource, variables: dict[str, nnx.Variable],
          present: set[str], groups: dict[str, tuple[str, list[str]]],
          config: LlamaConfig) -> list[tuple[str, str]]:
  """Checks names and shapes before reading anything; returns the work."""
  plan = []
  missing = []
  used = set()
  for hf_name, var in variables.items():
    value = var.get_value()
    if isinstance(var, QuantizedWeight):
      if hf_name in groups:
        stored, extra = groups[hf_name]
        if stored != value.format:
          raise ValueError(
              f"{src.path!r}: tensor {src.describe(hf_name)} is stored in "
              f"the {stored!r} format but the model expects {value.format!r}.")
        plan.append((hf_name, "prequantized"))
        used.update([hf_name, *extra])
        continue
      if hf_name not in present:
        missing.append(hf_name)
        continue
      if not _is_float(src.dtype(hf_name)):
        raise ValueError(
            f"{src.path!r}: tensor {src.describe(hf_name)} is "
            f"{np.dtype(src.dtype(hf_name)).name} without bitsandbytes' "
            f"quantization tensors beside it (an LLM.int8 "
            f"{hf_name[:-len('weight')] + 'SCB'!r} or a 4-bit quant_state); "
            "cannot quantize it.")
      if tuple(src.shape(hf_name)) != tuple(value.shape):
        raise _shape_error(src, hf_name, value.shape, src.shape(hf_name))
      plan.append((hf_name, "quantize"))
      used.add(hf_name)
      continue
    if hf_name in groups:
      raise ValueError(
          f"{src.path!r}: tensor {src.describe(hf_name)} is stored "
          f"quantized ({groups[hf_name][0]}) but the model keeps this layer "
          "in float (check `llm_int8_skip_modules` of `quantization`).")
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


def iter_checkpoint_tensors(model: LlamaForCausalLM
                            ) -> Iterator[dict[str, np.ndarray]]:
  """Yields the checkpoint tensors of each weight, in model order.

  A quantized weight gives bitsandbytes' entries (`QuantizedArray.
  state_dict`), a float weight `{hf_name: array}`; all as numpy arrays on
  the host. These are the tensors `save_pretrained` writes.

  Examples:
    >>> from flax import nnx
    >>> from jaxbnb import convert, models
    >>> cfg = models.LlamaConfig(vocab_size=64, hidden_size=64,
    ...                          intermediate_size=128, num_hidden_layers=1,
    ...                          num_attention_heads=4, num_key_value_heads=2)
    >>> model = models.LlamaForCausalLM(
    ...     cfg, quantization=models.QuantizationConfig.nf4(),
    ...     rngs=nnx.Rngs(0))
    >>> tensors = {}
    >>> for t in convert.iter_checkpoint_tensors(model):
    ...   tensors.update(t)
    >>> w = "model.layers.0.mlp.up_proj.weight"
    >>> tensors[w].dtype, tensors[w + ".absmax"].dtype, len(tensors)
    (dtype('uint8'), dtype('uint8'), 47)
  """
  for hf_name, var in model.iter_variables():
    value = var.get_value()
    if isinstance(value, weights.QuantizedArray):
      yield value.state_dict(hf_name[:-len("weight")])
    else:
      yield {hf_name: to_numpy(value)}


def saved_quantization(model: LlamaForCausalLM) -> QuantizationConfig | None:
  """The `quantization_config` that describes `model`'s linears as they are.

  A linear can hold a float weight although `model.quantization` would
  quantize it (e.g. after `merge_lora(requantize=False)`). As transformers
  does for bitsandbytes models, such linears go into
  `llm_int8_skip_modules` (by full module path, after the config's own skip
  list), so loading the checkpoint keeps them in float instead of
  quantizing them again. The saved list is one transformers 5 can read:
  an entry that is no regular expression (a glob such as `"*embed*"`) is
  written as the module paths it matches. A model without any quantized
  linear has no quantization: None (a float checkpoint).
  """
  q = model.quantization
  if q is None or not q.quantized:
    return None
  linears = {path for path, _ in model.named_linears()}
  quantized, floats = 0, []
  for path, var in model.iter_variables():
    module = path[:-len(".weight")]
    if (not path.endswith(".weight") or module not in linears
        or weight_format(q, module) is None):
      continue  # norms, embeddings, biases, linears the config skips
    if isinstance(var.get_value(), weights.QuantizedArray):
      quantized += 1
    else:
      floats.append(module)
  if not quantized:
    return None
  skip = _regex_entries(q.skip_modules, sorted(linears))
  if not floats and skip == q.skip_modules:
    return q
  return dataclasses.replace(q, llm_int8_skip_modules=(*skip, *floats))


def _regex_entries(entries: tuple[str, ...],
                   linears: list[str]) -> tuple[str, ...]:
  """`entries` with each one that is no regular expression replaced by the
  linears it matches (transformers reads every entry as a regex)."""
  out = []
  for entry in entries:
    try:
      re.compile(entry)
      out.append(entry)
    except re.error:
      out.extend(p for p in linears if hf_skips(p, [entry]))
  return tuple(out)


def _hf_config(model: LlamaForCausalLM) -> dict[str, Any]:
  cfg = model.config.to_hf()
  cfg["dtype"] = jnp.dtype(model.param_dtype).name
  q = saved_quantization(model)
  if q is not None:
    cfg["quantization_config"] = q.to_dict()
  return cfg


def _write_json(path: str, data: Mapping[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_pretrained(model: LlamaForCausalLM, path: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB", overwrite: bool = False,
                    progress: bool = True, tokenizer: Any = None) -> None:
  """Saves `model` as an HF folder that transformers + bitsandbytes load.

  Writes `config.json` (with `quantization_config` for a quantized model),
  `generation_config.json`, and `model.safetensors`, or
  `model-0000k-of-0000n.safetensors` shards plus
  `model.safetensors.index.json` when the tensors exceed `max_shard_size`.
  Quantized linears are written in bitsandbytes' format
  (`QuantizedArray.state_dict`), float tensors as they are (bf16 stays
  bf16). A tied head writes no `lm_head.weight`.

  The write is atomic: everything (the tokenizer's files too) goes to a new
  folder beside `path`, which then replaces it; on any error or interruption
  the new folder is removed and an existing `path` is left untouched, so
  `path` never holds a model without its tokenizer. Replacing a non-empty
  folder needs `overwrite=True`; its files that are not checkpoint files
  (e.g. tokenizer files) are kept unless the new folder has a file of that
  name. A model loaded with `from_pretrained` is never written
  into, around or over the checkpoint it came from.

  Args:
    model: a `LlamaForCausalLM` (float or quantized).
    path: the output folder.
    max_shard_size: largest shard, bytes or a string like "5GB" / "2GiB"
      (a single weight larger than this gets a shard of its own).
    overwrite: replace the checkpoint in an existing non-empty folder.
    progress: show a tqdm progress bar.
    tokenizer: a tokenizer (e.g. `load_tokenizer(...)`) whose
      `save_pretrained(folder)` writes its files into the new folder before
      it replaces `path`; None writes none.

  Raises:
    TypeError: if `model` is not a `LlamaForCausalLM`, or `tokenizer` has no
      `save_pretrained`.
    ValueError: for a model with LoRA adapters (save them with
      `jaxbnb.lora.save_adapter` or merge them first), a bad
      `max_shard_size`, a `path` that is a file, or a
      `path` that is, contains or lies inside the checkpoint `model` was
      loaded from (the message names both).
    FileExistsError: if `path` is a non-empty folder and `overwrite` is
      False.
  """
  if not isinstance(model, LlamaForCausalLM):
    raise TypeError("save_pretrained: `model` must be a LlamaForCausalLM, "
                    f"got {type(model).__name__}.")
  check_no_lora(model, "save_pretrained")
  if tokenizer is not None and not callable(
      getattr(tokenizer, "save_pretrained", None)):
    raise TypeError("save_pretrained: `tokenizer` must have a "
                    "save_pretrained method (a transformers tokenizer) or be "
                    f"None, got {type(tokenizer).__name__}.")
  limit = parse_size(max_shard_size)

  def write(folder):
    _write_folder(model, folder, limit, progress)
    if tokenizer is not None and processes.is_primary():
      tokenizer.save_pretrained(folder)
  # With several processes all of them walk the weights (each tensor split
  # over their devices is gathered) and process 0 writes.
  paths.write_folder_atomic(
      path, write,
      overwrite=overwrite, fn="save_pretrained",
      source=paths.source_of(model),
      keep=lambda entry: not _OWN_FILES.match(entry), collective=True)


def _write_folder(model: LlamaForCausalLM, folder: str, limit: int,
                  progress: bool) -> None:
  """Writes the checkpoint into `folder`. Every process runs this (the
  tensors sharded over several processes are gathered); process 0
  writes."""
  primary = processes.is_primary()
  progress = progress and primary
  cfg = _hf_config(model)
  gen = {"bos_token_id": model.config.bos_token_id,
         "eos_token_id": cfg.get("eos_token_id"),
         "pad_token_id": model.config.pad_token_id}
  if primary:
    _write_json(os.path.join(folder, "config.json"), cfg)
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
    if primary:
      write_safetensors(os.path.join(folder, name), current)
    shards.append((name, list(current), size))
    current, size = {}, 0

  for tensors in _progress(iter_checkpoint_tensors(model), n_vars,
                           "Saving weights", progress):
    nbytes = sum(a.nbytes for a in tensors.values())
    if current and size + nbytes > limit:
      flush()
    current.update(tensors)
    size += nbytes
  flush()

  n = len(shards)
  if not primary:
    return
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
              {"metadata": {"total_parameters": model.num_parameters(),
                            "total_size": total},
               "weight_map": dict(sorted(weight_map.items()))})


# ----------------------------------------------------------------------------
# checkpoint_info


# GGUF tensor types that are plain floats (not llama.cpp quantization).
_GGUF_FLOAT = ("F32", "F16", "BF16", "F64")


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
    `bytes_by_dtype`, `total_bytes` (as stored: a GGUF file's tensors by
    their GGUF type, e.g. "Q4_1", and their size in the file, not the
    float32 `load` decodes them to), `shards` (file names), and
    `quantization`: None, or for a GGUF file of llama.cpp-quantized tensors
    a dict with `method` ("gguf"), `file_type` (e.g. "Q4_1"),
    `quantized_tensors` and `tensor_types`; or a dict with `method`
    ("bitsandbytes"),
    `bits`, `quantized_linears` and, for 4 bits, `quant_type`,
    `double_quant`, `blocksize`, `quant_storage`, `compute_dtype`; for 8
    bits (LLM.int8), `threshold` (config.json's, else transformers'
    default 6.0).

  Examples:
    >>> from jaxbnb import convert
    >>> info = convert.checkpoint_info(
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
  groups = _quantized_weights(names)
  aux = {n for _, extra in groups.values() for n in extra}
  blobs = {w: next(n for n in extra if _QS_MARK in n)
           for w, (fmt, extra) in groups.items()
           if fmt == weights.Params4bit.format}
  int8 = [w for w, (fmt, _) in groups.items()
          if fmt == weights.Int8Params.format]
  params = 0
  first_blob = None
  gguf = isinstance(src, GGUFSource)
  for n in names:
    shape = tuple(src.shape(n))
    if gguf:  # as stored in the file, not as decoded (float32)
      dt, nbytes = src.tensor_type(n), src.stored_bytes(n)
    else:
      dt = np.dtype(src.dtype(n)).name
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
  if groups or (qc and qc.get("quant_method", "bitsandbytes") ==
                "bitsandbytes"):
    eight = bool(int8) or bool(qc and qc.get("load_in_8bit"))
    quant = {"method": "bitsandbytes", "bits": 8 if eight else 4,
             "quantized_linears": len(int8) if eight else len(blobs)}
    if eight:
      quant["threshold"] = float((qc or {}).get("llm_int8_threshold", 6.0))
    else:
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
  elif gguf:
    quantized = sum(v for k, v in by_dtype.items() if k not in _GGUF_FLOAT)
    if quantized:
      quant = {"method": "gguf", "file_type": src.file_type,
               "quantized_tensors": quantized,
               "tensor_types": ", ".join(
                   k for k in by_dtype if k not in _GGUF_FLOAT)}
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
