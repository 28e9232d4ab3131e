"""PEFT adapter folders: `save_adapter` and `load_adapter`.

A PEFT LoRA adapter is a folder with `adapter_config.json` (the
`LoraConfig` fields) and `adapter_model.safetensors` (metadata
`{"format": "pt"}`) holding, for each adapted module at HF path `<p>`:

  base_model.model.<p>.lora_A.weight       [r, in]
  base_model.model.<p>.lora_B.weight       [out, r]
  base_model.model.<p>.lora_magnitude_vector   [out]   (DoRA only)
  base_model.model.<p>.lora_B.bias         [out]   (lora_bias=True only)

(PEFT strips the adapter name, `.default`, and DoRA's trailing `.weight`
on save: `peft.tuners.lora.model.LoraModel._get_adapter_state_dict`.)
With `bias="all"` or `"lora_only"` the trained biases follow under the
model's own names: `base_model.model.<p>.base_layer.bias` for an adapted
linear, `base_model.model.<q>.bias` for another module ("all" only).
jaxbnb models keep HF module names, so `<p>` is the path of the
`LoRALinear` in the model and nothing is renamed.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from jaxbnb._src.io import paths
from jaxbnb._src.io.checkpoint_source import write_safetensors
from jaxbnb._src.layers.lora import LoRAConfig
from jaxbnb._src.layers.lora import attach_adapters
from jaxbnb._src.layers.lora import find_targets
from jaxbnb._src.layers.lora import linear_layers
from jaxbnb._src.layers.lora import lora_layers
from jaxbnb._src.layers.lora import saved_module_params
from jaxbnb._src.layers import modules_to_save
from jaxbnb._src.layers.lora_bias import train_biases
from jaxbnb._src.layers.lora_bias import trained_biases
from jaxbnb._src.quant.state import to_numpy

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "KEY_PREFIX",
           "adapter_config", "adapter_state_dict", "save_adapter",
           "load_adapter", "read_adapter", "minimal_target_modules"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# key suffix -> LoRALinear argument
_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B",
             ".lora_B.bias": "lora_B_bias",  # lora_bias=True
             ".lora_magnitude_vector": "lora_magnitude_vector",
             # older PEFT versions (a ModuleDict entry's weight)
             ".lora_magnitude_vector.weight": "lora_magnitude_vector",
             # the adapted layer's own weights: PEFT saves them for an
             # adapted lm_head (save_embedding_layers="auto") and, loading,
             # overwrites the base layer with them
             ".base_layer.weight": "base_layer.weight",
             ".base_layer.bias": "base_layer.bias"}
# PEFT condenses target_modules lists at least this long
# (MIN_TARGET_MODULES_FOR_OPTIMIZATION).
_MIN_TARGETS_TO_CONDENSE = 20


def adapter_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The adapter tensors under PEFT's names, as host numpy arrays.

  On a mesh spanning several processes every process gets the whole
  tensors (gathered; all must call this).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.nnx import Linear
    >>> from jaxbnb.lora import LoRAConfig, LoRALinear, adapter_state_dict
    >>> base = Linear(8, 4, use_bias=False, dtype=jnp.float32,
    ...               param_dtype=jnp.float32, init_std=0.02,
    ...               rngs=nnx.Rngs(0))
    >>> sd = adapter_state_dict(LoRALinear(base, LoRAConfig(r=2),
    ...                                    rngs=nnx.Rngs(1)))
    >>> for key, value in sd.items():
    ...   print(key, value.shape, value.dtype)
    base_model.model.lora_A.weight (2, 8) float32
    base_model.model.lora_B.weight (4, 2) float32
  """
  out = {}
  for path, var in saved_module_params(model).items():
    out[KEY_PREFIX + path] = to_numpy(var.get_value())
  for path, var in trained_biases(model).items():  # LoRAConfig.bias
    out[KEY_PREFIX + path] = to_numpy(var.get_value())
  for path, layer in lora_layers(model):
    prefix = KEY_PREFIX + (path + "." if path else "")
    out[prefix + "lora_A.weight"] = to_numpy(layer.lora_A[...])
    out[prefix + "lora_B.weight"] = to_numpy(layer.lora_B[...])
    if layer.lora_B_bias is not None:
      out[prefix + "lora_B.bias"] = to_numpy(layer.lora_B_bias[...])
    if layer.lora_magnitude_vector is not None:
      out[prefix + "lora_magnitude_vector"] = to_numpy(
          layer.lora_magnitude_vector[...])
  return out


