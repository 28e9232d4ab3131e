"""`QuantizationConfig`: HF's `BitsAndBytesConfig`, as a frozen dataclass.

It says which linear layers of a model are quantized and how. Its fields and
defaults are those of `transformers.BitsAndBytesConfig` (note: fp4, no double
quantization and float32 compute by default, as in transformers), and
`to_dict` / `from_dict` read and write the `quantization_config` entry of a
HuggingFace `config.json`, so checkpoints move both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxbnb._src.layers.skip import DEFAULT_SKIP_MODULES
from jaxbnb._src.layers.skip import HF_DEFAULT_SKIP_MODULES
from jaxbnb._src.layers.skip import hf_skips
from jaxbnb._src.quant import validation

__all__ = ["QuantizationConfig", "DEFAULT_SKIP_MODULES"]



def _dtype_name(value: Any, name: str, allowed: tuple[str, ...]) -> str:
  """Normalizes a dtype given as a string, numpy/jax dtype or torch name."""
  if isinstance(value, str):
    text = value.removeprefix("torch.")
  else:
    try:
      text = jnp.dtype(value).name
    except TypeError:
      text = str(value).removeprefix("torch.")
  if text not in allowed:
    raise ValueError(
        f"QuantizationConfig: `{name}` must be one of {allowed}, got "
        f"{value!r}."
    )
  return text


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
  """How a model's linear layers are quantized (HF `BitsAndBytesConfig`).

  Attributes:
    load_in_4bit: quantize linear layers to NF4/FP4.
    load_in_8bit: LLM.int8 linear layers.
    llm_int8_threshold: the LLM.int8 outlier threshold.
    llm_int8_skip_modules: modules kept in full precision, for 4-bit and
      8-bit alike, matched as transformers 5 matches them (see `skips`);
      None keeps `lm_head` (embeddings are never quantized), transformers'
      default. A list replaces the default: name `lm_head` in it to keep
      the head in full precision.
    llm_int8_enable_fp32_cpu_offload: recorded for compatibility only.
    llm_int8_has_fp16_weight: recorded for compatibility only.
    bnb_4bit_compute_dtype: dtype the 4-bit matmuls run in ("float32",
      "float16" or "bfloat16"; None, transformers' default, is "float32").
    bnb_4bit_quant_type: "fp4" (the transformers default) or "nf4".
    bnb_4bit_use_double_quant: double-quantize the absmax.
    bnb_4bit_quant_storage: dtype the packed bytes are stored as.
    bnb_4bit_blocksize: elements per absmax block (64 in transformers; not
      part of `BitsAndBytesConfig`, written to `to_dict` only when not 64).

  Example usage::

    >>> from jaxbnb.models import QuantizationConfig
    >>> q = QuantizationConfig.nf4()
    >>> q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant
    ('nf4', True)
    >>> q.skips("lm_head"), q.skips("model.layers.0.mlp.up_proj")
    (True, False)
    >>> QuantizationConfig.from_dict(q.to_dict()) == q
    True
  """

  load_in_4bit: bool = False
  load_in_8bit: bool = False
  llm_int8_threshold: float = 6.0
  llm_int8_skip_modules: tuple[str, ...] | None = None
  llm_int8_enable_fp32_cpu_offload: bool = False
  llm_int8_has_fp16_weight: bool = False
  bnb_4bit_compute_dtype: str = "float32"
  bnb_4bit_quant_type: str = "fp4"
  bnb_4bit_use_double_quant: bool = False
  bnb_4bit_quant_storage: str = "uint8"
  bnb_4bit_blocksize: int = 64

  def __post_init__(self):
    for name in ("load_in_4bit", "load_in_8bit", "bnb_4bit_use_double_quant",
                 "llm_int8_enable_fp32_cpu_offload",
                 "llm_int8_has_fp16_weight"):
      value = getattr(self, name)
      if not isinstance(value, bool):
        raise TypeError(
            f"QuantizationConfig: `{name}` must be a bool, got {value!r}.")
    if self.load_in_4bit and self.load_in_8bit:
      raise ValueError(
          "QuantizationConfig: `load_in_4bit` and `load_in_8bit` cannot both "
          "be True.")
    if (isinstance(self.llm_int8_threshold, bool)
        or not isinstance(self.llm_int8_threshold,
                          (int, float, np.integer, np.floating))
        or not self.llm_int8_threshold >= 0):
      raise ValueError(
          "QuantizationConfig: `llm_int8_threshold` must be a float >= 0, got "
          f"{self.llm_int8_threshold!r}.")
    object.__setattr__(self, "llm_int8_threshold",
                       float(self.llm_int8_threshold))
    skip = self.llm_int8_skip_modules
    if skip is not None:
      if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(
            "QuantizationConfig: `llm_int8_skip_modules` must be a list of "
            f"module names, got {skip!r}.")
      object.__setattr__(self, "llm_int8_skip_modules", tuple(skip))
    validation.check_quant_type(self.bnb_4bit_quant_type,
                                name="bnb_4bit_quant_type",
                                fn="QuantizationConfig")
    validation.check_blocksize(self.bnb_4bit_blocksize,
                               validation.BLOCKSIZES_4BIT,
                               name="bnb_4bit_blocksize",
                               fn="QuantizationConfig")
    # None is transformers' default, which computes in float32.
    compute = ("float32" if self.bnb_4bit_compute_dtype is None
               else self.bnb_4bit_compute_dtype)
    object.__setattr__(
        self, "bnb_4bit_compute_dtype",
        _dtype_name(compute, "bnb_4bit_compute_dtype",
                    validation.FLOAT_DTYPES))
    object.__setattr__(
        self, "bnb_4bit_quant_storage",
        _dtype_name(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage",
                    validation.QUANT_STORAGE_DTYPES))

  @classmethod
  def nf4(cls, *, double_quant: bool = True, compute_dtype: Any = "bfloat16",
          **kwargs) -> "QuantizationConfig":
    """4-bit NF4 (QLoRA's choice), double quantization on by default."""
    return cls(load_in_4bit=True, bnb_4bit_quant_type="nf4",
               bnb_4bit_use_double_quant=double_quant,
               bnb_4bit_compute_dtype=compute_dtype, **kwargs)

  @classmethod
  def fp4(cls, *, double_quant: bool = False, compute_dtype: Any = "bfloat16",
          **kwargs) -> "QuantizationConfig":
    """4-bit FP4."""
    return cls(load_in_4bit=True, bnb_4bit_quant_type="fp4",
               bnb_4bit_use_double_quant=double_quant,
               bnb_4bit_compute_dtype=compute_dtype, **kwargs)

  @property
  def quantized(self) -> bool:
    """Whether any layer is quantized."""
    return self.load_in_4bit or self.load_in_8bit

  @property
  def compute_dtype(self):
    """`bnb_4bit_compute_dtype` as a jnp dtype."""
    return jnp.dtype(self.bnb_4bit_compute_dtype)

  @property
  def quant_storage(self):
    """`bnb_4bit_quant_storage` as a jnp dtype."""
    return jnp.dtype(self.bnb_4bit_quant_storage)

  @property
  def skip_modules(self) -> tuple[str, ...]:
    """The effective skip list (`("lm_head",)` when None)."""
    if self.llm_int8_skip_modules is None:
      return HF_DEFAULT_SKIP_MODULES
    return self.llm_int8_skip_modules

  def skips(self, module_path: str) -> bool:
    """Whether the linear at dotted `module_path` stays in full precision.

    As in transformers 5, a skip entry matches a module when it is a suffix
    of the dotted path, or, as a regular expression, matches from the
    start of the path up to a module boundary: `"lm_head"`,
    `"mlp.down_proj"`, `"model.layers.1"` (not `model.layers.11`),
    `"model.layers.*.self_attn"`; `"mlp"` or `"self_attn"` alone match no
    Llama linear. An entry that is no regular expression (`"*embed*"`) is
    matched as a glob against the path and each component.

    Args:
      module_path: e.g. "model.layers.0.self_attn.q_proj" or "lm_head".

    Returns:
      True when the module must not be quantized (or nothing is quantized).
    """
    if not self.quantized:
      return True
    return hf_skips(module_path, self.skip_modules)

  def to_dict(self) -> dict[str, Any]:
    """The `quantization_config` dict, keys in transformers' order."""
    out = {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": self.load_in_8bit,
        "_load_in_4bit": self.load_in_4bit,
        "llm_int8_threshold": self.llm_int8_threshold,
        "llm_int8_skip_modules": (None if self.llm_int8_skip_modules is None
                                  else list(self.llm_int8_skip_modules)),
        "llm_int8_enable_fp32_cpu_offload":
            self.llm_int8_enable_fp32_cpu_offload,
        "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
        "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
        "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
        "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype,
        "bnb_4bit_quant_storage": self.bnb_4bit_quant_storage,
        "load_in_4bit": self.load_in_4bit,
        "load_in_8bit": self.load_in_8bit,
    }
    if self.bnb_4bit_blocksize != 64:
      out["bnb_4bit_blocksize"] = self.bnb_4bit_blocksize
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "QuantizationConfig":
    """Reads a `quantization_config` dict (or `BitsAndBytesConfig` kwargs).

    Args:
      d: the dict; `quant_method` must be "bitsandbytes" when present.

    Returns:
      The config. Unknown keys are ignored, as transformers ignores them.

    Raises:
      ValueError: for another `quant_method` or bad values.
    """
    if not isinstance(d, Mapping):
      raise TypeError(
          f"QuantizationConfig.from_dict: expected a dict, got "
          f"{type(d).__name__}.")
    method = d.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
      raise ValueError(
          "QuantizationConfig.from_dict: `quant_method` must be "
          f"'bitsandbytes', got {method!r}.")
    kwargs = {}
    for f in dataclasses.fields(cls):
      for key in (f.name, "_" + f.name):
        if key in d and d[key] is not None:
          kwargs[f.name] = d[key]
    if "llm_int8_skip_modules" in d:
      kwargs["llm_int8_skip_modules"] = d["llm_int8_skip_modules"]
    return cls(**kwargs)
