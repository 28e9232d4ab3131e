"""`LlamaConfig`: the static configuration of Llama, Mistral and Qwen2 models.

One frozen (hashable) dataclass covers the three Hugging Face families that
share the Llama layout. `LlamaConfig.from_hf` reads a `config.json` dict
written by transformers 4.x (`rope_theta` + `rope_scaling`) or 5.x
(`rope_parameters`); `to_hf` writes one transformers 5 loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["LlamaConfig", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCH_OF_TYPE = {v: k for k, v in _ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# transformers' defaults per family, used for keys a config.json leaves out.
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None,
                  bos_token_id=1, eos_token_id=2),
    "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8,
                    bos_token_id=1, eos_token_id=2, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=None,
                  bos_token_id=None, eos_token_id=None),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads")


def _freeze(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hyperparameters of a Llama-family decoder (Llama, Mistral, Qwen2).

  Field names and meanings follow transformers' `LlamaConfig`. The config is
  hashable, so it can be a static `jax.jit` argument.

  Example::

    >>> from jaxbnb.models import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2)
    >>> cfg.head_dim, cfg.num_key_value_groups
    (8, 2)
    >>> LlamaConfig.from_hf(cfg.to_hf()) == cfg
    True

  Attributes:
    vocab_size: vocabulary size.
    hidden_size: model width.
    intermediate_size: MLP width.
    num_hidden_layers: decoder layers.
    num_attention_heads: query heads.
    num_key_value_heads: key/value heads (GQA); None means
      `num_attention_heads`.
    head_dim: per-head width; None means `hidden_size // num_attention_heads`.
    hidden_act: MLP activation; only "silu" (or its other name, "swish").
    max_position_embeddings: longest context the model was trained for.
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: RoPE scaling as a tuple of (key, value) pairs with a
      "rope_type" key ("linear", "dynamic", "llama3", "yarn"); None for plain
      RoPE. `rope_scaling_dict` gives it as a dict.
    attention_bias: whether q/k/v projections have a bias (Llama: o_proj too;
      see `o_proj_bias`).
    mlp_bias: whether the MLP projections have a bias.
    tie_word_embeddings: whether the LM head reuses the token embeddings.
    model_type: "llama", "mistral" or "qwen2".
    sliding_window: attention window in tokens (a key is visible when fewer
      than `sliding_window` real tokens separate it from the query, itself
      included), or None.
    layer_types: per-layer "full_attention" / "sliding_attention" (Qwen2;
      Mistral, which transformers then builds as Ministral); None means
      every layer uses `sliding_window` when it is set.
    initializer_range: std of the normal initializer of fresh weights.
    bos_token_id: beginning-of-sequence token.
    eos_token_id: end-of-sequence tokens (a tuple).
    pad_token_id: padding token.
    torch_dtype: the checkpoint's dtype name ("float32", "bfloat16", ...).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  model_type: str = "llama"
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  torch_dtype: str | None = None

  def __post_init__(self):
    setf = lambda k, v: object.__setattr__(self, k, v)
    for name in _REQUIRED + ("num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if value is None:
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"LlamaConfig: `{name}` must be a positive int, got {value!r}.")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"LlamaConfig: unsupported model_type {self.model_type!r}; "
          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    if self.hidden_act not in ("silu", "swish"):  # transformers: the same
      raise NotImplementedError(
          f"LlamaConfig: hidden_act {self.hidden_act!r} is not supported "
          "(only 'silu', also named 'swish').")
    if self.num_key_value_heads is None:
      setf("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
            "LlamaConfig: `num_attention_heads` must divide `hidden_size` "
            f"when `head_dim` is not given, got hidden_size={self.hidden_size}"
            f", num_attention_heads={self.num_attention_heads}.")
      setf("head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          "LlamaConfig: `num_key_value_heads` must divide "
          f"`num_attention_heads`, got num_key_value_heads="
          f"{self.num_key_value_heads}, num_attention_heads="
          f"{self.num_attention_heads}.")
    if self.head_dim % 2:
      raise ValueError(
          "LlamaConfig: `head_dim` must be even for RoPE, got "
          f"{self.head_dim}.")
    if self.sliding_window is not None and (
        isinstance(self.sliding_window, bool)
        or not isinstance(self.sliding_window, int) or self.sliding_window < 1):
      raise ValueError(
          "LlamaConfig: `sliding_window` must be a positive int or None, got "
          f"{self.sliding_window!r}.")
    if self.layer_types is not None:
      setf("layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.num_hidden_layers or not set(
          self.layer_types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(
            "LlamaConfig: `layer_types` must list 'full_attention' or "
            "'sliding_attention' for each of the "
            f"{self.num_hidden_layers} layers, got {self.layer_types!r}.")
    eos = self.eos_token_id
    if eos is None:
      eos = ()
    elif isinstance(eos, int):
      eos = (eos,)
    setf("eos_token_id", tuple(int(e) for e in eos))
    setf("rope_theta", float(self.rope_theta))
    if self.rope_scaling is not None:
      scaling = _normalize_rope_scaling(dict(self.rope_scaling),
                                        self.max_position_embeddings)
      setf("rope_scaling", None if scaling is None else _freeze(scaling))

  # -- derived --------------------------------------------------------------

  @property
  def num_key_value_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def o_proj_bias(self) -> bool:
    """Whether o_proj has a bias (Llama: `attention_bias`; Qwen2: never)."""
    return self.attention_bias and self.model_type == "llama"

  @property
  def rope_type(self) -> str:
    """"default" or the `rope_scaling` type."""
    return self.rope_scaling_dict.get("rope_type", "default")

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    """`rope_scaling` as a dict (empty for plain RoPE)."""
    return dict(self.rope_scaling or ())

  def layer_sliding_window(self, layer: int) -> int | None:
    """The sliding window of decoder layer `layer` (None: full attention)."""
    if self.sliding_window is None:
      return None
    if self.layer_types is None:
      return self.sliding_window
    if self.layer_types[layer] == "sliding_attention":
      return self.sliding_window
    return None

  # -- Hugging Face config.json -----------------------------------------------

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "LlamaConfig":
    """Builds a config from a Hugging Face `config.json` dict.

    Reads transformers 4.x keys (`rope_theta`, `rope_scaling` with "type" or
    "rope_type") and 5.x keys (`rope_parameters`). For llama3 and yarn RoPE a
    top-level `original_max_position_embeddings` takes precedence over the
    rope dict's, then the rope dict's, then `max_position_embeddings` (as
    transformers 5 resolves it). Qwen2 always has q/k/v
    biases; its sliding window is used only with `use_sliding_window`.

    Args:
      config: the parsed `config.json`.

    Returns:
      The `LlamaConfig`.

    Raises:
      ValueError: for an unsupported `model_type`/`architectures`, a missing
        key or inconsistent head counts.
      NotImplementedError: for an unsupported activation or RoPE type.
    """
    if not isinstance(config, Mapping):
      raise TypeError(
          "LlamaConfig.from_hf: `config` must be a dict (config.json), got "
          f"{type(config).__name__}.")
    model_type = config.get("model_type")
    if model_type is None:
      archs = [a for a in config.get("architectures") or ()
               if a in _ARCHITECTURES]
      if archs:
        model_type = _ARCHITECTURES[archs[0]]
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          "LlamaConfig.from_hf: unsupported model_type "
          f"{model_type!r} (architectures {config.get('architectures')!r}); "
          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
          f"({', '.join(_ARCHITECTURES)}).")
    missing = [k for k in _REQUIRED if config.get(k) is None]
    if missing:
      raise ValueError(
          f"LlamaConfig.from_hf: config.json lacks {', '.join(missing)}.")
    defaults = _DEFAULTS[model_type]
    get = lambda k, d=None: config.get(k, defaults.get(k, d))

    rope_parameters = config.get("rope_parameters")
    if rope_parameters is not None and not isinstance(rope_parameters,
                                                      Mapping):
      raise ValueError(
          "LlamaConfig.from_hf: `rope_parameters` must be a dict, got "
          f"{rope_parameters!r}.")
    if rope_parameters and "rope_type" not in rope_parameters and (
        "type" not in rope_parameters) and "rope_theta" not in rope_parameters:
      raise NotImplementedError(
          "LlamaConfig.from_hf: per-layer-type `rope_parameters` "
          f"({sorted(rope_parameters)}) are not supported.")
    scaling = dict(rope_parameters or config.get("rope_scaling") or {})
    rope_theta = scaling.pop("rope_theta", None)
    if rope_theta is None:
      rope_theta = config.get("rope_theta", 10000.0)
    partial = scaling.pop("partial_rotary_factor",
                          config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
      raise NotImplementedError(
          "LlamaConfig.from_hf: partial_rotary_factor="
          f"{partial!r} is not supported (only 1.0).")
    # transformers 4.x configs may give the pretraining length at the top
    # level; transformers 5 (`standardize_rope_params`) lets that key win
    # over the rope dict's for llama3 and yarn, and ignores it otherwise.
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("llama3", "yarn") and (
        "original_max_position_embeddings" in config):
      top = config["original_max_position_embeddings"]
      if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(
            "LlamaConfig.from_hf: top-level `original_max_position_embeddings`"
            f" must be a positive int for rope_type {kind!r}, got {top!r}.")
      scaling["original_max_position_embeddings"] = top

    if model_type == "qwen2":
      attention_bias = True
      use_sw = bool(config.get("use_sliding_window", False))
      sliding_window = config.get("sliding_window") if use_sw else None
      layer_types = config.get("layer_types")
      if sliding_window is not None and layer_types is None:
        mwl = config.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= mwl else "full_attention"
                       for i in range(config["num_hidden_layers"])]
      if sliding_window is None:
        layer_types = None
    elif model_type == "mistral":
      attention_bias = False
      sliding_window = get("sliding_window")
      # With `layer_types` transformers builds it as Ministral: the window
      # on the "sliding_attention" layers only.
      layer_types = (config.get("layer_types") if sliding_window is not None
                     else None)
    else:
      attention_bias = bool(config.get("attention_bias", False))
      sliding_window = None
      layer_types = None

    return cls(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=get("num_key_value_heads"),
        head_dim=config.get("head_dim"),
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=get("max_position_embeddings"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=scaling or None,
        attention_bias=attention_bias,
        # Mistral's and Qwen2's MLPs have no bias whatever the config says
        # (transformers ignores the key there).
        mlp_bias=(model_type == "llama"
                  and bool(config.get("mlp_bias", False))),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        model_type=model_type,
        sliding_window=sliding_window,
        layer_types=tuple(layer_types) if layer_types else None,
        initializer_range=float(config.get("initializer_range", 0.02)),
        bos_token_id=get("bos_token_id"),
        eos_token_id=get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        torch_dtype=config.get("dtype", config.get("torch_dtype")),
    )

  def to_hf(self) -> dict[str, Any]:
    """A `config.json` dict (transformers 5 format) for this config."""
    rope = {"rope_type": "default", **self.rope_scaling_dict,
            "rope_theta": self.rope_theta}
    eos = self.eos_token_id
    out = {
        "architectures": [_ARCH_OF_TYPE[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": self.hidden_act,
        "max_position_embeddings": self.max_position_embeddings,
        "initializer_range": self.initializer_range,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None),
        "pad_token_id": self.pad_token_id,
        "use_cache": True,
    }
    if self.torch_dtype is not None:
      out["dtype"] = self.torch_dtype
    if self.model_type == "llama":
      out["attention_bias"] = self.attention_bias
      out["mlp_bias"] = self.mlp_bias
    elif self.model_type == "mistral":
      out["sliding_window"] = self.sliding_window
      if self.layer_types is not None:
        out["layer_types"] = list(self.layer_types)
    else:
      out["use_sliding_window"] = self.sliding_window is not None
      out["sliding_window"] = self.sliding_window
      if self.layer_types is not None:
        out["layer_types"] = list(self.layer_types)
        out["max_window_layers"] = next(
            (i for i, t in enumerate(self.layer_types)
             if t == "sliding_attention"), self.num_hidden_layers)
    return out


def _normalize_rope_scaling(scaling: dict[str, Any],
                            max_position_embeddings: int):
  """Checks a rope scaling dict; returns it with "rope_type" (None: plain)."""
  scaling = dict(scaling)
  rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
  scaling.pop("type", None)
  scaling.pop("rope_theta", None)
  if rope_type is None:
    rope_type = "default"
  if rope_type not in ROPE_TYPES:
    raise NotImplementedError(
        f"LlamaConfig: rope_type {rope_type!r} is not supported; supported: "
        f"{', '.join(ROPE_TYPES)}.")
  if rope_type == "default":
    return None
  need = {"linear": ("factor",), "dynamic": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
          "yarn": ("factor",)}[rope_type]
  missing = [k for k in need if scaling.get(k) is None]
  if missing:
    raise ValueError(
        f"LlamaConfig: rope_scaling of type {rope_type!r} needs "
        f"{', '.join(missing)}; got {scaling!r}.")
  if rope_type in ("llama3", "yarn"):
    scaling.setdefault("original_max_position_embeddings",
                       max_position_embeddings)
  return {"rope_type": rope_type, **scaling}