def minimal_target_modules(targets: list[str],
                           others: list[str]) -> list[str]:
  """PEFT's condensed `target_modules`: the shortest suffixes that select
  `targets` and none of `others` (`_find_minimal_target_modules`).

  Examples:
    >>> minimal_target_modules(["a.0.q", "a.1.q", "a.0.k"], ["a.0.v", "b.k"])
    ['0.k', 'q']
  """
  def suffixes(s):
    parts = s.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))][::-1]

  other = {x for item in others for x in suffixes(item)}
  required: set[str] = set()
  for item, sfx in sorted(((t, suffixes(t)) for t in set(targets)),
                          key=lambda t: t[1]):
    for s in sfx:
      if s in required or s in other:
        continue
      if not any(item.endswith("." + r) for r in required):
        required.add(s)
        break
  return sorted(required) if required else sorted(set(targets))


def adapter_config(model: nnx.Module, *,
                   base_model_name_or_path: str | None = None
                   ) -> dict[str, Any]:
  """The `adapter_config.json` contents for the adapters of `model`.

  `target_modules` is the config's when it selects exactly the adapted
  modules of `model`; otherwise ("all-linear", None, or adapters attached
  by hand) the list of adapted module paths, condensed to suffixes as PEFT
  does when it has 20 entries or more.

  Raises:
    ValueError: no adapters, or adapters with different hyperparameters.
  """
  layers = lora_layers(model)
  if not layers:
    raise ValueError("save_adapter: the model has no LoRA adapters (use "
                     "apply_lora or load_adapter first).")
  config = layers[0][1].config
  for path, layer in layers:
    c = layer.config
    if (c.r, c.lora_alpha, c.use_rslora, c.use_dora, c.lora_dropout,
        c.rank_pattern, c.alpha_pattern) != (
            config.r, config.lora_alpha, config.use_rslora, config.use_dora,
            config.lora_dropout, config.rank_pattern, config.alpha_pattern):
      raise ValueError(
          f"save_adapter: the adapter at {path!r} has other hyperparameters "
          f"({c}) than the one at {layers[0][0]!r} ({config}); PEFT's "
          "format holds one LoRAConfig per adapter.")
  wrapped = [p for p, _ in layers]
  try:
    same = (config.target_modules is not None and not config.all_linear
            and find_targets(model, config) == wrapped)
  except ValueError:
    same = False
  d = config.to_dict()
  if not same:
    others = [p for p, _ in linear_layers(model) if p not in set(wrapped)]
    if len(wrapped) >= _MIN_TARGETS_TO_CONDENSE:
      d["target_modules"] = minimal_target_modules(wrapped, others)
    else:
      d["target_modules"] = sorted(wrapped)
  d["modules_to_save"] = _modules_to_save_entry(
      config.modules_to_save, list(saved_module_params(model)))
  name = base_model_name_or_path or config.base_model_name_or_path
  if name is None:
    name = paths.source_of(model)
  d["base_model_name_or_path"] = name
  d["inference_mode"] = True
  return d


def _modules_to_save_entry(names: tuple[str, ...] | None,
                           params: list[str]) -> list[str] | None:
  """`modules_to_save` for the config: the config's entries when they
  select the modules of `params` (dotted param paths), else those modules'
  paths; None without trained whole modules."""
  if not params:
    return None
  modules = sorted({p.rsplit(".", 1)[0] for p in params})

  def selected(module: str) -> bool:  # the module or one above it
    parts = module.split(".")
    return any(".".join(parts[:i]).endswith(n) for n in names
               for i in range(1, len(parts) + 1))

  if names and all(selected(m) for m in modules):
    return list(names)
  return modules


# Dicts whose key order is meaning: the first matching key wins.
_ORDERED = ("rank_pattern", "alpha_pattern")


def _sorted(data: Any, ordered: bool = False) -> Any:
  """`data` with dict keys sorted (PEFT writes `sort_keys=True`), except
  the pattern dicts, whose order decides which key applies."""
  if isinstance(data, dict):
    items = data.items() if ordered else sorted(data.items())
    return {k: _sorted(v, k in _ORDERED) for k, v in items}
  if isinstance(data, list):
    return [_sorted(v) for v in data]
  return data


