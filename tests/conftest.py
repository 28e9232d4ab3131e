"""Test configuration: CPU by default, 8 virtual devices, GPU marker."""

import os

# 8 virtual CPU devices for the shard_map tests, also when XLA_FLAGS is
# already set for something else (the tests require them, never skip).
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG
                             + "=8").strip()

# One persistent XLA compilation cache for every process of a test run
# (the two xdist workers, the tests' subprocesses, the mutation check's
# copies): many tests compile the same small programs, and on a clean
# clone this saves about a quarter of the run (tests/layers: 98 -> 70 s).
# Keys hold the program and the jax/jaxlib versions, so a stale entry is
# never used. Set JAX_COMPILATION_CACHE_DIR to choose another folder.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import getpass  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  try:  # getuser() raises where no user name is known (some containers)
    _user = getpass.getuser()
  except (KeyError, OSError):
    _user = str(os.getuid())
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"jaxbnb-tests-xla-cache-{_user}")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
