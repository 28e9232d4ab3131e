"""pallas_kernels.optim_8bit against the pure-jnp rules (optim_rules).

Each step feeds the same inputs (the reference's parameter and states) to
the fused kernel, through `kernels.optimizer_update_8bit`, and to
`optim_rules.update_8bit`, so a difference cannot hide behind the
trajectories drifting apart. Interpret mode on CPU is bit-exact (codes,
absmax and parameters) except where noted; the GPU tests compile the kernel
and bound the differences XLA's and Triton's FMA contraction allow.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbnb._src.optim import kernels
from jaxbnb._src.optim import rules as optim_rules
from jaxbnb._src.optim import state as optim_state
from pallas_kernels import code_tables
from pallas_kernels import optim_8bit as ok
from tests.kernels import _util


def _hyper(kind, wd=0.0, nesterov=False):
  extra = {}
  if kind == "ademamix":
    extra = dict(t_alpha=4, t_beta3=4)
  if kind == "momentum":
    extra = dict(beta1=0.9)
  return optim_rules.Hyper(kind, weight_decay=wd, nesterov=nesterov, **extra)


def _init_states(kind, shape, rng):
  """Non-trivial states: quantized random moments (positive second one)."""
  lead = (2,) if kind == "ademamix" else ()
  m = rng.standard_normal(lead + shape).astype(np.float32) * 0.05
  m[..., :3] = 0.0
  if kind in ("rmsprop", "adagrad"):  # sums of squares: non-negative
    m = m * m
  s1 = optim_state.quantize_state(jnp.asarray(m), True,
                                  stacked=kind == "ademamix")
  s2 = None
  if optim_rules.num_states(kind) == 2:
    v = (rng.standard_normal(shape).astype(np.float32) * 0.01) ** 2
    s2 = optim_state.quantize_state(jnp.asarray(v), False)
  return s1, s2


def _grad(shape, rng, step):
  n = math.prod(shape)
  g = (rng.standard_normal(n) * 0.1).astype(np.float32)
  if n > 300:
    g[7] = np.nan
    g[299] = np.inf
    g[260] = -np.inf
  if n > 800 and step % 2 == 0:
    g[512:768] = 0.0                       # a whole block of zero gradient
  return jnp.asarray(g.reshape(shape))


def _ulp_diff(a, b, dtype):
  """Max distance in units of the last place of `dtype` (same-sign data)."""
  itype = {2: np.int16, 4: np.int32}[jnp.dtype(dtype).itemsize]
  ai = np.asarray(jax.lax.bitcast_convert_type(a, itype)).astype(np.int64)
  bi = np.asarray(jax.lax.bitcast_convert_type(b, itype)).astype(np.int64)
  return int(np.max(np.abs(ai - bi))) if ai.size else 0


def _check_steps(kind, shape, dtype, *, steps, mode, wd=0.0, nesterov=False,
                 p_ulps=1, p_exact=0.99, seed=0, code_mismatch=0.0):
  rng = np.random.default_rng(seed)
  hyper = _hyper(kind, wd, nesterov)
  p = jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
  if math.prod(shape) > 600:
    p = p.reshape(-1).at[600].set(0.0).reshape(shape)
  s1, s2 = _init_states(kind, shape, rng)
  # Committed like the jitted outputs fed back later: one compile each.
  p, s1, s2 = jax.device_put((p, s1, s2), jax.devices()[0])
  ref = jax.jit(lambda p, g, s1, s2, lr, t: optim_rules.update_8bit(
      kind, p, g, s1, s2, lr=lr, step=t, hyper=hyper))
  fused = jax.jit(lambda p, g, s1, s2, lr, t: kernels.optimizer_update_8bit(
      kind, p, g, s1, s2, lr=lr, step=t, hyper=hyper, mode=mode))
  for t in range(1, steps + 1):
    g = jax.device_put(_grad(shape, rng, t), jax.devices()[0])
    # A schedule: a new lr every step, no recompile.
    lr = jax.device_put(jnp.float32(0.01 / t), jax.devices()[0])
    t_ = jax.device_put(jnp.int32(t), jax.devices()[0])
    out = fused(p, g, s1, s2, lr, t_)
    assert out is not None
    want = ref(p, g, s1, s2, lr, t_)
    new_p, n1, n2 = out
    r_p, r1, r2 = want
    assert new_p.dtype == p.dtype and new_p.shape == p.shape
    pairs = [(n1, r1)] + ([(n2, r2)] if n2 is not None else [])
    for got, exp in pairs:
      assert got.signed == exp.signed
      assert got.codes.shape == exp.codes.shape
      gc, ec = np.asarray(got.codes), np.asarray(exp.codes)
      if code_mismatch:
        bad = gc != ec
        assert bad.mean() <= code_mismatch, (kind, t, bad.mean())
        d = (gc.astype(int) - ec.astype(int)) % 256
        assert np.all(np.minimum(d, 256 - d) <= 1), (kind, t)
        np.testing.assert_allclose(np.asarray(got.absmax),
                                   np.asarray(exp.absmax), rtol=1e-5)
      else:
        np.testing.assert_array_equal(gc, ec, err_msg=f"{kind} step {t}")
        np.testing.assert_array_equal(np.asarray(got.absmax),
                                      np.asarray(exp.absmax))
    same = np.asarray(new_p.astype(jnp.float32)) == np.asarray(
        r_p.astype(jnp.float32))
    assert same.mean() >= p_exact, (kind, t, same.mean())
    if p_ulps is None and jnp.dtype(dtype).itemsize == 2:  # GPU, 16-bit
      assert _ulp_diff(new_p, r_p, dtype) <= 1, (kind, t)
    elif p_ulps is None:  # GPU, float32: bnb's own 32-bit test tolerance
      np.testing.assert_allclose(np.asarray(new_p.astype(jnp.float32)),
                                 np.asarray(r_p.astype(jnp.float32)),
                                 rtol=1e-5, atol=1e-6, err_msg=kind)
    else:
      assert _ulp_diff(new_p, r_p, dtype) <= p_ulps, (kind, t)
    # Non-finite gradients: state reset and parameter kept.
    gflat = np.asarray(g).reshape(-1)
    bad = ~np.isfinite(gflat)
    if bad.any():
      np.testing.assert_array_equal(
          np.asarray(new_p).reshape(-1)[bad], np.asarray(p).reshape(-1)[bad])
    p, s1, s2 = r_p, r1, r2
  return p


# (kind, shape, dtype, weight decay, nesterov, fraction of bit-exact
# parameters): n = 256*k + r covers the "rows" layout (n % 256 == 0) and the
# masked "flat" layout. Codes, absmax and parameters are bit-exact for adam,
# momentum and lion (AdEMAMix: all but a few parameters, by 1 ulp). For
# rmsprop/adagrad (and, from JAX 0.12.1, AdEMAMix) XLA:CPU contracts the
# state's multiply-adds into FMAs differently in the two compiled programs
# (the reference and the interpret-mode kernel): an fp32 state, hence a
# block absmax, can land 1 ulp apart, a parameter too; codes then agree
# but for rare neighbours.
CASES = [
    ("adam", (4, 256), jnp.float32, 0.01, False, 1.0),
    ("adam", (2 * 256 + 77,), jnp.bfloat16, 0.0, False, 1.0),
    ("ademamix", (256 + 45,), jnp.float32, 0.01, False, 0.99),
    ("momentum", (845,), jnp.float16, 0.01, True, 1.0),
    ("lion", (3 * 256 + 1,), jnp.bfloat16, 0.1, False, 1.0),
    ("rmsprop", (4 * 256,), jnp.float32, 0.0, False, 0.0),
    ("adagrad", (3, 200), jnp.float32, 0.01, False, 0.0),
]


@pytest.mark.parametrize("kind,shape,dtype,wd,nesterov,p_exact", CASES)
def test_interpret_matches_reference(kind, shape, dtype, wd, nesterov,
                                     p_exact):
  tol = {}
  if kind in ("rmsprop", "adagrad", "ademamix"):  # see above: an fp32
    tol = dict(code_mismatch=0.01)  # state can differ by an ulp, so can a
    # block's absmax
  _check_steps(kind, shape, dtype, steps=2, mode="interpret", wd=wd,
               nesterov=nesterov, p_exact=p_exact, **tol)


def test_partial_block_uses_its_valid_elements_only():
  # n = 257: the second block has one element; its absmax is that |s|.
  n = 257
  p = jnp.ones((n,), jnp.float32)
  g = jnp.zeros((n,), jnp.float32).at[256].set(0.5)
  s1 = optim_state.Quantized8bit.zeros((n,), True)
  hyper = _hyper("momentum")
  new_p, n1, _ = kernels.optimizer_update_8bit(
      "momentum", p, g, s1, None, lr=0.1, step=1, hyper=hyper,
      mode="interpret")
  np.testing.assert_array_equal(np.asarray(n1.absmax), [0.0, 0.5])
  assert float(new_p[256]) == np.float32(1.0) - np.float32(0.1) * 0.5
  assert int(n1.codes[256]) == 255          # +1.0 of the signed map


def test_bridge_declines():
  hyper = _hyper("adam")
  p = jnp.ones((512,), jnp.float32)
  s1 = optim_state.Quantized8bit.zeros((512,), True)
  s2 = optim_state.Quantized8bit.zeros((512,), False)
  args = ("adam", p, p, s1, s2)
  assert kernels.optimizer_update_8bit(*args, lr=0.1, step=1, hyper=hyper,
                                       mode="reference") is None
  # Missing state2 for a 2-state kind: no kernel.
  assert kernels.optimizer_update_8bit("adam", p, p, s1, None, lr=0.1,
                                       step=1, hyper=hyper,
                                       mode="interpret") is None
  pi = jnp.ones((512,), jnp.int32)
  assert kernels.optimizer_update_8bit("adam", pi, pi, s1, s2, lr=0.1,
                                       step=1, hyper=hyper,
                                       mode="interpret") is None


def test_constants_agree_with_jaxbnb():
  """pallas_kernels never imports jaxbnb, so it repeats jaxbnb's kinds and
  block size (whose home is jaxbnb's optim package): they must agree."""
  assert ok.KINDS == optim_rules.KINDS
  assert ok.TWO_STATE_KINDS == optim_rules.TWO_STATE_KINDS
  assert ok.BLOCKSIZE == optim_state.BLOCKSIZE
  for kind in optim_rules.KINDS:
    assert ok.num_states(kind) == optim_rules.num_states(kind), kind


@pytest.mark.parametrize("kind", ["adam", "lion", "momentum"])
def test_traced_weight_decay_matches_static(kind):
  """A traced weight decay (optax.inject_hyperparams) reaches the kernel as
  has_wd=None and gives the static results bit for bit, 0 included."""
  shape = (300,)
  rng = np.random.default_rng(7)
  p = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  g = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.1)
  s1, s2 = _init_states(kind, shape, rng)
  fused = jax.jit(lambda p, g, s1, s2, wd: kernels.optimizer_update_8bit(
      kind, p, g, s1, s2, lr=0.01, step=2, hyper=_hyper(kind, wd),
      mode="interpret"))
  for wd in (0.0, 0.1):
    ref = jax.jit(lambda p, g, s1, s2, wd=wd: optim_rules.update_8bit(
        kind, p, g, s1, s2, lr=0.01, step=2, hyper=_hyper(kind, wd)))
    got = jax.tree.leaves(fused(p, g, s1, s2, jnp.float32(wd)))
    want = jax.tree.leaves(ref(p, g, s1, s2))
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                    err_msg=f"{kind} wd={wd}")


