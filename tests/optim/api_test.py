"""The public surface of `jaxbnb.optim`: signatures, docstrings, imports."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

import jaxbnb.optim
from jaxbnb import optim

FUNCTIONS = sorted(name for name in optim.__all__
                   if inspect.isfunction(getattr(optim, name)))
# The bnb-exact aliases: every public factory but the scale_by_* blocks.
FACTORIES = sorted(name for name in FUNCTIONS
                   if name.endswith(("8bit", "32bit"))
                   and not name.startswith("scale_by_"))
_VARARGS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _documented_args(doc: str) -> list[str]:
  """The parameter names of a Google docstring's `Args:` section."""
  match = re.search(r"^Args:\n((?:  .*\n|\n)*)", doc + "\n", re.M)
  assert match, "no Args: section"
  return re.findall(r"^  (\w+):", match.group(1), re.M)


def test_every_public_name_is_exported():
  assert len(set(optim.__all__)) == len(optim.__all__)
  for name in optim.__all__:
    assert hasattr(optim, name), name
  assert len(FACTORIES) == 26, FACTORIES


@pytest.mark.parametrize("name", FUNCTIONS)
def test_public_function_has_real_signature_and_docstring(name):
  fn = getattr(optim, name)
  params = list(inspect.signature(fn).parameters.values())
  assert params and not any(p.kind in _VARARGS for p in params), (
      f"{name}{inspect.signature(fn)}")
  doc = inspect.getdoc(fn)
  assert doc and doc.strip(), name
  assert "Examples:" in doc and ">>> " in doc, name
  assert _documented_args(doc) == [p.name for p in params], name


@pytest.mark.parametrize("name", FACTORIES)
def test_factories_take_learning_rate_and_the_base_parameters(name):
  fn = getattr(optim, name)
  sig = inspect.signature(fn)
  assert next(iter(sig.parameters)) == "learning_rate"
  assert "learning_rate" in inspect.getdoc(fn)
  base = re.sub(r"^paged_", "", name).replace("32bit", "8bit")
  assert list(sig.parameters) == list(
      inspect.signature(getattr(optim, base)).parameters)
  assert sig.parameters["optim_bits"].default == (
      32 if name.endswith("32bit") else 8)
  assert sig.parameters["paged"].default == name.startswith("paged_")


def test_optax_only_import_never_imports_flax_or_transformers():
  code = (
      "import sys\n"
      "import jax.numpy as jnp\n"
      "import jaxbnb.optim\n"
      "opt = jaxbnb.optim.adamw8bit(1e-3)\n"
      "params = {'w': jnp.zeros((64, 64))}\n"
      "opt.update(params, opt.init(params), params)\n"
      "print([m for m in ('flax', 'transformers') if m in sys.modules])\n")
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, cwd=root, timeout=300, check=False,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit", "adam32bit",
                                  "paged_adamw8bit", "sgd8bit"])
@pytest.mark.parametrize("grad_shape", [(64, 128), (128, 32)])
def test_gradient_shape_mismatch_names_the_leaf(name, grad_shape):
  kw = {"momentum": 0.9} if name == "sgd8bit" else {}  # required, as in bnb
  tx = getattr(jaxbnb.optim, name)(1e-3, **kw)
  params = {"dense": {"kernel": jnp.zeros((128, 64))}}
  state = tx.init(params)
  grads = {"dense": {"kernel": jnp.ones(grad_shape)}}
  with pytest.raises(ValueError) as e:
    tx.update(grads, state, params)
  msg = str(e.value)
  assert "['dense']['kernel']" in msg, msg
  assert str(grad_shape) in msg and "(128, 64)" in msg, msg
