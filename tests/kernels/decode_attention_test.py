"""The one-token attention kernel against the model's einsum path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention as da
from tests.kernels import _util


def _inputs(b, nq, nkv, d, s, layers, seed, dtype=jnp.bfloat16):
  """q, k_new, v_new, cos, sin, k_cache, v_cache and the rng: RoPE tables
  of Llama's kind at a random position per row."""
  rng = np.random.default_rng(seed)
  def f(*shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 2
                       ).astype(dtype)
  inv = 10000.0 ** (-np.arange(0, d, 2, dtype=np.float32) / d)
  ang = rng.integers(0, 4096, (b, 1)).astype(np.float32) * inv
  ang = np.concatenate([ang, ang], axis=-1)
  cos, sin = (jnp.asarray(t(ang)).astype(dtype) for t in (np.cos, np.sin))
  return (f(b, nq, d), f(b, nkv, d), f(b, nkv, d), cos, sin,
          f(layers, b, s, nkv, d), f(layers, b, s, nkv, d), rng)


def _check(out, kc, vc, want, kc0, vc0, layer, index):
  ro, rk, rv = want
  # The caches: the reference's, one slot of one layer written (RoPE with
  # the reference's roundings; XLA on the GPU may keep the products in
  # float32 for the reference, then they are an ulp of a product apart).
  np.testing.assert_array_equal(np.asarray(vc), np.asarray(rv))
  kf, rkf = np.asarray(kc, np.float32), np.asarray(rk, np.float32)
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(kf, rkf)
  eps = float(jnp.finfo(rk.dtype).eps)
  np.testing.assert_allclose(kf, rkf, rtol=eps,
                             atol=eps * np.abs(rkf[layer, :, index]).max())
  changed = np.asarray(kc != kc0).any(axis=(1, 3, 4))
  assert not np.delete(changed, layer, axis=0).any()
  assert not np.delete(changed[layer], index, axis=0).any()
  # The output: the online softmax rounds its probabilities before they
  # are normalized, the einsum path after: within two bf16/fp16 ulps of
  # the output's scale. Wrong masking, scale, grouping or a missed new
  # key moves it by O(1).
  got = np.asarray(out, np.float32)
  ref = np.asarray(ro, np.float32)
  assert got.shape == ref.shape and out.dtype == ro.dtype
  tol = 2 * float(jnp.finfo(ro.dtype).eps) * max(1.0, np.abs(ref).max())
  np.testing.assert_allclose(got, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize(
    "b,nq,nkv,d,s,block_s,index",
    [(1, 32, 8, 128, 256, None, 131),   # Llama-3-8B decode, one split
     (2, 8, 2, 64, 40, None, 39),       # the last slot, S not a power of 2
     (3, 4, 4, 32, 100, 16, 0),         # MHA, 7 blocks in a loop
     (1, 4, 1, 32, 3000, 64, 2048),     # long cache: several splits
     (2, 16, 1, 64, 520, 32, 333)])     # 16 query heads per kv head
def test_matches_einsum_path(mode, b, nq, nkv, d, s, block_s, index):
  q, kn, vn, cos, sin, kc, vc, rng = _inputs(b, nq, nkv, d, s, 3,
                                             seed=s + nq)
  mask = rng.random((b, s)) < 0.6
  mask[:, index] = True
  if b > 1:
    mask[-1] = False  # a row that may see no key: all slots weigh alike
  mask = jnp.asarray(mask)
  layer = 2 if s < 1000 else 1
  kw = dict(layer=layer, scale=d ** -0.5)
  want = da.reference(q, kn, vn, cos, sin, kc, vc, mask, jnp.int32(index),
                      **kw)
  out, kc2, vc2 = da.decode_attention(
      q, kn, vn, cos, sin, kc, vc, mask, jnp.int32(index), block_s=block_s,
      interpret=mode == "interpret", **kw)
  _check(out, kc2, vc2, want, kc, vc, layer, index)


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize("index, slot", [(-1, 39), (-3, 37), (40, 39),
                                         (100, 39), (-100, 0)])
def test_out_of_range_slots_are_taken_as_dynamic_update_slice_takes_them(
    mode, index, slot):
  # Negative: from the end; then clamped to the cache (never out of bounds).
  q, kn, vn, cos, sin, kc, vc, rng = _inputs(1, 4, 2, 32, 40, 1, seed=5)
  mask = jnp.asarray(rng.random((1, 40)) < 0.7).at[:, slot].set(True)
  kw = dict(layer=0, scale=32 ** -0.5)
  want = da.reference(q, kn, vn, cos, sin, kc, vc, mask, jnp.int32(index),
                      **kw)
  out, kc2, vc2 = da.decode_attention(
      q, kn, vn, cos, sin, kc, vc, mask, jnp.int32(index),
      interpret=mode == "interpret", **kw)
  _check(out, kc2, vc2, want, kc, vc, 0, slot)


@pytest.mark.parametrize("mode", _util.modes())
def test_float16_sliding_window_and_traced_index(mode):
  """float16, a window mask (only the last 5 slots before the token), and
  the slot and mask as traced values of one jitted function (as in the
  decode loop, where they change every step)."""
  b, nq, nkv, d, s = 2, 8, 4, 32, 64
  q, kn, vn, cos, sin, kc, vc, _ = _inputs(b, nq, nkv, d, s, 2, seed=7,
                                           dtype=jnp.float16)
  interpret = mode == "interpret"

  @jax.jit
  def step(index, kc, vc):
    slots = jnp.arange(s)
    mask = jnp.broadcast_to((slots <= index) & (slots > index - 5), (b, s))
    got = da.decode_attention(q, kn, vn, cos, sin, kc, vc, mask, index,
                              layer=0, scale=d ** -0.5, interpret=interpret)
    want = da.reference(q, kn, vn, cos, sin, kc, vc, mask, index, layer=0,
                        scale=d ** -0.5)
    return got, want

  for index in (3, 40):
    got, want = step(jnp.int32(index), kc, vc)
    _check(*got, want, kc, vc, 0, index)
  # A slot past the cache is clamped to the last one, as the einsum path's
  # `dynamic_update_slice` clamps it (never a store out of bounds).
  got, want = step(jnp.int32(s + 7), kc, vc)
  _check(*got, want, kc, vc, 0, s - 1)


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize("split", [2, 4, 100])
def test_forced_splits(mode, split):
  """`split` programs per head (flash-decoding), combined after the
  kernel; more splits than blocks clamp to one block each."""
  b, nq, nkv, d, s, index = 2, 8, 2, 64, 256, 77
  q, kn, vn, cos, sin, kc, vc, rng = _inputs(b, nq, nkv, d, s, 2, seed=split)
  mask = jnp.asarray(rng.random((b, s)) < 0.5).at[:, index].set(True)
  kw = dict(layer=1, scale=d ** -0.5)
  want = da.reference(q, kn, vn, cos, sin, kc, vc, mask, jnp.int32(index),
                      **kw)
  got = da.decode_attention(q, kn, vn, cos, sin, kc, vc, mask,
                            jnp.int32(index), block_s=32, split=split,
                            interpret=mode == "interpret", **kw)
  _check(*got, want, kc, vc, 1, index)


@pytest.mark.parametrize("mode", _util.modes())
def test_layer_as_a_traced_array(mode):
  """`layer` may be an int32 scalar computed in the program (a
  `fori_loop` over layers): each step writes and reads its own layer, and
  a layer past the cache is clamped as `dynamic_update_slice` clamps."""
  b, nq, nkv, d, s, index = 1, 8, 2, 64, 128, 40
  q, kn, vn, cos, sin, kc, vc, rng = _inputs(b, nq, nkv, d, s, 3, seed=7)
  mask = jnp.asarray(rng.random((b, s)) < 0.7).at[:, index].set(True)
  kw = dict(scale=d ** -0.5)

  @jax.jit
  def run(layer, kc, vc):
    return da.decode_attention(q, kn, vn, cos, sin, kc, vc, mask,
                               jnp.int32(index), layer=layer,
                               interpret=mode == "interpret", **kw)

  for layer, written in ((0, 0), (2, 2), (5, 2)):
    want = da.reference(q, kn, vn, cos, sin, kc, vc, mask, jnp.int32(index),
                        layer=written, **kw)
    got = run(jnp.int32(layer), kc, vc)
    _check(*got, want, kc, vc, written, index)


def test_one_kernel_for_every_layer():
  """Lowered for the H200: four layers' calls (Python ints, as the model
  passes them) hold one Triton kernel, lowered and compiled once a
  program, not one a layer."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  b, nq, nkv, d, s = 1, 32, 8, 128, 256
  q, kn, vn, cos, sin, kc, vc, _ = _inputs(b, nq, nkv, d, s, 4, seed=3)
  mask = jnp.ones((b, s), bool)

  def layers(q, kc, vc):
    outs = []
    for layer in range(4):
      out, kc, vc = da.decode_attention(q, kn, vn, cos, sin, kc, vc, mask,
                                        jnp.int32(9), layer=layer,
                                        scale=d ** -0.5)
      outs.append(out)
    return outs, kc, vc

  text = helpers.lowered_for_h200(layers, q, kc, vc)
  assert text.count('"jaxbnb_decode_attention"') == 1, text.count(
      '"jaxbnb_decode_attention"')


def test_splits_cover_the_cache_once():
  """Every split holds at least one real slot (an empty one would divide
  by zero) and together they hold all blocks once; by default splits are
  added up to two programs per SM, one block each at most."""
  for b, nkv, s, block in [(1, 8, 256, 64), (1, 8, 8192, 128),
                           (8, 8, 8192, 128), (1, 1, 3000, 64),
                           (1, 1, 129, 128), (64, 8, 100000, 128),
                           (40, 8, 256, 64)]:
    split, steps = da._splits(b, nkv, s, block)  # pylint: disable=protected-access
    blocks = -(-s // block)
    assert split * steps >= blocks and (split - 1) * steps < blocks
    want = max(1, min(blocks, 2 * 132 // (b * nkv)))
    assert -(-blocks // want) == steps
  assert da._splits(1, 8, 256, 64) == (4, 1)  # pylint: disable=protected-access
  assert da._splits(8, 8, 2048, 128) == (4, 4)  # pylint: disable=protected-access


def test_bad_arguments_name_what_is_wrong():
  q, kn, vn, cos, sin, kc, vc, _ = _inputs(1, 4, 2, 32, 8, 2, seed=0)
  mask = jnp.ones((1, 8), bool)
  run = lambda *a, **kw: da.decode_attention(  # noqa: E731
      *a, mask, jnp.int32(0), scale=0.25, interpret=True, **kw)
  with pytest.raises(ValueError, match=r"k_new and v_new must be \(1, 2, 32\)"):
    run(q, kn[:, :1], vn, cos, sin, kc, vc, layer=0)
  with pytest.raises(ValueError, match="caches must be"):
    run(q, kn, vn, cos, sin, kc[..., :16], vc, layer=0)
  with pytest.raises(ValueError, match="k_cache and v_cache must be q's "
                     "dtype bfloat16, got float32 and bfloat16"):
    run(q, kn, vn, cos, sin, kc.astype(jnp.float32), vc, layer=0)
  with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
    run(q, kn, vn, cos, sin, kc, vc, layer=2)
  with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got -1"):
    run(q, kn, vn, cos, sin, kc, vc, layer=-1)
  with pytest.raises(ValueError, match="layer must be an int or an integer "
                     "scalar array, got 1.0"):
    run(q, kn, vn, cos, sin, kc, vc, layer=1.0)
  with pytest.raises(ValueError, match="integer scalar array"):
    run(q, kn, vn, cos, sin, kc, vc, layer=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="integer scalar array, got True"):
    run(q, kn, vn, cos, sin, kc, vc, layer=True)
  with pytest.raises(ValueError, match=r"cos and sin must be \(1, 32\)"):
    run(q, kn, vn, cos[:, :16], sin, kc, vc, layer=0)
  assert da.can_use(128, jnp.bfloat16, jnp.bfloat16)
  assert not da.can_use(96, jnp.bfloat16, jnp.bfloat16)
  assert not da.can_use(16, jnp.bfloat16, jnp.bfloat16)
  assert not da.can_use(128, jnp.float32, jnp.float32)
  assert not da.can_use(128, jnp.bfloat16, jnp.float32)
  assert da.can_use(128, jnp.bfloat16, jnp.bfloat16, groups=16)
  assert not da.can_use(128, jnp.bfloat16, jnp.bfloat16, groups=32)
