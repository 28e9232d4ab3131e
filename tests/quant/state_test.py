"""QuantState equality, as bitsandbytes' `QuantState.__eq__` defines it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F


def _state(quant_type="nf4", compress=False, blocksize=64, shape=(16, 64),
           seed=0, dtype=jnp.float32):
  w = jax.random.normal(jax.random.key(seed), shape, dtype)
  _, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                          compress_statistics=compress)
  return qs


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
def test_equal_states_compare_equal(quant_type, compress):
  a = _state(quant_type, compress)
  b = _state(quant_type, compress)  # same values, distinct arrays
  assert a.absmax is not b.absmax
  assert a == b and b == a  # symmetric
  assert not a != b  # pylint: disable=unneeded-not
  # Host copies (numpy leaves) compare equal to the device arrays.
  host = jax.tree.map(np.asarray, a)
  assert isinstance(host.absmax, np.ndarray)
  assert host == a and a == host


@pytest.mark.parametrize("compress", [False, True])
def test_equal_after_bnb_dict_round_trip(compress):
  qs = _state("nf4", compress)
  assert F.QuantState.from_dict(qs.as_dict(packed=True)) == qs
  assert F.QuantState.from_dict(qs.as_dict()) == qs


def test_absmax_and_code_compared_with_tolerance():
  # bitsandbytes compares with torch.allclose(atol=1e-6) and its default
  # rtol=1e-5: |a - b| <= 1e-6 + 1e-5 * |b|. Pinned from both sides, so a
  # wider (or exact) comparison fails.
  qs = _state("nf4")
  a3 = float(np.asarray(qs.absmax)[3])
  tol = 1e-6 + 1e-5 * a3
  inside = dataclasses.replace(qs, absmax=qs.absmax.at[3].add(0.9 * tol))
  assert inside == qs
  outside = dataclasses.replace(qs, absmax=qs.absmax.at[3].add(1.1 * tol))
  assert outside != qs
  close = dataclasses.replace(qs, absmax=qs.absmax + 1e-7)
  assert close == qs
  far = dataclasses.replace(qs, absmax=qs.absmax.at[3].add(1e-3))
  assert far != qs
  code_in = dataclasses.replace(qs, code=qs.code.at[5].add(5e-7))
  assert code_in == qs
  code_out = dataclasses.replace(qs, code=qs.code.at[5].add(2e-6 + 1e-5))
  assert code_out != qs
  code = dataclasses.replace(qs, code=qs.code.at[0].set(-0.5))
  assert code != qs
  fewer = dataclasses.replace(qs, absmax=qs.absmax[:-1])
  assert fewer != qs  # a different shape is unequal, not an error


def test_static_fields_compared():
  qs = _state("nf4")
  assert _state("fp4") != qs  # quant_type (and code)
  assert dataclasses.replace(qs, quant_type="fp4") != qs
  assert dataclasses.replace(qs, blocksize=128) != qs
  assert dataclasses.replace(qs, shape=(64, 16)) != qs
  assert dataclasses.replace(qs, dtype="bfloat16") != qs
  assert _state("nf4", dtype=jnp.bfloat16) != qs
  assert _state("nf4", seed=1) != qs


def test_nested_state_compared():
  plain, nested = _state("nf4", False), _state("nf4", True)
  assert plain != nested and nested != plain
  assert dataclasses.replace(nested, offset=nested.offset + 1e-3) != nested
  assert dataclasses.replace(nested, offset=None) != nested
  assert dataclasses.replace(
      nested, nested_absmax=nested.nested_absmax * 2) != nested
  assert dataclasses.replace(
      nested, nested_code=nested.nested_code[::-1]) != nested
  assert dataclasses.replace(nested, nested_blocksize=128) != nested


def test_8bit_blockwise_states():
  x = jax.random.normal(jax.random.key(0), (512,))
  _, a = F.quantize_blockwise(x)
  _, b = F.quantize_blockwise(x)
  assert a.quant_type is None
  assert a == b
  _, c = F.quantize_blockwise(2 * x)
  assert a != c


def test_other_types_are_not_equal():
  # False, as in bitsandbytes (not NotImplemented: numpy's reflected `!=`
  # would then give an elementwise array).
  qs = _state("nf4")
  assert qs.__eq__("nf4") is False
  assert (qs == "nf4") is False
  assert (qs == None) is False  # pylint: disable=singleton-comparison
  assert qs != np.asarray(qs.absmax)
  w = F.Params4bit(jnp.zeros((512, 1), jnp.uint8), qs)
  assert qs != w
  assert qs == w.quant_state


def test_hashing_unchanged():
  # The dataclass hash covers the array fields, which are unhashable: a
  # QuantState is a pytree, never a static argument.
  with pytest.raises(TypeError, match="unhashable"):
    hash(_state("nf4"))
