"""QuantState equality, as bitsandbytes' `QuantState.__eq__` defines it."""

from __future__ import annotations

import dataclasses
import json
import re

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


def test_nan_absmax_state_equals_itself():
  # NaNs in the same places compare equal (torch.allclose would say no), so
  # a state always equals itself and a copy of itself.
  qs = _state("nf4")
  nan = dataclasses.replace(qs, absmax=qs.absmax.at[1].set(jnp.nan))
  assert nan == nan  # pylint: disable=comparison-with-itself
  assert nan == jax.tree.map(np.array, nan)
  assert nan != qs and qs != nan
  assert dataclasses.replace(qs, absmax=qs.absmax.at[2].set(jnp.nan)) != nan


# ---------------------------------------------------------------------------
# Loading checks: a broken (double-quantized) checkpoint is a clear error,
# never a silently wrong model.
# ---------------------------------------------------------------------------

_PREFIX = "m."
_BLOB = "m.weight.quant_state.bitsandbytes__nf4"


def _checkpoint(compress=True, shape=(40, 300)):
  """A `Params4bit` state dict (nb = 188 blocks, 1 nested block)."""
  w = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  p = F.Params4bit.from_float(w, quant_type="nf4",
                              compress_statistics=compress)
  return p, p.state_dict(_PREFIX)


def _edit_json(sd, **changes):
  meta = json.loads(bytes(sd[_BLOB]).decode())
  for k, v in changes.items():
    if v is _DROP:
      del meta[k]
    else:
      meta[k] = v
  sd[_BLOB] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()


_DROP = object()


def _drop(*keys):
  def edit(sd):
    for k in keys:
      del sd["m.weight." + k]
  return edit


def _set(key, fn):
  def edit(sd):
    sd["m.weight." + key] = fn(sd["m.weight." + key])
  return edit


def _plain_without_nested_tensors(sd):
  # A nested checkpoint with both nested tensors and the JSON fields gone:
  # only the uint8 absmax codes are left.
  _drop("nested_absmax", "nested_quant_map")(sd)
  _edit_json(sd, nested_offset=_DROP, nested_blocksize=_DROP,
             nested_dtype=_DROP)


_NESTED_BROKEN = [
    ("missing-nested_absmax", _drop("nested_absmax"),
     "missing 'm.weight.nested_absmax': the state is double-quantized"),
    ("missing-nested_quant_map", _drop("nested_quant_map"),
     "missing 'm.weight.nested_quant_map'"),
    ("missing-both-nested-tensors", _drop("nested_absmax", "nested_quant_map"),
     "missing 'm.weight.nested_absmax', 'm.weight.nested_quant_map'"),
    ("uint8-absmax-alone", _plain_without_nested_tensors,
     "missing 'm.weight.nested_absmax', 'm.weight.nested_quant_map', "
     "'m.weight.nested_offset', 'm.weight.nested_blocksize': the state is "
     "double-quantized (it has a uint8 absmax)"),
    ("missing-nested_offset", lambda sd: _edit_json(sd, nested_offset=_DROP),
     "missing 'm.weight.nested_offset'"),
    ("empty-nested_absmax", _set("nested_absmax", lambda a: a[:0]),
     "'m.weight.nested_absmax' must have at least 1 entries (one per 256 "
     "absmax codes: ceil(188 / 256)), got 0"),
    ("short-nested_quant_map", _set("nested_quant_map", lambda a: a[:100]),
     "'m.weight.nested_quant_map' must have 256 entries (the 8-bit dynamic "
     "map), got 100"),
    ("short-absmax-codes", _set("absmax", lambda a: a[:-1]),
     "'m.weight.absmax' must have 188 entries (ceil(n / blocksize) = "
     "ceil(12000 / 64) for shape (40, 300)), got 187"),
    ("short-quant_map", _set("quant_map", lambda a: a[:15]),
     "'m.weight.quant_map' must have 16 entries (the 4-bit table), got 15"),
    ("int-nested_absmax", _set("nested_absmax", lambda a: a.astype(np.int32)),
     "'m.weight.nested_absmax' must be a float32 array, got int32"),
    ("int-nested_quant_map",
     _set("nested_quant_map", lambda a: a.astype(np.uint8)),
     "'m.weight.nested_quant_map' must be a float32 array, got uint8"),
    ("float-absmax", _set("absmax", lambda a: a.astype(np.float32)),
     "'m.weight.absmax' of a double-quantized state (it has nested_absmax, "
     "nested_quant_map, nested_offset, nested_blocksize, nested_dtype) must "
     "hold uint8 codes, got float32"),
    ("nested_blocksize-100", lambda sd: _edit_json(sd, nested_blocksize=100),
     "'nested_blocksize' (in 'm.weight.quant_state.bitsandbytes__nf4')` "
     "must be one of (64, 128, 256, 512, 1024, 2048, 4096), got 100"),
    ("nested_offset-text", lambda sd: _edit_json(sd, nested_offset="0.1"),
     "'nested_offset' (in 'm.weight.quant_state.bitsandbytes__nf4') must be "
     "a float (the mean absmax), got '0.1'"),
    ("nested_dtype-int8", lambda sd: _edit_json(sd, nested_dtype="int8"),
     "'nested_dtype' (in 'm.weight.quant_state.bitsandbytes__nf4') must be "
     "one of ('float32', 'float16', 'bfloat16'), got 'int8'"),
]