def _write_json(path: str, data: Any) -> None:
  # PEFT's save_pretrained sorts every key, the pattern dicts' too, which
  # changes which overlapping pattern applies when they are read back:
  # jaxbnb keeps their order (PEFT reads them in file order).
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(_sorted(data), indent=2) + "\n")


def save_adapter(model: nnx.Module, path: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None,
                 overwrite: bool = False) -> str:
  """Writes the model's adapters as a PEFT adapter folder.

  `adapter_config.json` and `adapter_model.safetensors` exactly as PEFT's
  `save_pretrained` writes them: keys `base_model.model.<module path>.
  lora_A.weight` `[r, in]`, `.lora_B.weight` `[out, r]` and, for DoRA,
  `.lora_magnitude_vector` `[out]`, in the adapter dtype (float32 by
  default), the trained biases (`LoRAConfig.bias`) under the model's
  names, with metadata `{"format": "pt"}`; `PeftModel.from_pretrained`
  loads it onto the transformers model. The folder is written beside
  `path` and renamed into place; other files of an existing folder (e.g.
  a README.md) are kept when `overwrite=True`.

  Args:
    model: a model with `LoRALinear` layers (`apply_lora`).
    path: the adapter folder.
    base_model_name_or_path: recorded in the config (default: the config's,
      else the checkpoint the model was loaded from).
    overwrite: replace the adapter in an existing non-empty folder.

  Returns:
    The absolute path written.

  Raises:
    ValueError: no adapters, adapters with different hyperparameters, or a
      `path` that is a file or overlaps the model's checkpoint.
    FileExistsError: `path` is a non-empty folder and `overwrite` is False.
  """
  config = adapter_config(model,
                          base_model_name_or_path=base_model_name_or_path)
  tensors = adapter_state_dict(model)

  def write(folder: str) -> None:
    _write_json(os.path.join(folder, ADAPTER_CONFIG), config)
    write_safetensors(os.path.join(folder, ADAPTER_WEIGHTS), tensors,
                      {"format": "pt"})

  return paths.write_folder_atomic(
      path, write, overwrite=overwrite, fn="save_adapter",
      source=paths.source_of(model),
      keep=lambda e: e not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def read_adapter(path: str | os.PathLike
                 ) -> tuple[LoRAConfig, dict[str, np.ndarray]]:
  """Reads a PEFT adapter folder: its `LoRAConfig` and its tensors.

  Raises:
    FileNotFoundError: the folder, its config or its safetensors file is
      missing (a pickled `adapter_model.bin` is named as such).
    ValueError: malformed JSON or safetensors, or a non-LoRA adapter.
    NotImplementedError: an option jaxbnb does not implement.
  """
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"load_adapter: adapter folder {folder!r} does "
                            "not exist.")
  cfg_path = os.path.join(folder, ADAPTER_CONFIG)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"load_adapter: {folder!r} has no "
                            f"{ADAPTER_CONFIG}.")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"load_adapter: {cfg_path!r} is not valid JSON: {e}"
                     ) from e
  config = LoRAConfig.from_dict(raw)
  w_path = os.path.join(folder, ADAPTER_WEIGHTS)
  if not os.path.isfile(w_path):
    if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
      raise FileNotFoundError(
          f"load_adapter: {folder!r} holds a pickled adapter_model.bin; "
          "jaxbnb reads adapter_model.safetensors only (re-save it with "
          "PEFT's save_pretrained(..., safe_serialization=True)).")
    raise FileNotFoundError(f"load_adapter: {folder!r} has no "
                            f"{ADAPTER_WEIGHTS}.")
  try:
    tensors = safetensors.numpy.load_file(w_path)
  except (safetensors.SafetensorError, OSError) as e:
    raise ValueError(f"load_adapter: {w_path!r} is not a readable "
                     f"safetensors file: {e}") from e
  return config, tensors


