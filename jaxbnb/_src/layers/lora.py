"""LoRA adapters on float and quantized linears (PEFT's `LoraConfig`).

`apply_lora` wraps the linear layers a `LoRAConfig` targets in
`LoRALinear`, which keeps the frozen base layer (a float `Linear` or any
`QuantizedLinear`, e.g. 4-bit: QLoRA) and adds `lora_A` `[r, in]` and
`lora_B` `[out, r]` as `nnx.LoRAParam`s, so `wrt=nnx.LoRAParam` selects
exactly the adapters. The math, initialisation and names are PEFT's
(`peft.tuners.lora.layer.Linear`, `peft.tuners.lora.dora`):

  y = base(x) + (dropout(x) @ A.T @ B.T) * scaling,  scaling = alpha / r
  (alpha / sqrt(r) with rsLoRA), the adapter term in the adapter dtype
  (float32 by default), added to the base output in float32 and the sum
  cast back to its dtype (a quantized base: the term cast first, as PEFT's
  bitsandbytes layers do).

DoRA adds a magnitude `m` `[out]` and rescales the adapted weight row-wise:
`y = base(x) + (m / ||W + s B A|| - 1) * (x W^T) + m / ||W + s B A|| * s x
A^T B^T`, the norm detached from the gradient and computed from the
dequantized weight for a quantized base.

`merge_lora` folds the adapters into the base weights (PEFT's
`merge_and_unload`); `Dense4bitLoRA` is the linen version of a LoRA 4-bit
layer. Reading and writing PEFT adapter folders is `io/peft.py`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jaxbnb._src.layers.common import QuantizedLinear
from jaxbnb._src.layers.dense4bit import QUANTIZED
from jaxbnb._src.layers.dense4bit import Dense4bit
from jaxbnb._src.layers.dense4bit import default_kernel_init
from jaxbnb._src.layers.linear import Linear
from jaxbnb._src.layers.linear import precision_for
from jaxbnb._src.layers import modules_to_save
from jaxbnb._src.layers.lora_bias import BIASES
from jaxbnb._src.layers.lora_bias import LoRABias
from jaxbnb._src.layers.lora_bias import train_biases
from jaxbnb._src.quant import int8
from jaxbnb._src.quant import ops
from jaxbnb._src.quant.weights import Int8Params
from jaxbnb._src.quant.weights import Params4bit
from jaxbnb._src.quant.weights import QuantizedArray

__all__ = [
    "ALL_LINEAR", "DEFAULT_TARGET_MODULES", "OUTPUT_HEAD", "LoRAConfig",
    "LoRALinear", "Dense4bitLoRA", "apply_lora", "merge_lora", "unload_lora",
    "attach_adapters", "find_targets", "linear_layers", "lora_layers",
    "lora_output", "dora_weight_norm", "dense_weight", "init_lora_A",
    "init_lora_B", "saved_module_params",
]

ALL_LINEAR = "all-linear"
# PEFT's default `target_modules` for the Llama family (llama, mistral,
# qwen2: TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
# The output head "all-linear" leaves out (PEFT: get_output_embeddings()).
OUTPUT_HEAD = "lm_head"
_INITS = (True, False, "gaussian")

# adapter_config.json fields that never change the math (kept as read).
_BOOKKEEPING = ("revision", "inference_mode", "auto_mapping", "peft_version",
                "runtime_config", "megatron_core", "qalora_group_size")
# What to_dict writes besides the fields: PEFT's defaults of the options
# jaxbnb does not implement (they must stay at these values).
_WRITTEN = {"auto_mapping": None, "inference_mode": True, "revision": None}


def _falsy(value: Any) -> bool:
  return value is None or value is False or (
      isinstance(value, (str, list, tuple, dict, set)) and not value)


def _check_rank(r: Any, name: str) -> int:
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise ValueError(f"LoRAConfig: `{name}` must be a positive int, got "
                     f"{r!r}.")
  return r


def _check_alpha(a: Any, name: str) -> float:
  if (isinstance(a, bool) or not isinstance(a, (int, float))
      or not (a > 0 and math.isfinite(a))):
    raise ValueError(
        f"LoRAConfig: `{name}` must be a finite number > 0, got {a!r}.")
  return a


def _pattern(value: Any, name: str, check) -> tuple[tuple[str, Any], ...]:
  """PEFT's `rank_pattern` / `alpha_pattern` dict as ordered pairs."""
  if _falsy(value):
    return ()
  if isinstance(value, Mapping):
    items = tuple(value.items())
  else:
    try:
      items = tuple((k, v) for k, v in value)
    except (TypeError, ValueError):
      raise ValueError(f"LoRAConfig: `{name}` must be a dict of module "
                       f"name regex -> value, got {value!r}.") from None
  for key, v in items:
    if not isinstance(key, str) or not key:
      raise ValueError(f"LoRAConfig: `{name}` keys must be non-empty "
                       f"strings, got {key!r}.")
    try:
      re.compile(_pattern_regex(key))
    except re.error as e:
      raise ValueError(f"LoRAConfig: `{name}` key {key!r} is not a valid "
                       f"regex: {e}") from e
    check(v, f"{name}[{key!r}]")
  return items


def _modules_to_save(value: Any) -> tuple[str, ...] | None:
  """`modules_to_save`: None or a tuple of non-empty names."""
  if _falsy(value):
    return None
  if isinstance(value, str) or not isinstance(value, Iterable):
    # PEFT iterates the value: a string would select by single letters.
    raise ValueError("LoRAConfig: `modules_to_save` must be a list of module "
                     f"names (e.g. ['lm_head']) or None, got {value!r}.")
  value = tuple(sorted(value) if isinstance(value, (set, frozenset))
                else value)
  if not all(isinstance(v, str) and v for v in value):
    raise ValueError("LoRAConfig: `modules_to_save` must hold non-empty "
                     f"strings, got {value!r}.")
  for v in value:
    try:
      re.compile(_saved_regex(v))
    except re.error as e:
      raise ValueError(f"LoRAConfig: `modules_to_save` entry {v!r} is not a "
                       f"valid regex (PEFT matches it as one): {e}") from e
  return value


def _saved_regex(name: str) -> str:
  """PEFT's regex for the modules a `modules_to_save` entry keeps out of
  LoRA: the named module and anything inside it (the entry itself is a
  regex there, as PEFT writes it unescaped)."""
  return rf"(^|.*\.){name}($|\..*)"


def _pattern_regex(key: str) -> str:
  """PEFT's `get_pattern_key`: the key matches the end of a module path."""
  return rf"(.*\.)?({key})$"


def _layers(value: Any) -> int | tuple[int, ...] | None:
  """`layers_to_transform`: None, an int or a tuple of ints (>= 0)."""
  if value is None or (isinstance(value, (list, tuple)) and not value):
    return None
  items = (value,) if not isinstance(value, (list, tuple)) else tuple(value)
  for i in items:
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
      raise ValueError("LoRAConfig: `layers_to_transform` must be a layer "
                       f"index or a list of them (ints >= 0), got {value!r}.")
  return items if isinstance(value, (list, tuple)) else value


