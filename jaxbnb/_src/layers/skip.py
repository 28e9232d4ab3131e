"""Which modules stay in full precision: the skip lists and their matching.

The one home of the default skip lists and of the rules that match a module
path against them: `hf_skips` for `QuantizationConfig.skips` (dotted
Hugging Face paths, transformers' `llm_int8_skip_modules`, read as
transformers 5 reads it) and `skips` for `quantize_params` ("/" paths of
Flax modules).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

__all__ = ["DEFAULT_SKIP_MODULES", "HF_DEFAULT_SKIP_MODULES", "hf_skips",
           "skips"]

# Like transformers' defaults for bitsandbytes: the output head stays in full
# precision, and so do embeddings (a Flax model may hold them as Dense).
DEFAULT_SKIP_MODULES = ("lm_head", "*embed*", "*wte*", "*wpe*")
# transformers' own default for a causal LM (`get_keys_to_not_convert`: the
# output embedding); written out when a skip list is saved, since a saved
# list replaces transformers' default instead of adding to it.
HF_DEFAULT_SKIP_MODULES = ("lm_head",)

# transformers' module boundary: after a ".", or before a "." or the end.
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def hf_skips(path: str, patterns: Iterable[str]) -> bool:
  """Whether the module at dotted `path` matches a transformers skip entry.

  transformers 5's rule (`should_convert_module`): an entry matches when it
  is a suffix of the path (`"fc1"`, also `"proj"` for `"q_proj"`) or, read
  as a regular expression, matches from the start of the path up to a
  module boundary (`"model.layers.1"` matches `model.layers.1.mlp.up_proj`,
  not `model.layers.11...`; `"self_attn"` alone matches no Llama linear).
  An entry that is no regular expression (`"*embed*"`, written by earlier
  jaxbnb versions) is matched as a glob against the path and each
  component.

  Args:
    path: the dotted module path, e.g. "model.layers.0.mlp.up_proj".
    patterns: skip entries.

  Returns:
    True when the module must stay in full precision.

  Examples:
    >>> hf_skips("model.layers.1.mlp.up_proj", ["model.layers.1"])
    True
    >>> hf_skips("model.layers.11.mlp.up_proj", ["model.layers.1"])
    False
    >>> hf_skips("model.layers.0.mlp.down_proj", ["mlp"])
    False
    >>> hf_skips("model.layers.0.mlp.down_proj", ["mlp.down_proj"])
    True
  """
  for pattern in patterns:
    if path.endswith(pattern):
      return True
    try:
      if re.match(rf"(?:{pattern}){_BOUNDARY}", path):
        return True
    except re.error:
      if fnmatch.fnmatch(path, pattern) or any(
          fnmatch.fnmatch(p, pattern) for p in path.split(".")):
        return True
  return False


def skips(path: str, patterns: Iterable[str], sep: str = ".") -> bool:
  """Whether the Flax module at `path` matches one of `patterns`.

  `quantize_params`' rule for Flax paths: a plain entry matches a module
  whose path equals it, ends with `sep` + it, or contains it as a path
  component (a dotted entry such as "mlp.down_proj" as a run of
  components); glob patterns (`*`, `?`, `[`) are matched against the whole
  path and each component. (Hugging Face paths use `hf_skips`.)

  Args:
    path: the module path, components joined by `sep`.
    patterns: skip entries.
    sep: the component separator of `path` ("." or "/").

  Returns:
    True when the module must stay in full precision.

  Examples:
    >>> skips("decoder/layers_0/mlp/down", ["mlp/down"], sep="/")
    True
    >>> skips("decoder/layers_0/mlp/up", ["*embed*", "lm_head"], sep="/")
    False
  """
  parts = path.split(sep)
  for pattern in patterns:
    if any(c in pattern for c in "*?["):
      if fnmatch.fnmatch(path, pattern) or any(
          fnmatch.fnmatch(p, pattern) for p in parts):
        return True
      continue
    pat = pattern.replace(".", sep) if sep != "." else pattern
    if (path == pat or path.endswith(sep + pat) or pat in parts
        or (sep in pat and (sep + pat + sep) in (sep + path + sep))):
      return True
  return False