def _group(tensors: dict[str, np.ndarray], w_path: str
           ) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
  """`{module path: {argument: (key, array)}}` from PEFT's keys."""
  modules: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  for key, value in tensors.items():
    if not key.startswith(KEY_PREFIX):
      raise ValueError(
          f"load_adapter: {w_path!r}: key {key!r} does not start with "
          f"{KEY_PREFIX!r}; not a PEFT LoRA adapter of a causal LM.")
    rest = key[len(KEY_PREFIX):]
    for suffix, name in _SUFFIXES.items():
      if rest.endswith(suffix) or rest == suffix[1:]:
        path = rest[:-len(suffix)] if rest.endswith(suffix) else ""
        arg = name
        break
    else:
      raise NotImplementedError(
          f"load_adapter: {w_path!r}: tensor {key!r} is not a LoRA A/B "
          "weight, a DoRA magnitude or an adapted layer's base_layer "
          "weight/bias, nor a parameter of a module its modules_to_save "
          "selects (embedding adapters are not supported).")
    if arg in modules.setdefault(path, {}):
      raise ValueError(f"load_adapter: {w_path!r}: two tensors for "
                       f"{path!r}.{arg} ({modules[path][arg][0]!r}, {key!r}).")
    modules[path][arg] = (key, value)
  return modules