def _names(value: Any, name: str) -> str | tuple[str, ...] | None:
  """None, a regex string, or a tuple of module names (sets sorted)."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, (set, frozenset)):
    value = sorted(value)
  if not isinstance(value, Iterable):
    raise ValueError(f"LoRAConfig: `{name}` must be a list of module names, "
                     f"a regex string or None, got {value!r}.")
  value = tuple(value)
  if not all(isinstance(v, str) and v for v in value):
    raise ValueError(f"LoRAConfig: `{name}` must hold non-empty strings, got "
                     f"{value!r}.")
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  """LoRA hyperparameters: PEFT's `LoraConfig`, as a frozen dataclass.

  `to_dict` / `from_dict` read and write PEFT's `adapter_config.json`.
  Options that would change the math and are not implemented raise
  `NotImplementedError` rather than give a silently different model.

  Attributes:
    r: adapter rank (> 0).
    lora_alpha: the scale numerator (> 0): scaling is `lora_alpha / r`, or
      `lora_alpha / sqrt(r)` with `use_rslora`.
    lora_dropout: dropout rate on the adapter input in training, in [0, 1).
    target_modules: the modules to adapt, matched as PEFT does: a list of
      names, each matching a module path exactly or as a suffix after a
      ".", e.g. `["q_proj", "v_proj"]`; a string is a regex that must match
      the whole path; `"all-linear"` is every linear layer but the output
      head (`lm_head`); None means PEFT's default for the Llama family,
      `["q_proj", "v_proj"]`.
    exclude_modules: modules never adapted (same matching; None: none).
    rank_pattern: per-module ranks, PEFT's dict `{regex: r}`: the first key
      that matches the end of a module's path (regex `(.*[.])?(key)$`) gives
      its rank, others get `r`. Held as ordered `(key, r)` pairs.
    alpha_pattern: per-module `lora_alpha`, the same way.
    layers_to_transform: only the layers with these indices (an int or a
      list) are adapted, as PEFT selects them: the index is the first
      number after a `layers_pattern` entry (default: after any name) in
      the module path, e.g. 3 in `model.layers.3.mlp.up_proj`. Needs a list
      `target_modules` (PEFT refuses a regex string).
    layers_pattern: the name before the layer index (e.g. "layers"); needs
      `layers_to_transform`.
    use_rslora: rank-stabilised scaling `lora_alpha / sqrt(r)`.
    use_dora: weight-decomposed LoRA (a trained magnitude per output).
    bias: which of the model's biases are trained beside the adapters, as
      PEFT's: "none"; "all" (every `bias` param of the model); or
      "lora_only" (the biases of the adapted linears). They become
      `LoRABias` variables (a kind of `nnx.LoRAParam`) and are saved in
      the adapter file under PEFT's names (`<path>.base_layer.bias` for
      an adapted linear, `<path>.bias` for another module).
    lora_bias: a trained bias on B (PEFT's `lora_B.bias`), added to
      `B @ A x` before the scaling: zeros at first (`init_lora_weights`
      True), or PyTorch `nn.Linear`'s default (False). Not with DoRA;
      merging needs a base layer with a bias.
    init_lora_weights: True: A kaiming-uniform (PyTorch `nn.Linear`'s
      default, bound `1/sqrt(in)`), B zeros (the adapted model starts equal
      to the base); "gaussian": A normal with std `1/r`, B zeros; False: B
      kaiming-uniform too (the model changes at once; for tests).
    modules_to_save: modules trained whole beside the adapters (PEFT's
      `ModulesToSaveWrapper`), e.g. `["lm_head"]`: every module whose path
      ends with an entry (a plain suffix test, as PEFT's); as in PEFT, no
      module named by an entry (between "." boundaries) or inside one gets
      a LoRA adapter, whatever `target_modules` says. Their params
      become `nnx.LoRAParam`s and are saved in the adapter file; float
      modules only. A tied head or embedding is untied first, as PEFT's
      copy unties it.
    fan_in_fan_out: only False (jaxbnb's linears store `[out, in]`).
    task_type: PEFT's task type, recorded ("CAUSAL_LM").
    base_model_name_or_path: the base model the adapter belongs to,
      recorded.
    extra: other `adapter_config.json` fields, kept as read and written
      back (not compared).

  Raises:
    ValueError: for a bad r, lora_alpha, lora_dropout, bias, regex or init
      value.
    NotImplementedError: for `fan_in_fan_out`, and PEFT initialisations
      that change the base weights ("pissa", "olora", "loftq", "corda",
      ...).

  Examples:
    >>> from jaxbnb.lora import LoRAConfig
    >>> cfg = LoRAConfig(r=16, lora_alpha=32, target_modules=["q_proj"])
    >>> cfg.scaling, cfg.matches("model.layers.0.self_attn.q_proj")
    (2.0, True)
    >>> d = cfg.to_dict()
    >>> d["peft_type"], d["target_modules"], LoRAConfig.from_dict(d) == cfg
    ('LORA', ['q_proj'], True)
  """

  r: int = 8
  lora_alpha: float = 8
  lora_dropout: float = 0.0
  target_modules: str | tuple[str, ...] | None = None
  exclude_modules: str | tuple[str, ...] | None = None
  rank_pattern: tuple[tuple[str, int], ...] = ()
  alpha_pattern: tuple[tuple[str, float], ...] = ()
  layers_to_transform: int | tuple[int, ...] | None = None
  layers_pattern: str | tuple[str, ...] | None = None
  use_rslora: bool = False
  use_dora: bool = False
  bias: str = "none"
  lora_bias: bool = False
  init_lora_weights: bool | str = True
  modules_to_save: tuple[str, ...] | None = None
  fan_in_fan_out: bool = False
  task_type: str | None = "CAUSAL_LM"
  base_model_name_or_path: str | None = None
  extra: Mapping[str, Any] = dataclasses.field(
      default_factory=dict, compare=False, hash=False, repr=False)

  def __post_init__(self):
    _check_rank(self.r, "r")
    _check_alpha(self.lora_alpha, "lora_alpha")
    object.__setattr__(self, "rank_pattern", _pattern(
        self.rank_pattern, "rank_pattern", _check_rank))
    object.__setattr__(self, "alpha_pattern", _pattern(
        self.alpha_pattern, "alpha_pattern", _check_alpha))
    d = self.lora_dropout
    if (isinstance(d, bool) or not isinstance(d, (int, float))
        or not 0 <= d < 1):
      raise ValueError(
          f"LoRAConfig: `lora_dropout` must be in [0, 1), got {d!r}.")
    object.__setattr__(self, "lora_dropout", float(d))
    for name in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"LoRAConfig: `{name}` must be a bool, got "
                         f"{getattr(self, name)!r}.")
    if self.bias not in BIASES:
      raise ValueError(f"LoRAConfig: `bias` must be 'none', 'all' or "
                       f"'lora_only', got {self.bias!r}.")
    init = self.init_lora_weights
    if isinstance(init, str) and init.lower() == "gaussian":
      object.__setattr__(self, "init_lora_weights", "gaussian")
    elif isinstance(init, str):
      raise NotImplementedError(
          f"LoRAConfig: init_lora_weights={init!r} is not supported (jaxbnb "
          f"implements {_INITS}). PiSSA, OLoRA, LoftQ and CorDA adapters "
          "belong to a modified base model: convert them to plain LoRA with "
          "PEFT's `path_initial_model_for_weight_conversion` first.")
    elif not isinstance(init, bool):
      raise ValueError(f"LoRAConfig: `init_lora_weights` must be one of "
                       f"{_INITS}, got {init!r}.")
    if self.lora_bias and self.use_dora:  # PEFT's checks
      raise ValueError("LoRAConfig: `lora_bias`=True is not supported with "
                       "DoRA (use_dora=True), as in PEFT.")
    if self.lora_bias and not isinstance(self.init_lora_weights, bool):
      raise ValueError("LoRAConfig: `lora_bias`=True needs "
                       "`init_lora_weights` True or False, as in PEFT; got "
                       f"{self.init_lora_weights!r}.")
    if self.fan_in_fan_out:
      raise NotImplementedError(
          "LoRAConfig: fan_in_fan_out=True (GPT-2 style Conv1D weights) is "
          "not supported; jaxbnb's linears store [out, in] weights.")
    object.__setattr__(self, "modules_to_save",
                       _modules_to_save(self.modules_to_save))
    for name in ("target_modules", "exclude_modules"):
      value = _names(getattr(self, name), name)
      if isinstance(value, str) and value.lower() != ALL_LINEAR:
        try:
          re.compile(value)
        except re.error as e:
          raise ValueError(f"LoRAConfig: `{name}` {value!r} is not a valid "
                           f"regex: {e}") from e
      if value == ():
        raise ValueError(f"LoRAConfig: `{name}` is empty; use None.")
      object.__setattr__(self, name, value)
    if isinstance(self.target_modules, str) and (
        self.target_modules.lower() == ALL_LINEAR):
      object.__setattr__(self, "target_modules", ALL_LINEAR)
    # PEFT's checks, on the values as given ([] is not None there).
    for name in ("layers_to_transform", "layers_pattern"):
      if getattr(self, name) is not None and isinstance(
          self.target_modules, str):
        raise ValueError(
            f"LoRAConfig: `{name}` cannot be used when `target_modules` is a "
            f"string ({self.target_modules!r}); give a list of names.")
    if self.layers_pattern and self.layers_to_transform is None:
      raise ValueError("LoRAConfig: `layers_pattern` needs "
                       "`layers_to_transform`.")
    ltt = _layers(self.layers_to_transform)
    object.__setattr__(self, "layers_to_transform", ltt)
    lp = self.layers_pattern
    lp = None if _falsy(lp) or ltt is None else _names(lp, "layers_pattern")
    object.__setattr__(self, "layers_pattern", lp)
    object.__setattr__(self, "extra", dict(self.extra))

  @property
  def scaling(self) -> float:
    """`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
    if self.use_rslora:
      return self.lora_alpha / math.sqrt(self.r)
    return self.lora_alpha / self.r

  def rank_for(self, path: str) -> int:
    """The rank of the adapter at dotted `path` (`rank_pattern`, else `r`).

    Examples:
      >>> cfg = LoRAConfig(r=8, rank_pattern={"v_proj": 4})
      >>> cfg.rank_for("model.layers.0.self_attn.v_proj")
      4
    """
    return _pattern_value(self.rank_pattern, path, self.r)

  def scaling_for(self, path: str) -> float:
    """The scale of the adapter at `path`, from its rank and alpha.

    Examples:
      >>> cfg = LoRAConfig(r=8, lora_alpha=16, alpha_pattern={"q_proj": 4})
      >>> cfg.scaling_for("model.layers.0.self_attn.q_proj")
      0.5
    """
    r = self.rank_for(path)
    alpha = _pattern_value(self.alpha_pattern, path, self.lora_alpha)
    return alpha / math.sqrt(r) if self.use_rslora else alpha / r

  @property
  def all_linear(self) -> bool:
    """Whether `target_modules` is the "all-linear" shorthand."""
    return self.target_modules == ALL_LINEAR

  def excludes(self, path: str) -> bool:
    """Whether the module at dotted `path` never gets an adapter: named by
    `exclude_modules`, or inside (or equal to) a `modules_to_save` module
    (PEFT's `check_target_module_exists`: such a module is trained whole,
    the entry matched as a regex between "." boundaries)."""
    return _match(self.exclude_modules, path) or any(
        re.match(_saved_regex(m), path)
        for m in (self.modules_to_save or ()))

  def matches(self, path: str) -> bool:
    """Whether `target_modules` names the module at dotted `path`.

    PEFT's rule: a regex string must match the whole path, a list entry the
    whole path or its end after a "."; excluded modules never match.
    "all-linear" is resolved against a model (`find_targets`), not here.
    """
    if self.excludes(path):
      return False
    tm = self.target_modules
    if tm == ALL_LINEAR:
      raise ValueError("LoRAConfig.matches: 'all-linear' depends on the "
                       "model; use find_targets(model, config).")
    names = DEFAULT_TARGET_MODULES if tm is None else tm
    if not _match(names, path):
      return False
    if self.layers_to_transform is None or isinstance(names, str) or (
        path in names):  # PEFT: an exact name skips the layer filter
      return True
    index = _layer_index(path, self.layers_pattern)
    if index is None:
      return False
    want = self.layers_to_transform
    return index == want if isinstance(want, int) else index in want

  def to_dict(self) -> dict[str, Any]:
    """The `adapter_config.json` contents (PEFT's field names).

    Unsupported PEFT options are written at their defaults; fields read by
    `from_dict` that jaxbnb does not use are written back unchanged.
    """
    tm = self.target_modules
    out = dict(_WRITTEN)
    out.update(self.extra)
    out.update({
        "peft_type": "LORA",
        "task_type": self.task_type,
        "base_model_name_or_path": self.base_model_name_or_path,
        "r": self.r,
        "lora_alpha": self.lora_alpha,
        "lora_dropout": self.lora_dropout,
        "target_modules": (list(DEFAULT_TARGET_MODULES) if tm is None
                           else tm if isinstance(tm, str) else list(tm)),
        "exclude_modules": (self.exclude_modules
                            if not isinstance(self.exclude_modules, tuple)
                            else list(self.exclude_modules)),
        "rank_pattern": dict(self.rank_pattern),
        "alpha_pattern": dict(self.alpha_pattern),
        "layers_to_transform": (list(self.layers_to_transform)
                                if isinstance(self.layers_to_transform, tuple)
                                else self.layers_to_transform),
        "layers_pattern": (list(self.layers_pattern)
                           if isinstance(self.layers_pattern, tuple)
                           else self.layers_pattern),
        "use_rslora": self.use_rslora,
        "use_dora": self.use_dora,
        "bias": self.bias,
        "lora_bias": self.lora_bias,
        "init_lora_weights": self.init_lora_weights,
        "modules_to_save": (None if self.modules_to_save is None
                            else list(self.modules_to_save)),
        "fan_in_fan_out": False,
    })
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
    """Reads PEFT's `adapter_config.json` contents.

    Args:
      d: the parsed JSON object.

    Returns:
      The config; fields jaxbnb does not use are kept in `extra`.

    Raises:
      ValueError: `peft_type` is not "LORA", or a bad value.
      NotImplementedError: an option that changes the adapter's math and
        that jaxbnb does not implement (
        `trainable_token_indices`, variants such as aLoRA or QALoRA, ...
        set away from its default), naming it.
    """
    if not isinstance(d, Mapping):
      raise ValueError("LoRAConfig.from_dict: expected a JSON object, got "
                       f"{type(d).__name__}.")
    peft_type = d.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
      raise ValueError(f"LoRAConfig.from_dict: peft_type must be 'LORA', got "
                       f"{peft_type!r} (only LoRA adapters are supported).")
    own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    kwargs, extra = {}, {}
    for key, value in d.items():
      if key == "peft_type":
        continue
      if key in own:
        kwargs[key] = value
      elif key in _BOOKKEEPING:
        if key != "inference_mode":
          extra[key] = value
      elif key in _WRITTEN and value == _WRITTEN[key]:
        continue
      elif _falsy(value):
        extra[key] = value
      else:
        raise NotImplementedError(
            f"LoRAConfig.from_dict: {key}={value!r} changes the adapter's "
            "math and is not supported by jaxbnb (it supports r, lora_alpha, "
            "lora_dropout, target_modules, exclude_modules, rank_pattern, "
            "alpha_pattern, layers_to_transform, layers_pattern, use_rslora, "
            "use_dora, bias, lora_bias, init_lora_weights and "
            "modules_to_save).")
    return cls(**kwargs, extra=extra)


def _pattern_value(pattern: tuple[tuple[str, Any], ...], path: str,
                   default: Any) -> Any:
  for key, value in pattern:
    if re.match(_pattern_regex(key), path):
      return value
  return default


def _layer_index(path: str, layers_pattern) -> int | None:
  """PEFT's layer index of a module path: the first number after
  `layers_pattern` (any name when None), followed by a "."."""
  if layers_pattern is None:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
  else:
    match = None
    for name in ((layers_pattern,) if isinstance(layers_pattern, str)
                 else layers_pattern):
      match = re.match(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", path)
      if match is not None:
        break
  return int(match.group("idx")) if match else None


def _match(names: str | tuple[str, ...] | None, path: str) -> bool:
  if names is None:
    return False
  if isinstance(names, str):
    return re.fullmatch(names, path) is not None
  return path in names or any(path.endswith("." + n) for n in names)


# ----------------------------------------------------------------------------
# the math, shared by the NNX and linen layers


def init_lora_A(key: jax.Array, r: int, in_features: int, init: bool | str,
                dtype: Any) -> jax.Array:
  """PEFT's initial A `[r, in]`: kaiming-uniform(a=sqrt(5)), or N(0, 1/r)."""
  if init == "gaussian":
    return (jax.random.normal(key, (r, in_features), jnp.float32)
            / r).astype(dtype)
  bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5))
  return jax.random.uniform(key, (r, in_features), jnp.float32, -bound,
                            bound).astype(dtype)


def init_lora_B(key: jax.Array, out_features: int, r: int, init: bool | str,
                dtype: Any) -> jax.Array:
  """PEFT's initial B `[out, r]`: zeros, or kaiming-uniform for `False`."""
  if init is False:
    bound = 1.0 / math.sqrt(r)
    return jax.random.uniform(key, (out_features, r), jnp.float32, -bound,
                              bound).astype(dtype)
  return jnp.zeros((out_features, r), dtype)


def init_lora_B_bias(key: jax.Array | None, out_features: int, r: int,
                     init: bool | str, dtype: Any) -> jax.Array:
  """PEFT's initial `lora_B.bias` `[out]` (`lora_bias=True`): zeros, or
  PyTorch `nn.Linear`'s default bias (uniform, bound `1/sqrt(r)`) for
  `False` (the only case that uses `key`)."""
  if init is False:
    bound = 1.0 / math.sqrt(r)
    return jax.random.uniform(key, (out_features,), jnp.float32, -bound,
                              bound).astype(dtype)
  return jnp.zeros((out_features,), dtype)


def dora_weight_norm(weight: jax.Array, lora_A: jax.Array, lora_B: jax.Array,
                     scaling: float) -> jax.Array:
  """`||W + scaling * B @ A||` per output row `[out]`, in A's dtype."""
  dt = lora_A.dtype
  delta = jnp.matmul(lora_B, lora_A, precision=precision_for(dt))
  return jnp.linalg.norm(weight.astype(dt) + scaling * delta, axis=1)


def lora_output(inputs: jax.Array, base_output: jax.Array, *,
                lora_A: jax.Array, lora_B: jax.Array, scaling: float,
                dropout: Callable[[jax.Array], jax.Array] | None = None,
                magnitude: jax.Array | None = None,
                weight: jax.Array | None = None,
                bias: jax.Array | None = None,
                lora_bias: jax.Array | None = None,
                round_first: bool = False) -> jax.Array:
  """The base output plus the (Do)LoRA term, as PEFT computes it.

  Args:
    inputs: the layer input `[..., in]`.
    base_output: the base layer's output `[..., out]` (bias included).
    lora_A: `[r, in]`; its dtype is the adapter compute dtype.
    lora_B: `[out, r]`.
    scaling: the adapter scale.
    dropout: the training dropout on the adapter input, or None (eval, or
      a rate of 0).
    magnitude: DoRA's magnitude `[out]`, or None for plain LoRA.
    weight: DoRA only: the base weight `[out, in]` (dequantized).
    bias: DoRA only: the base bias (subtracted from `base_output`).
    lora_bias: plain LoRA only: B's bias `[out]` (`LoRAConfig.lora_bias`),
      added to `B @ A x` before the scaling.
    round_first: the base is a quantized (bitsandbytes) layer: its output
      is taken in the input's dtype (bitsandbytes' layers return
      `inp_dtype`, whatever their compute dtype) and a plain-LoRA term is
      rounded to that dtype before it is added (PEFT's bitsandbytes
      layers do; its float layers add in float32 and round the sum).

  Returns:
    `[..., out]` in `base_output`'s dtype (the input's with `round_first`).
  """
  if round_first:
    base_output = base_output.astype(inputs.dtype)
  dt = lora_A.dtype
  acc = jnp.promote_types(base_output.dtype, dt)
  prec = precision_for(dt)
  x = inputs.astype(dt)
  xd = x if dropout is None else dropout(x)
  h = jnp.einsum("...i,ri->...r", xd, lora_A, precision=prec)
  lora = jnp.einsum("...r,or->...o", h, lora_B.astype(dt), precision=prec)
  if lora_bias is not None:
    if magnitude is not None:
      raise ValueError("lora_output: `lora_bias` is for plain LoRA, not "
                       "DoRA.")
    lora = lora + lora_bias.astype(dt)
  out = base_output.astype(acc)
  if magnitude is None:
    if round_first:
      return base_output + (lora * scaling).astype(base_output.dtype)
    return (out + (lora * scaling).astype(acc)).astype(base_output.dtype)
  w = weight.astype(dt)
  norm = jax.lax.stop_gradient(dora_weight_norm(
      w, lora_A, jax.lax.stop_gradient(lora_B.astype(dt)), scaling))
  mns = (magnitude.astype(dt) / norm).astype(acc)
  if dropout is None:  # PEFT: the base output less the bias, in its dtype
    base_result = (base_output if bias is None else base_output
                   - bias.astype(base_output.dtype)).astype(acc)
  else:
    base_result = jnp.einsum("...i,oi->...o", xd, w,
                             precision=prec).astype(acc)
  dora = (mns - 1) * base_result + mns * (lora * scaling).astype(acc)
  return (out + dora).astype(base_output.dtype)


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype),
                   jnp.zeros((), x.dtype))


def dense_weight(layer: nnx.Module) -> jax.Array:
  """The float `[out, in]` weight of a `Linear` or `QuantizedLinear`.

  A quantized weight is dequantized as PEFT's `dequantize_bnb_weight` does:
  a 4-bit one to its original dtype, an LLM.int8 one to float32
  (`CB * SCB / 127`, not rounded to the original dtype); a `Linear8bitLt`
  with `has_fp16_weights=True` holds a float weight, returned as is.
  """
  if isinstance(layer, Linear):
    return layer.weight[...]
  value = layer.weight.get_value()
  if isinstance(value, Int8Params):
    return ops.int8_vectorwise_dequant(value.CB, value.SCB)
  if isinstance(value, QuantizedArray):
    return value.dequantize()
  return value


def _bias(layer: nnx.Module) -> jax.Array | None:
  return None if layer.bias is None else layer.bias[...]


# ----------------------------------------------------------------------------
# NNX


class LoRALinear(nnx.Module):
  """A frozen linear plus a trainable LoRA (or DoRA) adapter.

  `base_layer` is the wrapped float `Linear` or `QuantizedLinear` (its
  weight stays a `Param` / `QuantizedWeight`); `lora_A` `[r, in]`,
  `lora_B` `[out, r]` and, for DoRA, `lora_magnitude_vector` `[out]` are
  `nnx.LoRAParam`s, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains
  exactly the adapters. The attribute names are PEFT's: the adapter of the
  module at `model.layers.0.self_attn.q_proj` is saved as
  `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

  Dropout (`config.lora_dropout > 0`) acts on the adapter input in training
  only: it starts in evaluation mode; `model.train()` / `model.eval()`
  switch it.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import Linear4bit
    >>> from jaxbnb.lora import LoRAConfig, LoRALinear
    >>> base = Linear4bit(64, 32, quant_type="nf4", rngs=nnx.Rngs(0))
    >>> layer = LoRALinear(base, LoRAConfig(r=4, lora_alpha=8),
    ...                    rngs=nnx.Rngs(1))
    >>> layer.lora_A.shape, layer.lora_B.shape, layer.scaling
    ((4, 64), (32, 4), 2.0)
    >>> bool(jnp.all(layer(jnp.ones((2, 64))) == base(jnp.ones((2, 64)))))
    True

  Args:
    base_layer: the frozen `Linear` or `QuantizedLinear`.
    config: the hyperparameters (default `LoRAConfig()`).
    path: the layer's dotted module path in its model, which picks its rank
      and alpha from `config.rank_pattern` / `alpha_pattern` ("": `r` and
      `lora_alpha`).
    lora_dtype: dtype of the adapter weights and of the adapter math.
    lora_A: initial `[r, in]` (default: `config.init_lora_weights`).
    lora_B: initial `[out, r]`.
    lora_magnitude_vector: DoRA's initial magnitude `[out]` (default: the
      row norms of `W + scaling * B @ A`, W dequantized).
    lora_B_bias: with `config.lora_bias`, B's initial bias `[out]`
      (default: `init_lora_B_bias`).
    rngs: random generators for the initial adapters (`params`) and the
      dropout (`dropout`); may be None when both adapters are given and
      there is no dropout.

  Raises:
    TypeError: `base_layer` is not a jaxbnb `Linear` or `QuantizedLinear`
      (a `flax.nnx.Linear` included), or `lora_dtype` is not a
      floating-point dtype.
    ValueError: an initial array of the wrong shape, or missing `rngs`.
  """

  def __init__(self, base_layer: nnx.Module, config: LoRAConfig | None = None,
               *, path: str = "", lora_dtype: Any = jnp.float32,
               lora_A: jax.Array | None = None,
               lora_B: jax.Array | None = None,
               lora_magnitude_vector: jax.Array | None = None,
               lora_B_bias: jax.Array | None = None,
               rngs: nnx.Rngs | None = None):
    if not isinstance(base_layer, (Linear, QuantizedLinear)):
      hint = (" " + _FLAX_LINEAR_HINT
              if isinstance(base_layer, nnx.Linear) else "")
      raise TypeError(
          "LoRALinear: `base_layer` must be a jaxbnb Linear or "
          f"QuantizedLinear, got {type(base_layer).__module__}."
          f"{type(base_layer).__name__}.{hint}")
    config = LoRAConfig() if config is None else config
    self.base_layer = base_layer
    self.config = config
    self.in_features = base_layer.in_features
    self.out_features = base_layer.out_features
    self.r = config.rank_for(path)
    self.scaling = config.scaling_for(path)
    self.use_dora = config.use_dora
    dt = lora_float_dtype(lora_dtype, "LoRALinear")
    needs = [n for n, v in (("lora_A", lora_A), ("lora_B", lora_B))
             if v is None]
    if (config.lora_bias and lora_B_bias is None
        and config.init_lora_weights is False):
      needs.append("lora_B_bias")  # random, as nn.Linear's
    if (needs or config.lora_dropout > 0) and rngs is None:
      raise ValueError("LoRALinear: `rngs` is required to initialize "
                       f"{needs or 'the dropout'}.")
    init = config.init_lora_weights
    if lora_A is None:
      lora_A = init_lora_A(rngs.params(), self.r, self.in_features, init, dt)
    if lora_B is None:
      lora_B = init_lora_B(rngs.params(), self.out_features, self.r, init, dt)
    lora_A = self._checked("lora_A", lora_A, (self.r, self.in_features), dt)
    lora_B = self._checked("lora_B", lora_B, (self.out_features, self.r), dt)
    self.lora_A = nnx.LoRAParam(lora_A)
    self.lora_B = nnx.LoRAParam(lora_B)
    if config.lora_bias:
      if base_layer.bias is None:
        warnings.warn(
            f"LoRALinear: lora_bias=True on a base layer without a bias "
            f"({path or type(base_layer).__name__}): the adapter cannot be "
            "merged into it (as in PEFT).", stacklevel=2)
      if lora_B_bias is None:
        lora_B_bias = init_lora_B_bias(
            rngs.params() if init is False else None, self.out_features,
            self.r, init, dt)
      self.lora_B_bias = nnx.LoRAParam(self._checked(
          "lora_B_bias", lora_B_bias, (self.out_features,), dt))
    else:
      if lora_B_bias is not None:
        raise ValueError("LoRALinear: `lora_B_bias` needs lora_bias=True.")
      self.lora_B_bias = nnx.data(None)
    if config.use_dora:
      if lora_magnitude_vector is None:
        lora_magnitude_vector = dora_weight_norm(
            dense_weight(base_layer), lora_A, lora_B, self.scaling)
      m = self._checked("lora_magnitude_vector", lora_magnitude_vector,
                        (self.out_features,), dt)
      self.lora_magnitude_vector = nnx.LoRAParam(m)
    else:
      if lora_magnitude_vector is not None:
        raise ValueError("LoRALinear: `lora_magnitude_vector` needs "
                         "use_dora=True.")
      self.lora_magnitude_vector = nnx.data(None)
    if config.lora_dropout > 0:
      self.lora_dropout = nnx.Dropout(config.lora_dropout, deterministic=True,
                                      rngs=rngs)
    else:
      self.lora_dropout = nnx.data(None)

  @staticmethod
  def _checked(name, value, shape, dtype) -> jax.Array:
    value = jnp.asarray(value)
    if tuple(value.shape) != shape:
      raise ValueError(f"LoRALinear: `{name}` must have shape {list(shape)}, "
                       f"got {list(value.shape)}.")
    return value.astype(dtype)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """`base(x)` plus the adapter term (see `lora_output`)."""
    return self.add_adapter(inputs, self.base_layer(inputs))

  def add_adapter(self, inputs: jax.Array, y: jax.Array) -> jax.Array:
    """The layer's output given its base layer's output `y = base(inputs)`.

    `__call__` is `add_adapter(x, base_layer(x))`; a caller that runs the
    base layer its own way (e.g. per device, tensor-parallel) adds the
    adapter term with this.
    """
    drop = self.lora_dropout
    dropout = None if drop is None or drop.deterministic else drop
    m = self.lora_magnitude_vector
    dora = {}
    if m is not None:
      dora = dict(magnitude=m[...], weight=dense_weight(self.base_layer),
                  bias=_bias(self.base_layer))
    b = self.lora_B_bias
    return lora_output(inputs, y, lora_A=self.lora_A[...],
                       lora_B=self.lora_B[...], scaling=self.scaling,
                       dropout=dropout,
                       lora_bias=None if b is None else b[...],
                       round_first=isinstance(self.base_layer,
                                              QuantizedLinear), **dora)

  def delta_weight(self) -> jax.Array:
    """`scaling * B @ A` `[out, in]` in the adapter dtype."""
    a = self.lora_A[...]
    return self.scaling * jnp.matmul(self.lora_B[...], a,
                                     precision=precision_for(a.dtype))

  def merged_weight(self) -> jax.Array:
    """The float weight with the adapter folded in, in the adapter dtype.

    LoRA: `W + scaling * B @ A`; DoRA: that, times `m / ||.||` per row
    (PEFT's `merge`). W is dequantized for a quantized base.
    """
    a = self.lora_A[...]
    w = dense_weight(self.base_layer).astype(a.dtype) + self.delta_weight()
    if self.lora_magnitude_vector is None:
      return w
    m = self.lora_magnitude_vector[...]
    return (m / jnp.linalg.norm(w, axis=1))[:, None] * w

  def merged_bias(self) -> jax.Array | None:
    """The base bias with B's bias folded in (`lora_bias`): `bias +
    scaling * b`, added in the adapter dtype and rounded to the bias's, as
    PEFT's float layers merge it in place. (PEFT's bitsandbytes layers add
    `b` unscaled, which their own forward does not compute; jaxbnb merges
    every base the same way.)

    Raises:
      ValueError: `lora_bias` on a base layer without a bias (PEFT: it
        cannot merge either).
    """
    bias = _bias(self.base_layer)
    b = self.lora_B_bias
    if b is None:
      return bias
    if bias is None:
      raise ValueError(
          "LoRALinear.merge: lora_bias=True but the base layer has no bias "
          "to fold B's bias into (PEFT cannot merge it either); unload the "
          "adapter or keep it unmerged.")
    b = b[...]
    return (bias.astype(b.dtype) + b * self.scaling).astype(bias.dtype)

  def merge(self, *, requantize: bool = True) -> nnx.Module:
    """A copy of the base layer with the adapter folded in.

    See `merge_lora` for the rounding; this layer is left unchanged.

    Args:
      requantize: for a quantized base, quantize the merged weight again
        with the same settings (else return a float `Linear`).

    Returns:
      A `Linear` or a layer of the base's type.
    """
    base = self.base_layer
    w = self.merged_weight()
    bias = self.merged_bias()
    if not isinstance(base.weight.get_value(), QuantizedArray):
      # a float Linear, or a Linear8bitLt with has_fp16_weights=True
      out = nnx.clone(base)
      out.weight.set_value(w.astype(base.weight.get_value().dtype))
      return _frozen_bias(out, bias)
    q: QuantizedArray = base.weight.get_value()
    if requantize:
      # PEFT quantizes the merged weight as it is (an LLM.int8 one: cast
      # to float16 by `Int8Params`, never rounded to the original dtype
      # first); a 4-bit merge is in the original dtype already.
      out = nnx.clone(base)
      out.weight.set_value(_requantize(
          q, w if isinstance(q, Int8Params) else w.astype(q.dtype)))
      return _frozen_bias(out, bias)
    w = w.astype(q.dtype)
    dtype = base.dtype if base.dtype is not None else jnp.dtype(q.dtype)
    out = nnx.eval_shape(lambda: Linear(
        base.in_features, base.out_features, use_bias=bias is not None,
        dtype=dtype, param_dtype=w.dtype, init_std=0.0, rngs=nnx.Rngs(0)))
    out.weight.set_value(w)
    if bias is not None:
      out.bias.set_value(bias.astype(w.dtype))
    return out


def _frozen_bias(layer: nnx.Module, bias: jax.Array | None) -> nnx.Module:
  """`layer` with its bias set to `bias` (the merged one) and a trained
  bias (`LoRABias`) made a plain `nnx.Param`."""
  if isinstance(layer.bias, LoRABias):
    layer.bias = nnx.Param(layer.bias.get_value(),
                           **layer.bias.get_metadata())
  if bias is not None:
    layer.bias.set_value(bias)
  return layer


def _requantize(q: QuantizedArray, w: jax.Array) -> QuantizedArray:
  """`w` quantized with `q`'s settings."""
  if isinstance(q, Params4bit):
    qs = q.quant_state
    return Params4bit.from_float(
        w, blocksize=qs.blocksize, quant_type=qs.quant_type,
        compress_statistics=qs.nested, quant_storage=q.quant_storage)
  if isinstance(q, Int8Params):
    # PEFT: `bnb.nn.Int8Params(merged).to(device)`, i.e. the float16-cast
    # weight quantized row-wise.
    return int8.quantize_int8_weight(w)
  return type(q).from_float(w)


# ----------------------------------------------------------------------------
# whole models


def lora_float_dtype(lora_dtype: Any, fn: str) -> jnp.dtype:
  """`lora_dtype` as a floating-point dtype.

  Raises:
    TypeError: it is not a dtype, or not a floating-point one (an integer
      adapter rounds its initial `lora_A` to zeros and cannot be trained).
  """
  try:
    dt = jnp.dtype(lora_dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
        f"{fn}: `lora_dtype` must be a floating-point dtype (e.g. "
        f"jnp.float32, PEFT's; or jnp.bfloat16), got "
        f"{dt.name if dt is not None else repr(lora_dtype)}.")
  return dt


# Plain flax.nnx.Linear layers (kernel [in, out]) are not LoRA targets:
# jaxbnb's adapters wrap its own layers ([out, in], PEFT's layout).
_FLAX_LINEAR_HINT = (
    "flax.nnx.Linear is not supported as a LoRA base layer; convert the "
    "model's flax.nnx.Linear layers to jaxbnb layers first with "
    "jaxbnb.nnx.quantize_params(model) (QLoRA), or use flax's own "
    "nnx.LoRA / nnx.LoRALinear for a float flax model.")


def _path(path: tuple[Any, ...]) -> str:
  return ".".join(map(str, path))


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
  """`(dotted path, layer)` of every `LoRALinear` of `model`, in order."""
  return [(_path(p), n) for p, n in nnx.iter_graph(model)
          if isinstance(n, LoRALinear)]


def check_no_lora(model: nnx.Module, fn: str) -> None:
  """Raises if `model` holds LoRA adapters (a full checkpoint cannot).

  Base-model checkpoints (bitsandbytes' format, orbax model checkpoints)
  have no place for adapters: writing one would give a checkpoint that
  loads as a different model, or not at all.

  Raises:
    ValueError: naming the first adapted module and the two ways out.
  """
  found = lora_layers(model)
  if found:
    raise ValueError(
        f"{fn}: the model has LoRA adapters ({found[0][0]!r} and "
        f"{len(found) - 1} more); save them with jaxbnb.lora.save_adapter, "
        "or fold them in with jaxbnb.lora.merge_lora first.")


def linear_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  """`(dotted path, layer)` of the linears a LoRA may target.

  Float `Linear`s, `QuantizedLinear`s and `LoRALinear`s (not their
  `base_layer`), in graph order; paths equal Hugging Face module names for
  jaxbnb models.
  """
  wrapped = {p for p, _ in lora_layers(model)}
  out = []
  for p, node in nnx.iter_graph(model):
    path = _path(p)
    if any(path.startswith(w + ".") or (w == "" and path) for w in wrapped):
      continue
    if isinstance(node, (Linear, QuantizedLinear, LoRALinear)):
      out.append((path, node))
  return out


def find_targets(model: nnx.Module, config: LoRAConfig) -> list[str]:
  """The dotted paths of the linears `config.target_modules` selects.

  Raises:
    ValueError: nothing matches (the message lists some linear names), or
      a matching module is not a linear layer.
  """
  linears = dict(linear_layers(model))
  if config.all_linear:
    found = [p for p in linears if p != OUTPUT_HEAD and not config.excludes(p)]
  else:
    found = []
    for p, node in nnx.iter_graph(model):
      path = _path(p)
      if not isinstance(node, nnx.Module) or not config.matches(path):
        continue
      if path in linears:
        found.append(path)
      elif isinstance(node, nnx.Linear):
        raise NotImplementedError(
            f"target_modules={config.target_modules!r} matches {path!r}, a "
            f"flax.nnx.Linear: {_FLAX_LINEAR_HINT}")
      elif not any(path.startswith(k + ".") for k in linears):
        raise ValueError(
            f"target_modules={config.target_modules!r} matches {path!r}, a "
            f"{type(node).__name__}: LoRA applies to linear layers only.")
    order = {p: i for i, p in enumerate(linears)}
    found.sort(key=order.__getitem__)
  if not found:
    flax_linears = [_path(p) for p, node in nnx.iter_graph(model)
                    if isinstance(node, nnx.Linear)]
    if flax_linears:
      raise NotImplementedError(
          f"target_modules={config.target_modules!r} matches no jaxbnb "
          f"linear layer of {type(model).__name__}, which holds "
          f"flax.nnx.Linear layers (e.g. {flax_linears[0]!r}): "
          f"{_FLAX_LINEAR_HINT}")
    names = sorted({p.rsplit(".", 1)[-1] for p in linears})
    example = next(iter(linears), None)
    layers = ""
    if config.layers_to_transform is not None:
      layers = (f" in the layers layers_to_transform="
                f"{config.layers_to_transform!r} (layers_pattern="
                f"{config.layers_pattern!r}) selects")
    raise ValueError(
        f"target_modules={config.target_modules!r} matches no linear layer "
        f"of {type(model).__name__}{layers}; its linear layers are named "
        f"{names} (full paths such as {example!r}).")
  return found


def _parent(model: nnx.Module, path: str) -> tuple[Any, str | int]:
  parts = path.split(".")
  node = model
  for part in parts[:-1]:
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  last = parts[-1]
  return node, (int(last) if last.isdigit() else last)


def _replace(model: nnx.Module, path: str, new: nnx.Module) -> nnx.Module:
  """Puts `new` at `path`; returns the (possibly new) root."""
  if not path:
    return new
  parent, key = _parent(model, path)
  if isinstance(key, int):
    parent[key] = new
  else:
    setattr(parent, key, new)
  return model


def _check_fresh(model: nnx.Module, fn: str) -> None:
  wrapped = lora_layers(model)
  if wrapped:
    raise ValueError(
        f"{fn}: the model already has LoRA adapters (e.g. at "
        f"{wrapped[0][0]!r}); jaxbnb holds one adapter per model: merge_lora "
        "or unload_lora first.")


def attach_adapters(model: nnx.Module, config: LoRAConfig,
                    targets: Iterable[str], *, rngs: nnx.Rngs | None,
                    lora_dtype: Any = jnp.float32,
                    weights: Mapping[str, Mapping[str, Any]] | None = None,
                    ) -> nnx.Module:
  """Wraps the linears at `targets` in `LoRALinear`s, in place.

  Args:
    model: the model.
    config: the hyperparameters every adapter gets.
    targets: dotted paths of linear layers.
    rngs: random generators (initial adapters, dropout).
    lora_dtype: adapter dtype.
    weights: optional initial arrays per path (`{"lora_A": ..., "lora_B":
      ..., "lora_magnitude_vector": ...}`).

  Returns:
    The model (the new root if `model` itself was a target).
  """
  linears = dict(linear_layers(model))
  for path in targets:
    kw = dict((weights or {}).get(path, {}))
    layer = LoRALinear(linears[path], config, path=path,
                       lora_dtype=lora_dtype, rngs=rngs, **kw)
    model = _replace(model, path, layer)
  return model


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs,
               lora_dtype: Any = jnp.float32) -> nnx.Module:
  """Adds LoRA adapters to the linears `config` targets, in place.

  Each targeted float `Linear` or `QuantizedLinear` (e.g. a 4-bit
  `Linear4bit`: QLoRA) is replaced by a `LoRALinear` holding it; the module
  paths stay the Hugging Face names. The params of the modules
  `config.modules_to_save` selects (e.g. a float `lm_head`) become
  `nnx.LoRAParam`s, trained whole; so do the biases `config.bias` selects
  (as `LoRABias`es). Train with
  `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`.

  Args:
    model: an NNX model whose linears are jaxbnb layers (e.g. a
      `LlamaForCausalLM`).
    config: the `LoRAConfig`.
    rngs: random generators for the initial adapters and the dropout.
    lora_dtype: dtype of the adapters and of their math (PEFT: float32).

  Returns:
    The model (the `LoRALinear` itself when `model` is a single targeted
    linear).

  Raises:
    TypeError: `config` is not a `LoRAConfig`, or `lora_dtype` is not a
      floating-point dtype.
    ValueError: nothing matches `target_modules`, a match is not a linear,
      the model already has adapters, or a `modules_to_save` entry selects
      nothing, a LoRA target or a quantized module.
    NotImplementedError: a match is a plain `flax.nnx.Linear`, or the model
      has only those (convert them with `jaxbnb.nnx.quantize_params`).

  Examples:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxbnb import models
    >>> from jaxbnb.lora import LoRAConfig, apply_lora
    >>> cfg = models.LlamaConfig(vocab_size=64, hidden_size=32,
    ...                          intermediate_size=64, num_hidden_layers=1,
    ...                          num_attention_heads=4, num_key_value_heads=2)
    >>> model = models.LlamaForCausalLM(
    ...     cfg, quantization=models.QuantizationConfig.nf4(),
    ...     rngs=nnx.Rngs(0))
    >>> model = apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"),
    ...                    rngs=nnx.Rngs(1))
    >>> q = model.model.layers[0].self_attn.q_proj
    >>> type(q).__name__, type(q.base_layer).__name__, q.lora_A.shape
    ('LoRALinear', 'Linear4bit', (4, 32))
    >>> sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    2048
  """
  if not isinstance(config, LoRAConfig):
    raise TypeError("apply_lora: `config` must be a LoRAConfig, got "
                    f"{type(config).__name__}.")
  lora_float_dtype(lora_dtype, "apply_lora")
  _check_fresh(model, "apply_lora")
  targets = find_targets(model, config)
  saved = modules_to_save.find_modules_to_save(
      model, config.modules_to_save, targets, fn="apply_lora")
  model = attach_adapters(model, config, targets, rngs=rngs,
                          lora_dtype=lora_dtype)
  modules_to_save.make_trainable(model, saved)
  train_biases(model, config.bias, [layer for _, layer in lora_layers(model)])
  return model


def merge_lora(model: nnx.Module, *, requantize: bool = True) -> nnx.Module:
  """Folds every adapter into its base layer (PEFT's `merge_and_unload`).

  In place: each `LoRALinear` is replaced by its base layer with the merged
  weight (LoRA: `W + scaling * B @ A`; DoRA: that times `m / ||.||` per
  row). A float base keeps its dtype (the sum is rounded to it). A quantized
  base is dequantized, the adapter added in float32 and the result rounded
  to the weight's original dtype; then `requantize=True` quantizes it again
  with the same settings (quant type, blocksize, double quantization,
  storage) as PEFT does for bitsandbytes layers, so the merged model differs
  from the adapted one by the 4-bit rounding of the new weight (up to half
  a code step times the block's absmax per element); `requantize=False`
  makes the layer a float `Linear` instead (exact up to the dtype rounding;
  its compute dtype is the base's, or the weight's when that is None).

  The adapters are gone afterwards: save them first (`save_adapter`) or
  keep a copy (`nnx.clone`) to go back. Modules trained whole
  (`modules_to_save`) keep their trained values, as `nnx.Param`s again.

  Args:
    model: a model with `LoRALinear` layers.
    requantize: for quantized bases, quantize the merged weight again.

  Returns:
    The model (the merged layer itself when `model` is a `LoRALinear`).

  Raises:
    ValueError: the model has no LoRA adapters.
  """
  layers = lora_layers(model)
  if not layers:
    raise ValueError("merge_lora: the model has no LoRA adapters.")
  for path, layer in layers:
    model = _replace(model, path, layer.merge(requantize=requantize))
  modules_to_save.make_frozen(model, _is_lora)
  return model


def unload_lora(model: nnx.Module) -> nnx.Module:
  """Removes every adapter, restoring the base layers (PEFT's `unload`).

  As in PEFT, modules trained whole (`modules_to_save`) keep their trained
  values (as `nnx.Param`s again); PEFT's `unload` keeps the trained copy.

  Returns:
    The model (the base layer itself when `model` is a `LoRALinear`).

  Raises:
    ValueError: the model has no LoRA adapters.
  """
  layers = lora_layers(model)
  if not layers:
    raise ValueError("unload_lora: the model has no LoRA adapters.")
  for path, layer in layers:
    model = _replace(model, path, layer.base_layer)
  modules_to_save.make_frozen(model, _is_lora)
  return model


def _is_lora(node: Any) -> bool:
  return isinstance(node, LoRALinear)


def saved_module_params(model: nnx.Module) -> dict[str, nnx.Param]:
  """`{dotted path: variable}` of the trained whole modules'
  (`modules_to_save`) params: the `nnx.LoRAParam`s outside `LoRALinear`s."""
  return modules_to_save.trained_modules(model, _is_lora)


# ----------------------------------------------------------------------------
# linen


class Dense4bitLoRA(nn.Module):
  """A linen `Dense4bit` with a LoRA (or DoRA) adapter: QLoRA for linen.

  The 4-bit base is the submodule `base_layer` (packed weight in the
  `"quantized"` collection, bias in `"params"`); the adapters are the
  params `lora_A` `[r, in]`, `lora_B` `[features, r]` and, for DoRA,
  `lora_magnitude_vector` `[features]`, so `jax.grad` over
  `variables["params"]` trains them (and the bias, if any: mask it out of
  the optimizer to train the adapters only). Same math as the NNX
  `LoRALinear`.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from jaxbnb.lora import Dense4bitLoRA
    >>> layer = Dense4bitLoRA(features=32, r=4, quant_type="nf4")
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 64)))
    >>> p = variables["params"]
    >>> sorted(p), p["lora_A"].shape, p["lora_B"].shape
    (['base_layer', 'lora_A', 'lora_B'], (4, 64), (32, 4))
    >>> layer.apply(variables, jnp.ones((2, 64))).shape
    (2, 32)

  Attributes:
    features: output features.
    r: adapter rank.
    lora_alpha: scale numerator (scaling `lora_alpha / r`).
    lora_dropout: adapter-input dropout rate in training (rng "dropout").
    use_rslora: scaling `lora_alpha / sqrt(r)`.
    use_dora: DoRA's magnitude vector.
    init_lora_weights: True, "gaussian" or False (see `LoRAConfig`).
    lora_dtype: dtype of the adapters and their math.
    deterministic: disables the dropout (also a call argument).
    use_bias: whether the base adds a bias.
    dtype: base computation dtype (None: inferred).
    param_dtype: dtype of the initial float kernel and of the bias.
    quant_type: "nf4" or "fp4".
    blocksize: elements per absmax block.
    compress_statistics: double-quantize the absmax.
    quant_storage: dtype the packed bytes are viewed as.
    kernel_init: initializer of the float `[in, out]` base kernel.
    bias_init: initializer of the bias.
  """

  features: int
  r: int = 8
  lora_alpha: float = 8
  lora_dropout: float = 0.0
  use_rslora: bool = False
  use_dora: bool = False
  init_lora_weights: bool | str = True
  lora_dtype: Any = jnp.float32
  deterministic: bool | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  quant_type: str = "fp4"
  blocksize: int = 64
  compress_statistics: bool = True
  quant_storage: Any = jnp.uint8
  kernel_init: Callable[..., jax.Array] = default_kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array,
               deterministic: bool | None = None) -> jax.Array:
    """Applies the layer to `inputs` `[..., in_features]`.

    Raises:
      ValueError: as `Dense4bit`, or for bad LoRA hyperparameters.
    """
    cfg = LoRAConfig(r=self.r, lora_alpha=self.lora_alpha,
                     lora_dropout=self.lora_dropout,
                     use_rslora=self.use_rslora, use_dora=self.use_dora,
                     init_lora_weights=self.init_lora_weights)
    base = Dense4bit(
        features=self.features, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, quant_type=self.quant_type,
        blocksize=self.blocksize,
        compress_statistics=self.compress_statistics,
        quant_storage=self.quant_storage, kernel_init=self.kernel_init,
        bias_init=self.bias_init, name="base_layer")
    y = base(inputs)
    n_in, dt = inputs.shape[-1], jnp.dtype(self.lora_dtype)
    init = cfg.init_lora_weights
    a = self.param("lora_A", lambda k: init_lora_A(k, cfg.r, n_in, init, dt))
    b = self.param("lora_B",
                   lambda k: init_lora_B(k, self.features, cfg.r, init, dt))
    dropout = None
    if cfg.lora_dropout > 0 and not nn.merge_param(
        "deterministic", self.deterministic, deterministic):
      key = self.make_rng("dropout")
      dropout = lambda x: _dropout(x, cfg.lora_dropout, key)
    dora = {}
    if cfg.use_dora:
      weight = base.variables[QUANTIZED]["kernel"].dequantize()
      bias = base.variables["params"]["bias"] if self.use_bias else None
      m = self.param("lora_magnitude_vector", lambda k: dora_weight_norm(
          weight, a, b, cfg.scaling))
      dora = dict(magnitude=m, weight=weight, bias=bias)
    return lora_output(inputs, y, lora_A=a, lora_B=b, scaling=cfg.scaling,
                       dropout=dropout, round_first=True, **dora)
