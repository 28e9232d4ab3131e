"""pallas_kernels.quantize_4bit against the pure-jnp reference (bit exact)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb._src.quant import reference
from pallas_kernels import quantize_4bit as qk
from tests import helpers
from tests.kernels import _util

CASES = [
    # (numel, blocksize, quant_type, dtype, block_rows)
    (64 * 37, 64, "nf4", jnp.bfloat16, None),    # partial last program
    (1001, 64, "fp4", jnp.float16, 4),           # odd n: partial block, pad
    (4096 * 3 + 5, 128, "nf4", jnp.float16, 8),
    (300, 32, "fp4", jnp.bfloat16, None),
    (8192 + 64, 4096, "nf4", jnp.float32, 1),    # big blocks, partial last
    (777, 256, "nf4", jnp.float32, 2),
    (2, 64, "fp4", jnp.float32, None),           # a single pair
]


@pytest.mark.parametrize("numel,blocksize,quant_type,dtype,block_rows",
                         CASES)
def test_interpret_matches_reference(numel, blocksize, quant_type, dtype,
                                     block_rows):
  x = jnp.asarray(_util.rng_array(numel, numel, dtype, scale=3.0))
  x = x.at[min(5, numel - 1)].set(jnp.nan)
  if numel > 200:
    x = x.at[100:100 + blocksize].set(0.0)       # an all-zero block
    x = x.at[150].set(jnp.inf)
  packed, absmax = qk.quantize_4bit(
      x, blocksize=blocksize, quant_type=quant_type,
      thresholds=_util.thresholds(quant_type), block_rows=block_rows,
      interpret=True)
  ref_packed, ref_absmax = reference.quantize_4bit(x, blocksize, quant_type)
  np.testing.assert_array_equal(np.asarray(packed), np.asarray(ref_packed))
  np.testing.assert_array_equal(np.asarray(absmax), np.asarray(ref_absmax))


@pytest.mark.parametrize("load_u32", [False, True])
def test_load_modes_agree(load_u32):
  x = jnp.asarray(_util.rng_array(64 * 9, 1, jnp.bfloat16))
  packed, absmax = qk.quantize_4bit(
      x, blocksize=64, quant_type="nf4", thresholds=_util.thresholds("nf4"),
      load_u32=load_u32, interpret=True)
  ref_packed, ref_absmax = reference.quantize_4bit(x, 64, "nf4")
  np.testing.assert_array_equal(np.asarray(packed), np.asarray(ref_packed))
  np.testing.assert_array_equal(np.asarray(absmax), np.asarray(ref_absmax))


def test_can_use():
  assert qk.can_use(4096, 64, jnp.bfloat16)
  assert not qk.can_use(0, 64, jnp.bfloat16)
  assert not qk.can_use(4096, 48, jnp.float32)
  assert not qk.can_use(4096, 64, jnp.int8)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("numel,blocksize", [(1 << 20, 64), (12345, 128),
                                             (64 * 1000 + 17, 32),
                                             (1 << 16, 4096)])
def test_gpu_matches_reference(quant_type, dtype, numel, blocksize):
  """Compiled (`max` skips NaNs there): a NaN among values, a block of
  NaNs (its absmax -FLT_MAX, as bitsandbytes) and a partial last block."""
  x = jnp.asarray(_util.rng_array(numel, 7, dtype, scale=2.0))
  x = x.at[3].set(jnp.nan).at[blocksize:2 * blocksize].set(jnp.nan)
  packed, absmax = qk.quantize_4bit(
      x, blocksize=blocksize, quant_type=quant_type,
      thresholds=_util.thresholds(quant_type))
  ref_packed, ref_absmax = reference.quantize_4bit(x, blocksize, quant_type)
  np.testing.assert_array_equal(np.asarray(packed), np.asarray(ref_packed))
  np.testing.assert_array_equal(np.asarray(absmax), np.asarray(ref_absmax))


def _nf4_ties(numel, dtype):
  """Values on and next to every NF4 threshold (times the block's absmax
  of 1), and random ones."""
  t = np.asarray(_util.thresholds("nf4"), np.float32)
  near = np.concatenate([t, np.nextafter(t, np.float32(2)),
                         np.nextafter(t, np.float32(-2)), -t, [1.0, -1.0]])
  x = _util.rng_array(numel, 11, np.float32, scale=1.0)
  x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
  x[:near.size] = near
  x[::64] = 1.0  # every block's absmax is exactly 1
  return jnp.asarray(x).astype(dtype)


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_tree_gives_the_same_codes(mode, dtype):
  """NF4 with the last two tree levels' thresholds gathered from a table
  (`gather=True`) or each code looked up by its bucket (`bucket=True`)
  equals the select tree and the reference, on every threshold, its
  neighbours, NaN and random values; FP4 ignores both options."""
  x = _nf4_ties(64 * 40 + 10, dtype)
  x = x.at[7].set(jnp.nan)
  outs = []
  for gather, bucket in ((False, False), (True, False), (False, True)):
    outs.append(qk.quantize_4bit(
        x, blocksize=64, quant_type="nf4", thresholds=_util.thresholds("nf4"),
        gather=gather, bucket=bucket, interpret=mode == "interpret"))
  ref_packed, ref_absmax = reference.quantize_4bit(x, 64, "nf4")
  for packed, absmax in outs:
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(ref_packed))
    np.testing.assert_array_equal(np.asarray(absmax), np.asarray(ref_absmax))
  fp4 = qk.quantize_4bit(x, blocksize=64, quant_type="fp4",
                         thresholds=_util.thresholds("fp4"), gather=True,
                         bucket=True, interpret=mode == "interpret")
  np.testing.assert_array_equal(
      np.asarray(fp4[0]), np.asarray(reference.quantize_4bit(x, 64, "fp4")[0]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("numel,block_rows,num_warps", [
    (64 * 40 + 10, None, None), (1 << 20, 128, 8), (64 * 999 + 3, 64, 4),
    (1 << 18, 256, 16), (64 * 33, 32, 2)])
@pytest.mark.parametrize("smem", [False, True])
def test_gpu_lookups_give_the_same_codes(dtype, numel, block_rows, num_warps,
                                         smem):
  """The NF4 bucket lookup from shared memory (`smem=True`, the default:
  the codes by inline PTX) and from global memory give the reference's
  bytes compiled: every threshold and its neighbours, a NaN, a block of
  NaNs, infinities, an all-zero block, a partial last block and program,
  in tiles of 2-16 warps."""
  x = _nf4_ties(numel, jnp.float32)
  x = x.at[7].set(jnp.nan).at[128:192].set(jnp.nan).at[256:320].set(0.0)
  x = x.at[400].set(jnp.inf).at[401].set(-jnp.inf).astype(dtype)
  packed, absmax = qk.quantize_4bit(
      x, blocksize=64, quant_type="nf4", thresholds=_util.thresholds("nf4"),
      block_rows=block_rows, num_warps=num_warps, smem=smem)
  ref_packed, ref_absmax = reference.quantize_4bit(x, 64, "nf4")
  np.testing.assert_array_equal(np.asarray(packed), np.asarray(ref_packed))
  np.testing.assert_array_equal(np.asarray(absmax), np.asarray(ref_absmax))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,numel", [(jnp.bfloat16, 64 * 4096 + 70),
                                         (jnp.float32, 64 * 999 + 3)])
def test_gpu_l2_hints_give_the_same_bytes(dtype, numel):
  """The L2 hints (`evict=True`, taken before double quantization) change
  no byte: the reference's codes and absmax, through
  `F.quantize_4bit(..., compress_statistics=True)` too."""
  from jaxbnb import functional as F  # pylint: disable=g-import-not-at-top
  x = _nf4_ties(numel, jnp.float32).at[7].set(jnp.nan).astype(dtype)
  packed, absmax = qk.quantize_4bit(
      x, blocksize=64, quant_type="nf4", thresholds=_util.thresholds("nf4"),
      evict=True)
  ref_packed, ref_absmax = reference.quantize_4bit(x, 64, "nf4")
  np.testing.assert_array_equal(np.asarray(packed), np.asarray(ref_packed))
  np.testing.assert_array_equal(np.asarray(absmax), np.asarray(ref_absmax))
  got = F.quantize_4bit(x, compress_statistics=True, quant_type="nf4")
  with jaxbnb.kernel_mode("reference"):
    want = F.quantize_4bit(x, compress_statistics=True, quant_type="nf4")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
def test_gpu_two_kernels_in_one_program():
  """Two quantize kernels of other shapes in one jitted program (each
  declares its tables in its own function's PTX) give the reference's
  bytes."""
  th = _util.thresholds("nf4")
  a = jnp.asarray(_util.rng_array(64 * 300, 3, jnp.bfloat16))
  b = jnp.asarray(_util.rng_array(64 * 77 + 9, 4, jnp.float16))
  got = jax.jit(lambda a, b: [qk.quantize_4bit(
      v, blocksize=64, quant_type="nf4", thresholds=th) for v in (a, b)])(
          a, b)
  for v, (packed, absmax) in zip((a, b), got):
    ref_packed, ref_absmax = reference.quantize_4bit(v, 64, "nf4")
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(ref_packed))
    np.testing.assert_array_equal(np.asarray(absmax), np.asarray(ref_absmax))


def test_smem_defaults(monkeypatch):
  """`smem` (the default, compiled NF4 only) takes 8,192 values and 16
  warps a program; interpret mode and FP4 keep the global tiles."""
  seen = []
  real = qk.pl.pallas_call

  def spy(kernel, **kw):
    seen.append((kw["grid"], kw["compiler_params"].num_warps,
                 kernel.keywords["smem_threads"]))
    return real(kernel, **kw)
  monkeypatch.setattr(qk.pl, "pallas_call", spy)
  x = jax.ShapeDtypeStruct((64 * 1000,), jnp.bfloat16)
  for quant_type, interpret in (("nf4", False), ("nf4", True),
                                ("fp4", False)):
    qk.quantize_4bit.trace(x, blocksize=64, quant_type=quant_type,
                           thresholds=_util.thresholds(quant_type),
                           interpret=interpret)
  qk.quantize_4bit.trace(x, blocksize=64, quant_type="nf4",
                         thresholds=_util.thresholds("nf4"), smem=False)
  assert seen == [((8,), 16, 512), ((16,), 8, 0), ((16,), 4, 0),
                  ((16,), 8, 0)]


def test_lowers_with_the_shared_tables():
  """The compiled default lowers for an H200 (no GPU) with the tables'
  PTX: their initialized global words, the shared copy and the shared
  lookups."""
  text = helpers.lowered_for_h200(
      lambda x: qk.quantize_4bit(x, blocksize=64, quant_type="nf4",
                                 thresholds=_util.thresholds("nf4")),
      jax.ShapeDtypeStruct((64 * 4096,), jnp.bfloat16))
  assert "jaxbnb_quantize_nf4" in text
  for needle in ("jaxbnb_q4_g", "st.shared.v4.u32", "ld.shared.u8",
                 "bar.sync 0"):
    assert needle in text, needle


def test_smem_fill_ptx_holds_the_tables():
  """The PTX of `smem=True` declares the bucket table and the thresholds
  (then +inf) as initialized words, copies all 260 16-byte chunks with
  the program's threads and meets at one barrier; the lookups read the
  thresholds at their offset."""
  th = _util.thresholds("nf4")
  words = np.concatenate([qk.bucket_table(th).view("<u4"),
                          np.append(np.asarray(th, np.float32),
                                    np.float32(np.inf)).view("<u4")])
  for threads in (64, 128, 256, 512):
    text = qk.smem_fill_ptx(th, threads)
    init = text.split("= {", 1)[1].split("}", 1)[0]
    assert [int(w, 16) for w in init.split(", ")] == words.tolist()
    offsets = sorted(int(line.split("[sa+")[1].split("]")[0])
                     for line in text.splitlines() if "st.shared" in line)
    assert offsets == [16 * threads * c for c in range(len(offsets))]
    assert (len(offsets) - 1) * threads < 260 <= len(offsets) * threads
    assert text.count("bar.sync 0;") == 1
  assert f"[a+{qk._SMEM_THRESHOLDS}]" in qk.SMEM_CODES_PTX
  assert qk._SMEM_THRESHOLDS == 4096 == qk.bucket_table(th).size


def test_bucket_table_counts_the_thresholds_below():
  """`lo[b] + (x > t[lo[b]])` (`t`: the thresholds, then +inf) is the
  number of NF4 thresholds strictly below x: on every threshold and 3
  ulps around it, every bucket's first and last value in [-1, 1], the
  infinities and NaN (code 0, as the tree). (All 2.1e9 float32s in
  [-1, 1] were checked once, outside CI: 0 mismatches.)"""
  t = np.asarray(_util.thresholds("nf4"), np.float32)
  t16 = np.append(t, np.float32(np.inf))
  lo = qk.bucket_table(_util.thresholds("nf4")).astype(np.int64)
  u = t.view(np.uint32)
  near = (u[:, None].astype(np.int64) + np.arange(-3, 4)[None]).ravel()
  ends = np.arange(4096, dtype=np.int64) << 20
  ends = np.concatenate([ends, ends + (1 << 20) - 1])
  bits = np.concatenate([near, ends]).astype(np.uint32)
  x = bits.view(np.float32)
  x = x[np.abs(x) <= 1]
  c = lo[x.view(np.uint32) >> 20]
  np.testing.assert_array_equal(c + (x > t16[c]),
                                np.searchsorted(t, x, side="left"))
  special = np.array([np.inf, -np.inf, np.nan, 2.5, -2.5], np.float32)
  c = lo[special.view(np.uint32) >> 20]
  assert (c + (special > t16[c])).tolist() == [15, 0, 0, 15, 0]
  with pytest.raises(ValueError, match="share a bucket"):
    qk.bucket_table((0.5, 0.51))


def _triton_module(monkeypatch, fn, *args):
  """The Triton IR text of the kernel `fn` lowers to (no GPU)."""
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  seen = []
  real = lowering.lower_jaxpr_to_triton_module

  def spy(*a, **kw):
    result = real(*a, **kw)
    seen.append(str(result.module))
    return result
  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", spy)
  helpers.lowered_for_h200(fn, *args)
  assert len(seen) == 1
  return seen[0]


@pytest.mark.parametrize("evict", [False, True])
def test_l2_hints_lower_on_the_stream_and_the_absmax(monkeypatch, evict):
  """`evict=True` reads the input and stores the codes `evict_first` and
  stores the absmax `evict_last`; without it no hint is given."""
  text = _triton_module(
      monkeypatch, lambda x: qk.quantize_4bit(
          x, blocksize=64, quant_type="nf4",
          thresholds=_util.thresholds("nf4"), evict=evict),
      jax.ShapeDtypeStruct((64 * 4096,), jnp.bfloat16))
  lines = [l for l in text.splitlines() if "tt.load" in l or "tt.store" in l]
  hinted = {("load" if "tt.load" in l else "store",
             l.rsplit("x!tt.ptr<", 1)[-1].split(">")[0],
             l.split("eviction_policy = ")[1].split(">")[0])
            for l in lines if "eviction_policy" in l}
  if evict:
    assert hinted == {("load", "i32", "evict_first"),
                      ("store", "i8", "evict_first"),
                      ("store", "f32", "evict_last")}, lines
  else:
    assert not hinted, lines


def test_double_quantization_asks_for_the_hints(monkeypatch):
  """`F.quantize_4bit` asks the kernel for the L2 hints when it
  double-quantizes the absmax next, and only then."""
  from jaxbnb import functional as F  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.quant import kernels  # pylint: disable=g-import-not-at-top
  seen = []
  real = qk.quantize_4bit

  def spy(*a, **kw):
    seen.append(kw["evict"])
    return real(*a, **kw)
  monkeypatch.setattr(kernels.qk, "quantize_4bit", spy)
  x = jnp.asarray(_util.rng_array(64 * 10, 1, jnp.bfloat16))
  with jaxbnb.kernel_mode("interpret"):
    F.quantize_4bit(x, compress_statistics=True)
    F.quantize_4bit(x, compress_statistics=False)
  assert seen == [True, False]