def load_adapter(model: nnx.Module, path: str | os.PathLike, *,
                 rngs: nnx.Rngs | None = None,
                 lora_dtype: Any = jnp.float32) -> nnx.Module:
  """Applies a PEFT LoRA adapter folder to a jaxbnb model, in place.

  Reads `adapter_config.json` and `adapter_model.safetensors` (as PEFT's
  `save_pretrained` writes them), wraps exactly the linears that have
  tensors in `LoRALinear`s (float or quantized bases alike) and loads the
  weights. Every module must exist as a linear layer of `model`, be
  selected by the config's `target_modules`, and have tensors of the
  shapes its layer needs. Saved biases (`bias="all"` or `"lora_only"`)
  replace the model's, which then train with the adapters (`LoRABias`).

  Args:
    model: the base model (e.g. `from_pretrained` of the adapter's base).
    path: the adapter folder.
    rngs: random generators for the adapter dropout in training (default
      `nnx.Rngs(0)`).
    lora_dtype: dtype the adapters are held and computed in.

  Returns:
    The model, with the adapters attached.

  Raises:
    FileNotFoundError: missing folder or files.
    ValueError: a key for a module the model does not have (another
      architecture?) or that the config does not target, a missing A/B
      (or DoRA magnitude), a shape mismatch (naming the key and both
      shapes), or a model that already has adapters.
    NotImplementedError: an option jaxbnb does not implement (the message
      names it).
  """
  folder = os.fspath(path)
  config, tensors = read_adapter(folder)
  w_path = os.path.join(folder, ADAPTER_WEIGHTS)
  existing = lora_layers(model)
  if existing:
    raise ValueError(
        f"load_adapter: the model already has LoRA adapters (e.g. at "
        f"{existing[0][0]!r}); jaxbnb holds one adapter per model: "
        "merge_lora or unload_lora first.")
  if not tensors:
    raise ValueError(f"load_adapter: {w_path!r} holds no tensors.")
  saved = modules_to_save.find_modules_to_save(
      model, config.modules_to_save, [], fn=f"load_adapter: {folder!r}",
      missing_ok=True)
  saved_values = _saved_module_values(model, saved, tensors, w_path)
  tensors = {k: v for k, v in tensors.items()
             if k[len(KEY_PREFIX):] not in saved_values}
  # bias="all" also saves a module to save's two biases in PEFT's wrapper
  # (the trained copy's, also saved as `<path>.bias`, and the frozen
  # original's): jaxbnb keeps neither wrapper.
  tensors = {k: v for k, v in tensors.items()
             if k not in {f"{KEY_PREFIX}{p}.{w}.bias" for p in saved
                          for w in ("modules_to_save", "original_module")}}
  bias_values = _bias_values(model, config, tensors, w_path)
  tensors = {k: v for k, v in tensors.items()
             if k[len(KEY_PREFIX):] not in bias_values}
  if not tensors:
    raise ValueError(f"load_adapter: {w_path!r} holds no LoRA tensors.")
  modules = _group(tensors, w_path)
  linears = dict(linear_layers(model))
  unknown = sorted(p for p in modules if p not in linears)
  if unknown:
    raise ValueError(
        f"load_adapter: {folder!r} adapts {len(unknown)} module(s) that are "
        f"not linear layers of this {type(model).__name__}: {unknown[:5]} "
        "(an adapter for another architecture?); its linears include "
        f"{list(linears)[:4]}.")
  try:
    targeted = set(find_targets(model, config))
  except ValueError as e:
    raise ValueError(f"load_adapter: {folder!r}: {e}") from e
  untargeted = sorted(p for p in modules if p not in targeted)
  if untargeted:
    raise ValueError(
        f"load_adapter: {folder!r} has tensors for {untargeted[:5]}, which "
        f"its target_modules={config.target_modules!r} does not select.")
  if config.init_lora_weights is False and len(modules) < len(targeted):
    missing = sorted(targeted - set(modules))
    raise ValueError(
        f"load_adapter: {folder!r} targets {missing[:5]} but has no tensors "
        "for them; with init_lora_weights=False PEFT would give them random "
        "adapters.")
  weights, base_values = {}, []
  for p in sorted(modules, key=list(linears).index):
    got = dict(modules[p])
    layer = linears[p]
    for arg in [a for a in got if a.startswith("base_layer.")]:
      base_values.append(_base_value(w_path, p, layer, arg, *got.pop(arg)))
    if not got:
      raise ValueError(
          f"load_adapter: {w_path!r} has base_layer tensors for {p!r} but "
          "no lora_A/lora_B for it.")
    r = config.rank_for(p)
    want = {"lora_A": (r, layer.in_features),
            "lora_B": (layer.out_features, r)}
    if config.use_dora:
      want["lora_magnitude_vector"] = (layer.out_features,)
    if config.lora_bias:
      want["lora_B_bias"] = (layer.out_features,)
    for arg in want:
      if arg not in got:
        key = next(KEY_PREFIX + p + s for s, a in _SUFFIXES.items()
                   if a == arg)
        raise ValueError(f"load_adapter: {w_path!r} has no {arg} for "
                         f"{p!r} (expected the key {key!r}).")
    for arg, (key, value) in got.items():
      if arg not in want:
        option = ("lora_bias" if arg == "lora_B_bias" else "use_dora")
        raise ValueError(f"load_adapter: {w_path!r}: tensor {key!r} but the "
                         f"config has {option}=False.")
      if tuple(value.shape) != want[arg]:
        raise ValueError(
            f"load_adapter: {w_path!r}: tensor {key!r} has shape "
            f"{list(value.shape)}, the model needs {list(want[arg])} "
            f"(r={r}, in_features={layer.in_features}, "
            f"out_features={layer.out_features}).")
      if not np.issubdtype(value.dtype, np.floating) and (
          value.dtype.name != "bfloat16"):
        raise ValueError(f"load_adapter: {w_path!r}: tensor {key!r} has "
                         f"dtype {value.dtype}, expected a float.")
    weights[p] = {arg: jnp.asarray(v) for arg, (_, v) in got.items()}
  with warnings.catch_warnings():  # warned above already
    warnings.simplefilter("ignore")
    modules_to_save.find_modules_to_save(  # a saved module adapted too?
        model, config.modules_to_save, list(weights),
        fn=f"load_adapter: {folder!r}", missing_ok=True)
  if rngs is None:
    rngs = nnx.Rngs(0)
  for var, value in base_values + list(bias_values.values()):
    var.set_value(value)  # all checked: now PEFT's overwrite
  model = attach_adapters(model, config, list(weights), rngs=rngs,
                          lora_dtype=lora_dtype, weights=weights)
  modules_to_save.make_trainable(model, saved)  # unties a tied pair
  train_biases(model, config.bias, [layer for _, layer in lora_layers(model)])
  params = saved_module_params(model)
  for name, value in saved_values.items():
    params[name].set_value(value)
  return model


def _saved_module_values(model: nnx.Module, saved: list[str],
                         tensors: dict[str, np.ndarray], w_path: str
                         ) -> dict[str, jax.Array]:
  """`{dotted param path: new value}` for the tensors of the
  modules trained whole (`modules_to_save`, saved under their own names).

  PEFT loads them into its copy of the module (`load_state_dict`, cast to
  the parameter's dtype; a param without a tensor keeps the original
  value); jaxbnb checks shape and dtype first.
  """
  out = {}
  for path in saved:
    module = modules_to_save.module_at(model, path)
    if module is None and path == modules_to_save.TIED_HEAD:
      # a tied head: its copy will hold the embedding's shape and dtype
      module = modules_to_save.tied_embedding(model)
    for name, var in modules_to_save.module_params(module).items():
      key = f"{KEY_PREFIX}{path}.{name}"
      if key not in tensors:
        continue
      out[f"{path}.{name}"] = _replacement(
          w_path, key, tensors[key], var, f"a modules_to_save module's "
          f"{name}", f"{path}.{name}")
  return out


