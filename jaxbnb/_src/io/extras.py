"""Optional packages: the extras `jaxbnb[hf]` and `jaxbnb[orbax]`.

transformers, tokenizers, jinja2 (chat templates) and gguf (`[hf]`) are
needed only to read GGUF files and tokenizers; orbax-checkpoint (`[orbax]`)
only for orbax model checkpoints. jaxbnb's core never imports them: the
modules that use them import them inside the functions that need them,
through `require`, so `import jaxbnb.convert` works without them and a
feature that needs one says how to install it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["HF_INSTALL", "ORBAX_INSTALL", "require"]

HF_INSTALL = "pip install 'jaxbnb[hf]'"
ORBAX_INSTALL = "pip install 'jaxbnb[orbax]'"
_EXTRAS = {"hf": ("Hugging Face", HF_INSTALL),
           "orbax": ("orbax", ORBAX_INSTALL)}


def require(module: str, feature: str, extra: str = "hf") -> ModuleType:
  """Imports `module`, or says which extra provides it.

  Args:
    module: the module to import, e.g. "gguf" or "transformers".
    feature: what needs it, for the message, e.g. "reading GGUF files".
    extra: the extra that installs it, "hf" or "orbax".

  Returns:
    The imported module.

  Raises:
    ImportError: `module` is not installed; the message names the feature
      and the install command.

  Examples:
    >>> require("json", "parsing").__name__
    'json'
    >>> require("no_such_package_xyz", "testing")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ImportError: testing needs `no_such_package_xyz`, ... 'jaxbnb[hf]'
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    top = module.split(".")[0]
    label, install = _EXTRAS[extra]
    raise ImportError(
        f"{feature} needs `{top}`, which jaxbnb's {label} extra "
        f"installs: {install}") from e
