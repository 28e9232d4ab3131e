"""Test configuration: CPU by default, 8 virtual devices, GPU marker."""

import os

# 8 virtual CPU devices for the shard_map tests, also when XLA_FLAGS is
# already set for something else (the tests require them, never skip).
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG
                             + "=8").strip()

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# The fixture generator needs torch + bitsandbytes on CUDA; never collect it.
collect_ignore = [
    "golden/make_golden.py",
    "golden/make_bnb_llama_golden.py",
    "golden/make_llama_golden.py",
    "golden/make_smollm2_golden.py",
    "golden/make_bnb_optim_golden.py",
    "golden/make_peft_golden.py",
    "golden/make_bnb_int8_golden.py",
]


def pytest_collection_modifyitems(config, items):
  del config
  on_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip = pytest.mark.skip(reason="needs a GPU (run `pytest -m gpu` on one)")
  for item in items:
    if "gpu" in item.keywords and not on_gpu:
      item.add_marker(skip)