def _bias_values(model: nnx.Module, config: LoRAConfig,
                 tensors: dict[str, np.ndarray], w_path: str
                 ) -> dict[str, tuple[nnx.Variable, jax.Array]]:
  """`{dotted path: (variable, new value)}` for the biases of modules
  without an adapter that a `bias="all"` adapter holds (`<path>.bias`;
  an adapted linear's is `<path>.base_layer.bias`, loaded with it)."""
  plain = [k for k in tensors if k.startswith(KEY_PREFIX)
           and k.endswith(".bias") and not k.endswith(".base_layer.bias")
           and ".lora_" not in k]  # lora_B.bias: PEFT's lora_bias
  if config.bias != "all":
    if plain:
      raise ValueError(
          f"load_adapter: {w_path!r}: tensor {plain[0]!r} is the bias of a "
          "module without an adapter, which PEFT saves for bias='all' only; "
          f"the adapter's config has bias={config.bias!r}.")
    return {}
  variables = {".".join(map(str, p)): node
               for p, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Variable)}
  out = {}
  for key in plain:
    path, value = key[len(KEY_PREFIX):], tensors[key]
    var = variables.get(path)
    if not isinstance(var, nnx.Param):
      raise ValueError(
          f"load_adapter: {w_path!r}: tensor {key!r} (a bias trained with "
          f"bias='all') but this {type(model).__name__} has no bias "
          f"{path!r} (another architecture?).")
    out[path] = (var, _replacement(
        w_path, key, value, var,
        "a bias trained with bias='all', which PEFT loads over the model's",
        path))
  return out


def _replacement(w_path: str, key: str, value: np.ndarray,
                 var: nnx.Variable, what: str, where: str) -> jax.Array:
  """`value` cast to `var`'s dtype, as PEFT's `load_state_dict` casts,
  after checking that it is a float array of `var`'s shape."""
  want = tuple(var.get_value().shape)
  if tuple(value.shape) != want:
    raise ValueError(
        f"load_adapter: {w_path!r}: tensor {key!r} ({what}) has shape "
        f"{list(value.shape)}, the model's {where} is {list(want)} (a "
        "resized vocabulary or another base model?).")
  if not np.issubdtype(value.dtype, np.floating) and (
      value.dtype.name != "bfloat16"):
    raise ValueError(f"load_adapter: {w_path!r}: tensor {key!r} has dtype "
                     f"{value.dtype}, expected a float.")
  return jnp.asarray(value).astype(var.get_value().dtype)


def _base_value(w_path: str, path: str, layer: nnx.Module, arg: str,
                key: str, value: np.ndarray) -> tuple[nnx.Variable, Any]:
  """The variable a saved `base_layer` tensor replaces, and its new value.

  PEFT's `set_peft_model_state_dict` loads such a tensor into the base
  layer (`load_state_dict`, which casts to the parameter's dtype); jaxbnb
  does the same for a float linear after checking shape and dtype.
  """
  name = arg[len("base_layer."):]
  var = getattr(layer, name, None)
  if name == "weight" and not isinstance(var, nnx.Param):
    # A quantized weight lives in its own (non-Param) variable type.
    raise NotImplementedError(
        f"load_adapter: {w_path!r}: tensor {key!r} holds the base weight of "
        f"{path!r}, which PEFT loads over the base layer, but {path!r} is a "
        f"{type(layer).__name__} here: jaxbnb does not replace a quantized "
        f"weight. Keep {path!r} in float (e.g. in the quantization "
        f"config's skip modules) or remove the key if it is the base "
        "model's own weight.")
  if not isinstance(var, nnx.Param):
    raise ValueError(
        f"load_adapter: {w_path!r}: tensor {key!r} but {path!r} has no "
        f"{name}.")
  return var, _replacement(
      w_path, key, value, var,
      f"the base layer's {name}, which PEFT loads over the model's",
      f"{path}.{name}")