def _assert_load_refused(sd, message):
  """Params4bit.from_state_dict raises a ValueError ending in `message`."""
  with pytest.raises(ValueError, match="^Params4bit.from_state_dict: .*"
                     + re.escape(message)):
    F.Params4bit.from_state_dict(sd, _PREFIX)


@pytest.mark.parametrize("edit,message", [
    pytest.param(e, m, id=i) for i, e, m in _NESTED_BROKEN])
def test_broken_double_quantized_checkpoint_is_an_error(edit, message):
  _, sd = _checkpoint(compress=True)
  edit(sd)
  _assert_load_refused(sd, message)
  # The same checks through QuantState.from_dict, keys named without the
  # module prefix.
  sub = {k[len("m.weight."):]: v for k, v in sd.items()
         if k.startswith("m.weight.")}
  with pytest.raises(ValueError, match="^QuantState.from_dict: .*"
                     + re.escape(message.replace("m.weight.", ""))):
    F.QuantState.from_dict(sub)


def _nested_parts_on_plain(sd):
  # Nested tensors from another (double-quantized) weight next to a plain
  # float absmax.
  _, nested = _checkpoint(compress=True)
  for k in ("nested_absmax", "nested_quant_map"):
    sd["m.weight." + k] = nested["m.weight." + k]


_PLAIN_BROKEN = [
    ("nested_offset-in-json", lambda sd: _edit_json(sd, nested_offset=0.5),
     "missing 'm.weight.nested_absmax', 'm.weight.nested_quant_map', "
     "'m.weight.nested_blocksize': the state is double-quantized (it has "
     "nested_offset)"),
    ("nested-tensors-with-float-absmax", _nested_parts_on_plain,
     "missing 'm.weight.nested_offset', 'm.weight.nested_blocksize': the "
     "state is double-quantized (it has nested_absmax, nested_quant_map)"),
    ("uint8-absmax", _set("absmax", lambda a: a.astype(np.uint8)),
     "missing 'm.weight.nested_absmax', 'm.weight.nested_quant_map', "
     "'m.weight.nested_offset', 'm.weight.nested_blocksize': the state is "
     "double-quantized (it has a uint8 absmax)"),
    ("int32-absmax", _set("absmax", lambda a: a.astype(np.int32)),
     "'m.weight.absmax' must be a float32 array, got int32"),
    ("long-absmax", _set("absmax", lambda a: np.concatenate([a, a[:1]])),
     "'m.weight.absmax' must have 188 entries (ceil(n / blocksize) = "
     "ceil(12000 / 64) for shape (40, 300)), got 189"),
    ("2d-quant_map", _set("quant_map", lambda a: np.stack([a, a])),
     "'m.weight.quant_map' must have 16 entries (the 4-bit table), got 32"),
    ("shape-text", lambda sd: _edit_json(sd, shape="40x300"),
     "'shape' (in 'm.weight.quant_state.bitsandbytes__nf4') must be a list "
     "of ints >= 0, got '40x300'"),
    ("shape-floats", lambda sd: _edit_json(sd, shape=[40.5, 300]),
     "must be a list of ints >= 0, got [40.5, 300]"),
]


