"""Which modules stay in full precision: the skip list and its matching.

The one home of the default skip list and of the rule that matches a module
path against it, shared by `QuantizationConfig.skips` (dotted Hugging Face
paths, transformers' `llm_int8_skip_modules`) and `quantize_params` ("/"
paths of Flax modules).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

__all__ = ["DEFAULT_SKIP_MODULES", "skips"]

# Like transformers' defaults for bitsandbytes: the output head stays in full
# precision, and so do embeddings (a Flax model may hold them as Dense).
DEFAULT_SKIP_MODULES = ("lm_head", "*embed*", "*wte*", "*wpe*")


def skips(path: str, patterns: Iterable[str], sep: str = ".") -> bool:
  """Whether the module at `path` matches one of `patterns`.

  As in transformers, a plain entry matches a module whose path equals it,
  ends with `sep` + it, or contains it as a path component (a dotted entry
  such as "mlp.down_proj" as a run of components); glob patterns (`*`, `?`,
  `[`) are matched against the whole path and each component.

  Args:
    path: the module path, components joined by `sep`.
    patterns: skip entries.
    sep: the component separator of `path` ("." or "/").

  Returns:
    True when the module must stay in full precision.

  Examples:
    >>> from jaxbnb.models import QuantizationConfig
    >>> q = QuantizationConfig.nf4(llm_int8_skip_modules=["mlp.down_proj"])
    >>> q.skips("model.layers.0.mlp.down_proj")
    True
    >>> q.skips("model.layers.0.mlp.up_proj")
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
