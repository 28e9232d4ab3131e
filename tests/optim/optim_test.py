"""Tests of `jaxbnb.optim` in the manner of bnb's tests/test_optim.py.

8-bit trajectories track 32-bit ones (bnb's tolerances, states re-synced
after each step), per-leaf 8/32-bit selection, optax composition, schedules
without recompilation, and hyper-parameter validation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbnb import optim
from jaxbnb._src.optim import rules as optim_rules
from jaxbnb._src.optim.state import Quantized8bit
from tests import helpers
from tests.optim import _common

# bnb test_optimizer8bit: (mean |dp|, mean rel |dp|) bounds per dtype.
PARAM_TOL = {jnp.float32: (6e-5, 6e-4), jnp.bfloat16: (1.7e-4, 1.6e-3)}

OPTIMIZERS_8BIT = {
    "adam": lambda **k: optim.adam8bit(**k),
    "lion": lambda **k: optim.lion8bit(**k),
    "sgd": lambda **k: optim.sgd8bit(0.01, 0.9, **k),
    "rmsprop": lambda **k: optim.rmsprop8bit(0.01, 0.9, **k),
    "ademamix": lambda **k: optim.ademamix8bit(**k),
    "ademamix_sched": lambda **k: optim.ademamix8bit(t_alpha=20, t_beta3=20,
                                                     **k),
}


def _dequant(s):
  return s.dequantize() if isinstance(s, Quantized8bit) else s


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS_8BIT))
def test_8bit_tracks_32bit(name, dtype):
  shape = (128, 65)  # 8320 elements: 8-bit state, a partial last block
  opt8 = OPTIMIZERS_8BIT[name]()
  opt32 = OPTIMIZERS_8BIT[name](optim_bits=32)
  rng = np.random.default_rng(0)
  p8 = {"w": jnp.asarray(rng.standard_normal(shape) * 0.1, dtype)}
  st8, st32 = opt8.init(p8), opt32.init(p8)
  assert isinstance(st8.state1["w"], Quantized8bit)
  assert st32.state1["w"].dtype == jnp.float32

  @jax.jit
  def step(g, p, st8, st32):
    u8, st8 = opt8.update(g, st8, p)
    u32, st32 = opt32.update(g, st32, p)
    return optax.apply_updates(p, u8), optax.apply_updates(p, u32), st8, st32

  max_err, max_rel = PARAM_TOL[dtype]
  for _ in range(20):
    g = {"w": jnp.asarray(0.01 * rng.standard_normal(shape), dtype)}
    new8, new32, st8, st32 = step(g, p8, st8, st32)
    for s8, s32 in [(st8.state1["w"], st32.state1["w"]),
                    (st8.state2["w"], st32.state2["w"])]:
      if s8 is None:
        continue
      a, b = np.asarray(_dequant(s8)), np.asarray(s32)
      bad = ~np.isclose(a, b, atol=3e-3, rtol=1e-3)
      assert bad.sum() < 20, bad.sum()
    a = np.asarray(new8["w"], np.float32)
    b = np.asarray(new32["w"], np.float32)
    err = np.abs(a - b)
    assert err.mean() < max_err, err.mean()
    assert (err / (np.abs(b) + 1e-9)).mean() < max_rel
    # Resync the 32-bit run to the 8-bit one, as bnb's test does.
    st32 = st32._replace(
        state1=jax.tree.map(_dequant, st8.state1,
                            is_leaf=lambda x: isinstance(x, Quantized8bit)),
        state2=jax.tree.map(_dequant, st8.state2,
                            is_leaf=lambda x: isinstance(x, Quantized8bit)))
    p8 = new8


def test_adam32bit_matches_optax_adamw():
  """bnb decays after the step, optax with it: O(lr^2 wd) apart."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((64, 80)), jnp.float32)}
  ours = optim.adamw32bit(1e-3, weight_decay=1e-2)
  ref = optax.adamw(1e-3, weight_decay=1e-2)
  a, b = params, params
  sa, sb = ours.init(a), ref.init(b)
  for _ in range(20):
    g = {"w": jnp.asarray(0.01 * rng.standard_normal((64, 80)), jnp.float32)}
    ua, sa = ours.update(g, sa, a)
    ub, sb = ref.update(g, sb, b)
    a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
  np.testing.assert_allclose(np.asarray(a["w"]), np.asarray(b["w"]),
                             atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sa.state1["w"]),
                             np.asarray(sb[0].mu["w"]), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["fp32", "bf16"])
