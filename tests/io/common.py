"""Shared helpers of the conversion tests (not collected)."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb._src.io import convert
from jaxbnb._src.io.checkpoint_source import open_checkpoint
from jaxbnb._src.io.checkpoint_source import write_safetensors

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden",
                      "bnb_llama")
QUANTIZED = ("nf4_dq_bf16", "fp4_fp32", "nf4_bf16storage_tied")


def golden(variant: str) -> str:
  return os.path.join(GOLDEN, variant)


def golden_logits(variant: str):
  d = np.load(os.path.join(golden(variant), "logits.npz"))
  return d["input_ids"], d["logits"]


def read_all(folder: str) -> dict[str, np.ndarray]:
  src = open_checkpoint(folder)
  return {n: src.load(n) for n in src.names()}


def copy_checkpoint(variant: str, dst: str, *, tensors=None, config=None):
  """Copies a fixture folder, optionally replacing tensors / config."""
  shutil.copytree(golden(variant), dst)
  if tensors is not None:
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
  if config is not None:
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(config, f)
  return dst


def read_config(folder: str) -> dict:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


_MODELS = {}


def load(variant, **kw):
  """from_pretrained on a fixture, cached per (variant, kwargs)."""
  key = (variant, tuple(sorted((k, str(v)) for k, v in kw.items())))
  if key not in _MODELS:
    _MODELS[key] = convert.from_pretrained(golden(variant),
                                           progress=False, **kw)
  return _MODELS[key]


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)[0]


def logits(model, ids):
  """Float32 logits, jitted (one compilation per model structure: eager
  calls of a quantized model are slow on the CPU)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_logits(graphdef, state, jnp.asarray(ids)))


def model_tensors(model):
  """The checkpoint tensors a model writes, as numpy."""
  out = {}
  for tensors in convert.iter_checkpoint_tensors(model):
    out.update(tensors)
  return out


def assert_same_bytes(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    assert got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k


def assert_states_identical(a, b):
  sa, sb = nnx.state(a), nnx.state(b)
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()