def test_can_use():
  assert ok.can_use("adam", 4096, jnp.bfloat16)
  assert ok.can_use("lion", 1, jnp.float32)
  assert not ok.can_use("adam", 0, jnp.float32)
  assert not ok.can_use("lamb", 4096, jnp.float32)
  assert not ok.can_use("adam", 4096, jnp.int8)


def test_pack_scalars_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown names"):
    ok.pack_scalars(learning_rate=0.1)


# ------------------------------------------------------------------- GPU
# Compiled Triton vs XLA:GPU: both contract some multiply-adds into FMAs,
# not necessarily the same ones, so an fp32 state may differ by an ulp and,
# rarely, flip a code to its neighbour.

GPU_CASES = [
    ("adam", (1 << 16,), jnp.float32, 0.01),
    ("adam", (3 * (1 << 14) + 77,), jnp.bfloat16, 0.01),
    ("ademamix", (1 << 14,), jnp.bfloat16, 0.01),
    ("momentum", (1 << 14,), jnp.float16, 0.0),
    ("lion", ((1 << 14) + 5,), jnp.float32, 0.1),
    ("rmsprop", (1 << 14,), jnp.float32, 0.0),
    ("adagrad", (1 << 14,), jnp.bfloat16, 0.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,shape,dtype,wd", GPU_CASES)
def test_gpu_matches_reference(kind, shape, dtype, wd):
  # Triton and XLA:GPU contract multiply-adds into FMAs independently: a few
  # percent of the parameters differ in the last bits (adam: 6%, rmsprop:
  # 2.4%, up to 64 ulp of a value near zero; bf16: 1 ulp), so the GPU check
  # uses bnb's 32-bit test tolerance for float32 parameters and 1 ulp for
  # 16-bit ones; codes and absmax stay tight.
  _check_steps(kind, shape, dtype, steps=4, mode="pallas", wd=wd,
               p_ulps=None, p_exact=0.9, code_mismatch=1e-3)


@pytest.mark.gpu
def test_gpu_aliased_and_block_rows_agree():
  n = (1 << 15) + 3
  rng = np.random.default_rng(3)
  p = jnp.asarray(rng.standard_normal(n).astype(np.float32))
  g = jnp.asarray(rng.standard_normal(n).astype(np.float32) * 0.1)
  s1, s2 = _init_states("adam", (n,), rng)
  sc = ok.pack_scalars(lr=1e-3, step=3, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.01, corr1=1 - 0.9**3,
                       corr2=math.sqrt(1 - 0.999**3))
  maps = (jnp.asarray(optim_state.signed_map()),
          jnp.asarray(optim_state.unsigned_map()))
  outs = []
  for kw in (dict(block_rows=4), dict(block_rows=1, num_warps=2),
             dict(block_rows=8, alias=True)):
    outs.append(ok.optimizer_update_8bit(
        p, g, s1.codes, s1.absmax, s2.codes, s2.absmax, *maps, sc,
        kind="adam", has_wd=True, **kw))
  for other in outs[1:]:
    for a, b in zip(outs[0], other):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize("kind,dtype,wd", [
    ("adam", jnp.float32, 0.01),
    ("lion", jnp.float32, 0.1),
    ("momentum", jnp.float16, 0.0),
])
def test_apply_updates_writes_what_optax_applies(mode, kind, dtype, wd):
  """apply_updates=True (the fused in-place step) writes exactly
  `optax.apply_updates(p, new_p - p)`, with the same states; near-zero
  parameters make that differ from new_p itself (checked for float32)."""
  n = 2 * 256 + 77
  rng = np.random.default_rng(11)
  pv = rng.standard_normal(n).astype(np.float32)
  pv[:400] *= np.float32(10.0) ** -rng.uniform(2, 7, 400).astype(np.float32)
  p = jnp.asarray(pv).astype(dtype)
  g = jnp.asarray(rng.standard_normal(n).astype(np.float32) * 0.1)
  g = g.at[5].set(jnp.nan)
  s1, s2 = _init_states(kind, (n,), rng)
  hyper = _hyper(kind, wd)
  run = jax.jit(lambda p, g, s1, s2, fuse: kernels.optimizer_update_8bit(
      kind, p, g, s1, s2, lr=0.01, step=3, hyper=hyper, mode=mode,
      apply_updates=fuse), static_argnums=4)
  new_p, *states = run(p, g, s1, s2, False)
  got, *got_states = run(p, g, s1, s2, True)
  want = optax.apply_updates(
      p, new_p.astype(jnp.float32) - p.astype(jnp.float32))
  assert got.dtype == p.dtype
  np.testing.assert_array_equal(
      np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
  for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(got_states)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if dtype == jnp.float32:
    assert (np.asarray(got) != np.asarray(new_p)).any()


# ---------------------------------------------------------------------------
# requantization by lookup tables (`quantize_tables`)
# ---------------------------------------------------------------------------


def _probe_values(q, rng):
  """Every threshold and map value +- 3 ulps, bucket edges, random values
  over the decades, and the special values."""
  mid = (q[:-1] + q[1:]) * np.float32(0.5)
  near = []
  for v in np.concatenate([mid, q]).astype(np.float32):
    w = v
    for _ in range(3):
      w = np.nextafter(w, np.float32(-np.inf))
    for _ in range(7):
      near.append(w)
      w = np.nextafter(w, np.float32(np.inf))
  edges = (np.arange(1, 3200, dtype=np.uint32) << np.uint32(16)) + np.uint32(
      103 << 23)
  edges = np.concatenate([edges, edges - 1]).view(np.float32)
  rand = (10.0 ** rng.uniform(-9, 0, 200_000)).astype(np.float32)
  special = np.array([0.0, 1.0, 1e-30, 2.0**-24, 2.0**-25, np.inf, np.nan,
                      1.5, 3e38], np.float32)
  pos = np.concatenate([np.asarray(near, np.float32), edges, rand, special])
  return np.concatenate([pos, -pos]).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_tables_give_the_search_codes(signed):
  """The kernel's two-lookup requantization (`quantize_lut`) equals
  bitsandbytes' binary search (`search_codes` on the host, and
  `code_tables.search` in jnp) on every threshold +- 3 ulps, the bucket
  edges, 400k random values over nine decades, +-0, +-inf, NaN and values
  past 1."""
  q = optim_state.signed_map() if signed else optim_state.unsigned_map()
  lo, aux = code_tables.quantize_tables(q)
  x = _probe_values(q, np.random.default_rng(0))
  want = code_tables.search_codes(x, q)
  got = np.asarray(code_tables.quantize_lut(jnp.asarray(x), jnp.asarray(lo),
                                    jnp.asarray(aux)))
  np.testing.assert_array_equal(got, want)
  search, _ = code_tables.search(jnp.asarray(x), jnp.asarray(q))
  np.testing.assert_array_equal(np.asarray(search), want)
  # The sign of a code's value, read off the code.
  assert int(aux[256]) == int(np.signbit(q).sum())


def test_quantize_tables_refuse_maps_they_cannot_serve():
  lin = np.linspace(-1.0, 1.0, 256, dtype=np.float32)
  assert code_tables.quantize_tables(lin) is not None
  crowded = lin.copy()
  crowded[200:204] = np.float32(0.5) + np.arange(4, dtype=np.float32) * 1e-7
  crowded.sort()
  # Three thresholds in one bucket:
  assert code_tables.quantize_tables(crowded) is None
  assert code_tables.quantize_tables(lin[::-1]) is None  # not sorted
  assert code_tables.quantize_tables(lin[:128]) is None  # not 256 values
  nan = lin.copy()
  nan[3] = np.nan
  assert code_tables.quantize_tables(nan) is None


def _direct_args(kind, n, rng):
  p = jnp.asarray(rng.standard_normal(n).astype(np.float32))
  g = rng.standard_normal(n).astype(np.float32) * 0.1
  g[3], g[300] = np.nan, np.inf
  g[512:768] = 0.0
  s1, s2 = _init_states(kind, (n,), rng)
  codes1 = np.asarray(s1.codes).copy()
  absmax1 = np.asarray(s1.absmax).copy()
  codes1[..., 512:768] = 127        # an all-zero block: 0 / 0 in the
  absmax1[..., 2] = 0.0             # requantization (NaN -> code 0)
  s1 = optim_state.Quantized8bit(jnp.asarray(codes1), jnp.asarray(absmax1),
                                 signed=True)
  sc = ok.pack_scalars(lr=1e-3, step=3, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.01, corr1=1 - 0.9**3,
                       corr2=math.sqrt(1 - 0.999**3), alpha=5.0,
                       beta3=0.9999)
  two = s2 is not None
  maps = (jnp.asarray(optim_state.signed_map()),
          jnp.asarray(optim_state.unsigned_map()) if two else None)
  tables = (code_tables.quantize_tables(optim_state.signed_map()),
            code_tables.quantize_tables(optim_state.unsigned_map())
            if two else None)
  states = (s1.codes, s1.absmax, s2.codes if two else None,
            s2.absmax if two else None)
  return (p, jnp.asarray(g), *states, *maps, sc), tables


@pytest.mark.parametrize("mode", _util.modes())
@pytest.mark.parametrize("kind", ["adam", "ademamix", "lion", "rmsprop"])
def test_tables_and_search_give_identical_steps(mode, kind):
  """The kernel with `quantize_tables` and with the binary search writes
  the same codes, absmax and parameters, bit for bit (NaN/inf gradients,
  a zero-gradient block and an all-zero state block included)."""
  n = 4 * 256 + 77
  args, tables = _direct_args(kind, n, np.random.default_rng(5))
  run = functools.partial(ok.optimizer_update_8bit, kind=kind, has_wd=True,
                          interpret=mode == "interpret")
  plain = run(*args)
  fast = run(*args, *tables)
  for a, b in zip(plain, fast):
    if a is not None:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tables_must_come_in_pairs():
  args, tables = _direct_args("adam", 1024, np.random.default_rng(1))
  with pytest.raises(ValueError, match="tables2 must be given with tables1"):
    ok.optimizer_update_8bit(*args, tables[0], kind="adam", interpret=True)