def test_apply_updates_lands_on_the_rule_result(dtype):
  rng = np.random.default_rng(2)
  p = jnp.asarray(rng.standard_normal((64, 80)), dtype)
  g = jnp.asarray(0.01 * rng.standard_normal((64, 80)), dtype)
  opt = optim.adamw8bit(1e-2)
  st = opt.init({"w": p})
  u, st2 = opt.update({"w": g}, st, {"w": p})
  h = optim_rules.Hyper("adam", weight_decay=1e-2)
  want, _, _ = optim_rules.update_8bit("adam", p, g, st.state1["w"],
                                       st.state2["w"], lr=1e-2, step=1,
                                       hyper=h)
  got = optax.apply_updates({"w": p}, u)["w"]
  assert got.dtype == dtype
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if dtype == jnp.bfloat16:  # new - p is exact in float32
    np.testing.assert_array_equal(got, want)
  else:  # exact when new - p is (Sterbenz: p/2 <= new <= 2p), else ulp(p)
    pn = np.asarray(p)
    sterbenz = (want / pn >= 0.5) & (want / pn <= 2.0)
    np.testing.assert_array_equal(got[sterbenz], want[sterbenz])
    big = np.maximum(np.abs(pn), np.abs(want - pn))
    assert np.all(np.abs(got - want) <= np.spacing(big))
  assert int(st2.count) == 1


def test_min_8bit_size_and_override_choose_32bit_leaves():
  params = {"big": jnp.ones((64, 64)), "small": jnp.ones((63, 64)),
            "pinned": jnp.ones((64, 64)), "bias": jnp.ones((64,))}
  keep = lambda path, leaf: "pinned" in jax.tree_util.keystr(path)
  st = optim.adam8bit(override=keep).init(params)
  kinds = {k: isinstance(v, Quantized8bit) for k, v in st.state1.items()}
  assert kinds == {"big": True, "small": False, "pinned": False,
                   "bias": False}
  mask = {"big": True, "small": False, "pinned": False, "bias": False}
  st = optim.lion8bit(override=mask, min_8bit_size=64).init(params)
  kinds = {k: isinstance(v, Quantized8bit) for k, v in st.state1.items()}
  assert kinds == {"big": False, "small": True, "pinned": True, "bias": True}
  assert all(v is None for v in st.state2.values())
  st = optim.ademamix8bit().init(params)
  assert st.state1["big"].codes.shape == (2, 64, 64)
  assert st.state1["big"].absmax.shape == (2, 16)
  assert st.state1["small"].shape == (2, 63, 64)
  assert isinstance(optim.adam32bit().init(params).state1["big"], jax.Array)


def test_mixed_tree_updates_and_jit_state_roundtrip():
  params = {"a": jnp.ones((64, 64)), "b": jnp.ones((10,))}
  opt = optim.adamw8bit(1e-3)
  st = opt.init(params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p))
  g = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  u, st = step(g, st, params)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  leaves = jax.tree.leaves(st)
  assert {np.dtype(x.dtype).name for x in leaves} == {"int32", "uint8",
                                                       "float32"}
  back = jax.tree.unflatten(jax.tree.structure(st), leaves)
  assert isinstance(back.state1["a"], Quantized8bit)


