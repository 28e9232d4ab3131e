"""Test configuration: CPU by default, 8 virtual devices, GPU marker."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
]


def pytest_collection_modifyitems(config, items):
  del config
  on_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip = pytest.mark.skip(reason="needs a GPU (run `pytest -m gpu` on one)")
  for item in items:
    if "gpu" in item.keywords and not on_gpu:
      item.add_marker(skip)