@pytest.mark.parametrize("edit,message", [
    pytest.param(e, m, id=i) for i, e, m in _PLAIN_BROKEN])
def test_broken_plain_checkpoint_is_an_error(edit, message):
  _, sd = _checkpoint(compress=False)
  edit(sd)
  _assert_load_refused(sd, message)


def test_packed_weight_of_a_wrong_dtype_is_an_error():
  _, sd = _checkpoint(compress=False)
  # The right number of bytes, but not a quant_storage dtype.
  sd["m.weight"] = sd["m.weight"].reshape(-1).view(np.int16)
  with pytest.raises(ValueError, match=re.escape(
      "'m.weight' must be packed 4-bit codes of a quant_storage dtype "
      "('uint8', 'int8', 'float16', 'bfloat16', 'float32'), got int16")):
    F.Params4bit.from_state_dict(sd, _PREFIX)


def test_json_that_is_not_an_object_is_an_error():
  _, sd = _checkpoint(compress=False)
  sd[_BLOB] = np.frombuffer(b"[1, 2]", np.uint8)
  with pytest.raises(ValueError, match=re.escape(
      f"{_BLOB!r} must hold a JSON object, got list [1, 2]")):
    F.Params4bit.from_state_dict(sd, _PREFIX)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("storage", [jnp.uint8, jnp.float16, jnp.bfloat16])
def test_consistent_checkpoints_still_load_bit_exactly(compress, storage):
  w = jax.random.normal(jax.random.key(2), (40, 300), jnp.bfloat16)
  p = F.Params4bit.from_float(w, quant_type="fp4", blocksize=128,
                              compress_statistics=compress,
                              quant_storage=storage)
  back = F.Params4bit.from_state_dict(p.state_dict("a.b."), "a.b.")
  assert back == p
  np.testing.assert_array_equal(
      np.asarray(back.dequantize()).view(np.uint16),
      np.asarray(p.dequantize()).view(np.uint16))
  # Unpacked dicts (Python items, 1-element offset array) load too.
  d = p.quant_state.as_dict()
  d["nested_offset"] = np.asarray([d["nested_offset"]]) if compress else None
  if not compress:
    del d["nested_offset"]
  assert F.QuantState.from_dict(d) == p.quant_state


def test_row_shard_keeps_the_whole_nested_absmax():
  # io.convert loads a row shard of a double-quantized weight with the
  # whole tensor's nested absmax (its codes index it by global block): more
  # nested absmax entries than the shard's own blocks need are accepted,
  # fewer are not (test_broken_double_quantized_checkpoint_is_an_error).
  w = jax.random.normal(jax.random.key(0), (256, 512), jnp.float32)
  p = F.Params4bit.from_float(w, quant_type="nf4", compress_statistics=True)
  sd = p.state_dict(_PREFIX)
  assert sd["m.weight.nested_absmax"].shape == (8,)  # 2048 blocks / 256
  rows = 64  # a quarter: 512 codes, 2 nested blocks of its own
  blob = "m.weight.quant_state.bitsandbytes__nf4"
  shard = dict(sd)
  shard["m.weight"] = sd["m.weight"][:rows * 512 // 2]
  shard["m.weight.absmax"] = sd["m.weight.absmax"][:rows * 512 // 64]
  _edit_json(shard, shape=[rows, 512])
  assert blob in shard
  q = F.Params4bit.from_state_dict(shard, _PREFIX)
  assert q.shape == (rows, 512)
  np.testing.assert_array_equal(np.asarray(q.quant_state.nested_absmax),
                                sd["m.weight.nested_absmax"])
  # The first shard's codes index the first nested blocks: it dequantizes
  # as the first rows of the whole weight.
  np.testing.assert_array_equal(np.asarray(q.dequantize()),
                                np.asarray(p.dequantize())[:rows])