def test_chain_composition_matches_alias():
  """clip -> scale_by_adam8bit -> lr gives the alias' states bit for bit."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.standard_normal((64, 80)), jnp.float32)}
  chained = optax.chain(optax.clip_by_global_norm(1.0),
                        optim.scale_by_adam8bit(),
                        optax.scale_by_learning_rate(1e-3))
  alias = optim.adam8bit(1e-3)
  clip = optax.clip_by_global_norm(1.0)
  sc, sa = chained.init(params), alias.init(params)
  for _ in range(3):
    g = {"w": jnp.asarray(rng.standard_normal((64, 80)), jnp.float32)}
    uc, sc = chained.update(g, sc)
    gc, _ = clip.update(g, clip.init(params))
    ua, sa = alias.update(gc, sa, params)
    np.testing.assert_allclose(np.asarray(uc["w"]), np.asarray(ua["w"]),
                               atol=3e-7, rtol=1e-4)  # new_p - p: ulp(p)
  np.testing.assert_array_equal(np.asarray(sc[1].state1["w"].codes),
                                np.asarray(sa.state1["w"].codes))
  np.testing.assert_array_equal(np.asarray(sc[1].state2["w"].absmax),
                                np.asarray(sa.state2["w"].absmax))


def test_schedule_and_step_never_recompile():
  params = {"w": jnp.ones((64, 64))}
  sched = optax.linear_schedule(0.0, 1e-2, 10)
  opt = optim.adam8bit(sched)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    g = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  st = opt.init(params)
  p1, st = step(params, st)  # lr = sched(0) = 0: no move
  np.testing.assert_array_equal(np.asarray(p1["w"]), 1.0)
  p2, st = step(p1, st)
  p3, st = step(p2, st)
  assert len(traces) == 1
  assert int(st.count) == 3
  assert float(p3["w"][0, 0]) < float(p2["w"][0, 0]) < 1.0


@pytest.mark.parametrize("make, match", [
    (lambda: optim.adam8bit(-1e-3), "learning_rate=-0.001"),
    (lambda: optim.adam8bit(b1=1.0), "b1=1.0"),
    (lambda: optim.adamw32bit(b2=-0.1), "adamw32bit: b2"),
    (lambda: optim.adam8bit(eps=-1e-8), "eps=-1e-08"),
    (lambda: optim.adamw8bit(weight_decay=-1.0), "weight_decay=-1.0"),
    (lambda: optim.lion8bit(b2=1.5), "b2=1.5"),
    (lambda: optim.sgd8bit(0.1, momentum=0.0), "momentum=0.0"),
    (lambda: optim.rmsprop8bit(alpha=0.0), "alpha=0.0"),
    (lambda: optim.ademamix8bit(b3=1.0), "b3=1.0"),
    (lambda: optim.ademamix8bit(t_alpha=-1), "t_alpha=-1"),
    (lambda: optim.adam8bit(optim_bits=16), "optim_bits=16"),
    (lambda: optim.scale_by_adam8bit(b1=-0.5), "b1=-0.5"),
])
def test_bad_hyperparameters_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_inputs_raise():
  opt = optim.adam8bit()
  with pytest.raises(TypeError, match="floating-point"):
    opt.init({"step": jnp.zeros((3,), jnp.int32)})
  params = {"w": jnp.ones((4,))}
  with pytest.raises(ValueError, match="needs `params`"):
    opt.update(params, opt.init(params))


def test_paged_matches_unpaged():
  params = {"w": jnp.ones((64, 80))}
  g = {"w": jnp.full((64, 80), 0.01)}
  a, b = optim.paged_adamw8bit(), optim.adamw8bit()
  ua, sa = a.update(g, a.init(params), params)
  ub, sb = b.update(g, b.init(params), params)
  np.testing.assert_array_equal(np.asarray(ua["w"]), np.asarray(ub["w"]))
  np.testing.assert_array_equal(np.asarray(sa.state1["w"].codes),
                                np.asarray(sb.state1["w"].codes))


# ------------------------------------- scale_by_*8bit blocks on 8-bit leaves

# block -> (the block, the bnb-exact alias with the same rule and no weight
# decay, learning rate). Both see the same gradients, so their 8-bit states
# must be identical and the block's direction times -lr must be the alias'
# parameter step.
_LR = 1e-3
BLOCKS = {
    "adam": (lambda: optim.scale_by_adam8bit(),
             lambda: optim.adam8bit(_LR)),
    "ademamix": (lambda: optim.scale_by_ademamix8bit(),
                 lambda: optim.ademamix8bit(_LR, weight_decay=0.0)),
    "lion": (lambda: optim.scale_by_lion8bit(), lambda: optim.lion8bit(_LR)),
    "momentum": (lambda: optim.scale_by_momentum8bit(0.9),
                 lambda: optim.sgd8bit(_LR, 0.9)),
    "rmsprop": (lambda: optim.scale_by_rmsprop8bit(),
                lambda: optim.rmsprop8bit(_LR)),
    "adagrad": (lambda: optim.scale_by_adagrad8bit(),
                lambda: optim.adagrad8bit(_LR)),
}


def _q8(state):
  return [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, Quantized8bit))
          if isinstance(x, Quantized8bit)]


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_scale_by_8bit_block_matches_its_alias_on_an_8bit_leaf(kind):
  make_block, make_alias = BLOCKS[kind]
  shape = (64, 67)  # 4288 >= min_8bit_size 4096: 8-bit states
  rng = np.random.default_rng(7)
  p = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
  block = optax.chain(make_block(), optax.scale_by_learning_rate(_LR))
  alias = make_alias()
  bs, as_ = block.init(p), alias.init(p)
  for s in (bs, as_):
    q = _q8(s)
    assert q and all(x.codes.dtype == jnp.uint8 for x in q), (kind, s)
    assert sum(x.codes.size for x in q) >= np.prod(shape), kind
  bstep = jax.jit(block.update)
  astep = jax.jit(lambda g, s, p: alias.update(g, s, p))
  for t in range(1, 4):
    g = {"w": jnp.asarray(0.01 * rng.standard_normal(shape), jnp.float32)}
    bu, bs = bstep(g, bs, p)
    au, as_ = astep(g, as_, p)
    # The states depend on the gradients only (no weight decay): identical.
    for x, y in zip(_q8(bs), _q8(as_), strict=True):
      assert x.codes.dtype == jnp.uint8
      np.testing.assert_array_equal(np.asarray(x.codes), np.asarray(y.codes))
      np.testing.assert_array_equal(np.asarray(x.absmax),
                                    np.asarray(y.absmax))
    # The alias rounds p + step once in float32 (one ulp of p, either side of
    # a midpoint), the block's -lr * direction is a float32 product of the
    # same direction (a few eps of the step): far below the step itself
    # (lr * O(1) = 1e-3 vs ulp(|p| ~ 1) ~ 1e-7), so a wrong scale fails.
    new_p = optax.apply_updates(p, au)
    want = np.asarray(new_p["w"], np.float64) - np.asarray(p["w"], np.float64)
    mag = np.abs(np.asarray(p["w"], np.float64)) + np.abs(want)
    bound = helpers.ulp(mag, np.float32) + 4 * helpers.F32_EPS * np.abs(want)
    helpers.assert_within(np.asarray(bu["w"]), want, bound,
                          err_msg=f"{kind} step {t}")
    # (a no-op or half-strength block fails: the bound is a few % at most)
    assert np.median(bound / np.maximum(np.abs(want), 1e-30)) < 0.05, kind
    p = new_p


# ------------------------------------------------- trees users pass (None)

# Every kind of transformation: 8-bit and 32-bit aliases, paged, 1- and
# 2-state rules, the scale_by_* blocks.
_NONE_CASES = {
    "adamw8bit": lambda: optim.adamw8bit(1e-3),
    "lion8bit": lambda: optim.lion8bit(1e-4),
    "sgd8bit": lambda: optim.sgd8bit(1e-2, 0.9),
    "ademamix8bit": lambda: optim.ademamix8bit(1e-3),
    "adamw32bit": lambda: optim.adamw32bit(1e-3),
    "paged_adamw8bit": lambda: optim.paged_adamw8bit(1e-3),
    "paged_lion32bit": lambda: optim.paged_lion32bit(1e-4),
    "scale_by_adam8bit": lambda: optim.scale_by_adam8bit(),
    "scale_by_momentum8bit": lambda: optim.scale_by_momentum8bit(),
}


@pytest.mark.parametrize("name", sorted(_NONE_CASES))
def test_none_leaf_stays_none_like_optax(name):
  """A None in the tree (a layer without bias) is an empty subtree, as in
  optax: no state, None in the updates, the other leaves as without it."""
  rng = np.random.default_rng(11)
  dense = {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32),
           "v": jnp.asarray(rng.standard_normal((7,)), jnp.float32)}
  params = {**dense, "bias": None, "nested": [None, {"b": None}]}
  tx = _NONE_CASES[name]()
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  ref_step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  s, ref_s = tx.init(params), tx.init(dense)
  for i in range(2):
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.01 * (i + 1)), params)
    u, s = step(g, s, params)
    ref_u, ref_s = ref_step({k: g[k] for k in dense}, ref_s, dense)
    assert u["bias"] is None and u["nested"] == [None, {"b": None}], u
    for k in dense:
      np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(ref_u[k]))
  assert jax.tree.leaves(s) and len(jax.tree.leaves(s)) == len(
      jax.tree.leaves(ref_s))
  new = optax.apply_updates(params, u)
  assert new["bias"] is None
  eager_u, _ = tx.update(g, s, params)  # and without jit
  assert eager_u["bias"] is None


def test_renamed_leaf_with_the_same_shapes_raises():
  """State initialized for "mlp" must not be applied to a layer "ffn" of the
  same shape (optax.adamw refuses it too); the error names both."""
  old = {"attn": jnp.ones((64, 64)), "mlp": jnp.ones((64, 64))}
  new = {"attn": jnp.ones((64, 64)), "ffn": jnp.ones((64, 64))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), new)
  for tx in (optim.adamw8bit(1e-3), optim.lion32bit(1e-4),
             optim.scale_by_adam8bit()):
    with pytest.raises(ValueError, match=r"the updates have \['ffn'\] where "
                       r"the state has \['mlp'\]"):
      tx.update(grads, tx.init(old), new)
    with pytest.raises(ValueError, match="structure the optimizer state"):
      jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))(
          grads, tx.init(old), new)
  # The same keys in another container type are the same tree (a list and a
  # tuple here; an nnx.State and a dict under nnx.Optimizer).
  tx = optim.adamw8bit(1e-3)
  state = tx.init([jnp.ones((64, 64))])
  u, _ = tx.update((jnp.ones((64, 64)),), state, (jnp.ones((64, 64)),))
  assert isinstance(u, tuple)


def test_low_precision_scalar_hyperparameters_are_numbers():
  """A bfloat16 / float16 0-d hyper-parameter is a number (bnb takes
  floats): computed in float32 from the value given, bit for bit."""
  params = {"w": jnp.ones((64, 64), jnp.bfloat16)}
  grads = {"w": jnp.full((64, 64), 0.01, jnp.bfloat16)}
  for dtype in (jnp.bfloat16, jnp.float16):
    lr, b1 = jnp.asarray(1e-3, dtype), jnp.asarray(0.9, dtype)
    tx = optim.adamw8bit(lr, b1=b1, weight_decay=jnp.asarray(1e-2, dtype))
    ref = optim.adamw8bit(float(lr), b1=float(b1),
                          weight_decay=float(jnp.asarray(1e-2, dtype)))
    u, _ = tx.update(grads, tx.init(params), params)
    ref_u, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(ref_u["w"]))
  # A value the rounding pushed out of range says why.
  with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\), got "
                     r"b2=1.0. It arrived as a bfloat16 value.*"
                     r"hyperparam_dtype=jnp.float32"):
    optim.adamw8bit(b2=jnp.asarray(0.999, jnp.bfloat16))
  with pytest.raises(ValueError, match="must be a scalar number"):
    optim.adamw8bit(jnp.ones((2,), jnp.bfloat16))


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit", "ademamix8bit",
                                  "adamw32bit", "scale_by_adam8bit"])
def test_params_on_a_mesh_of_explicit_axes(name):
  """`jax.make_mesh`'s default axes are Explicit (sharding in the types):
  the update runs there, the states take their parameter's sharding as
  optax's do, and every number is the one-device run's."""
  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ("x",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(0)
  host = {"w": rng.standard_normal((8 * n, 640)).astype(np.float32),
          "v": rng.standard_normal((96, 16 * n)).astype(np.float32),
          "b": rng.standard_normal((300,)).astype(np.float32)}
  specs = {"w": ("x", None), "v": (None, "x"), "b": ()}
  params = {k: jax.device_put(v, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*specs[k]))) for k, v in host.items()}
  single = jax.tree.map(jnp.asarray, host)
  tx = (optax.chain(optim.scale_by_adam8bit(), optax.scale(-1e-3))
        if name.startswith("scale_by") else getattr(optim, name)(1e-3))
  state, ref_state = tx.init(params), tx.init(single)
  if name != "adamw32bit" and not name.startswith("scale_by"):
    w = state.state1["w"]
    lead = (None,) if name == "ademamix8bit" else ()
    assert tuple(w.codes.sharding.spec) == lead + ("x", None)
  step = jax.jit(tx.update)
  for _ in range(3):
    host_grads = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32)
                  for k, v in host.items()}
    grads = {k: jax.device_put(v, params[k].sharding)
             for k, v in host_grads.items()}
    ref_grads = jax.tree.map(jnp.asarray, host_grads)
    updates, state = step(grads, state, params)
    ref_updates, ref_state = step(ref_grads, ref_state, single)
    params = optax.apply_updates(params, updates)
    single = optax.apply_updates(single, ref_updates)
  for k, spec in specs.items():
    got = tuple(params[k].sharding.spec)
    assert got + (None,) * (len(spec) - len(got)) == spec + (None,) * (
        len(got) - len(spec)), (k, got)
  got, want = jax.device_get(params), jax.device_get(single)
  if name == "ademamix8bit":
    # XLA's CPU backend compiles AdEMAMix's rule into the sharded program
    # with other roundings than into the one-device one: measured, 0.2% of
    # the elements one ulp apart. The other rules are bitwise equal.
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-9)
    return
  _common.assert_trees_bitwise_equal(got, want)
